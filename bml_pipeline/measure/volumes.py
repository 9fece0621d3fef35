"""Structure volumes from a label map, in cm3, from the affine (voxel volume = |det| of its linear part)."""

from __future__ import annotations

import numpy as np

from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume

MM3_PER_CM3 = 1000.0


def label_counts(labels: Volume) -> np.ndarray:
    """Voxel count of every label value 0..max (index = label id)."""
    return np.bincount(np.asarray(labels.array).ravel().astype(np.intp, copy=False))


def structure_volumes(labels: Volume, schema: LabelSchema, counts: np.ndarray | None = None) -> dict[str, float | None]:
    """Volume (cm3) of every structure of ``schema``; None for structures absent from the map.

    A bone's volume is its full extent: the bone label plus its lesion label.
    """
    counts = label_counts(labels) if counts is None else counts
    voxel_cm3 = labels.voxel_volume_mm3 / MM3_PER_CM3

    def n(label_id: int) -> int:
        return int(counts[label_id]) if label_id < len(counts) else 0

    volumes: dict[str, float | None] = {}
    for s in schema.structures:
        ids = schema.bone_ids(s.name) if s.kind == "bone" else (s.id,)
        total = sum(n(i) for i in ids)
        volumes[s.name] = total * voxel_cm3 if total else None
    return volumes
