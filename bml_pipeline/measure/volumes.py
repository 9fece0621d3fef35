"""Structure volumes from a label map, in cm3, from the affine (voxel volume = |det| of its linear part)."""

from __future__ import annotations

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume

MM3_PER_CM3 = 1000.0
BOX_CHUNK = 1 << 20  # voxels per slab of label_box


COUNT_CHUNK = 1 << 18  # voxels per bincount call


def label_counts(labels: Volume) -> np.ndarray:
    """Voxel count of every label value 0..max (index = label id); non-negative integer arrays only.

    Counted in chunks of :data:`COUNT_CHUNK` voxels: ``np.bincount`` converts its input to 64-bit
    integers, which for a whole 160 x 384 x 384 map is a fresh 189 MB the system has to zero first
    (the chunks reuse one small buffer; twice as fast, the same counts)."""
    flat = np.asarray(labels.array).ravel(order="K")
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, flat.size, COUNT_CHUNK):
        chunk = np.bincount(flat[start:start + COUNT_CHUNK])
        if len(chunk) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(chunk) - len(counts), dtype=np.int64)])
        counts[:len(chunk)] += chunk
    return counts


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


def label_mask(array: np.ndarray, ids: tuple[int, ...] | list[int]) -> np.ndarray:
    """``np.isin(array, ids)`` for a few label values, as one comparison per value (about 10 times
    faster than ``np.isin`` on a label map)."""
    ids = list(ids)
    if not ids:
        return np.zeros(array.shape, dtype=bool)
    out = array == ids[0]
    for value in ids[1:]:
        out |= array == value
    return out


def label_box(array: np.ndarray, value: int, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """``bounding_box(array == value, margin)`` (:func:`bml_pipeline.volume.bounding_box`) of a 3D
    label map, found slab by slab along its slowest memory axis, so no map-sized mask is allocated
    (a fresh 24 MB per call on a knee, which the system has to zero first)."""
    axis = int(np.argmax(np.abs(array.strides)))
    n = array.shape[axis]
    step = max(1, BOX_CHUNK // max(1, array.size // max(n, 1)))
    hits = [np.zeros(size, dtype=bool) for size in array.shape]
    for start in range(0, n, step):
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, min(start + step, n))
        mask = array[tuple(index)] == value
        for a in range(array.ndim):
            found = np.any(mask, axis=tuple(b for b in range(array.ndim) if b != a))
            if a == axis:
                hits[a][start:start + found.size] |= found
            else:
                hits[a] |= found
    out = []
    for a, hit in enumerate(hits):
        where = np.flatnonzero(hit)
        if where.size == 0:
            return None
        out.append(slice(max(int(where[0]) - margin, 0), min(int(where[-1]) + 1 + margin, array.shape[a])))
    return tuple(out)  # type: ignore[return-value]
