"""Structure volumes from a label map, in cm3, from the affine (voxel volume = |det| of its linear part)."""

from __future__ import annotations

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume

MM3_PER_CM3 = 1000.0


def label_counts(labels: Volume) -> np.ndarray:
    """Voxel count of every label value 0..max (index = label id); non-negative integer arrays only."""
    return np.bincount(np.asarray(labels.array).ravel(order="K"))


def check_label_values(labels: Volume, schema: LabelSchema) -> np.ndarray:
    """:func:`label_counts` after checking that every value is a label of ``schema``.

    Raises:
        InputError: values outside the schema (the label map's source is named).
    """
    array = np.asarray(labels.array)
    if array.dtype.kind != "u":
        schema.check_values(array, labels.meta.source)
        labels = labels.with_array(array.astype(np.uint16))
    counts = label_counts(labels)
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - schema.ids)
    if unknown:
        raise InputError(labels.meta.source, f"label values {unknown[:10]} are not in label schema "
                                             f"{schema.name!r} (valid: {sorted(schema.ids)})")
    return counts


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
