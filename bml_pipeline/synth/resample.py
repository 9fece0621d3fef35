"""Real anatomy at another pose, and a known thickening of a cartilage plate, for validation.

A label map is made a continuous anatomy (every label's indicator smoothed) and rasterized again on its
own grid after a rigid motion (:func:`resample_smoothly`): unlike changing the affine (which moves the
grid with the anatomy), the voxel grid then cuts the anatomy differently, as two visits' scans do.
:func:`articular_shift` moves a plate's articular surface outward by a known distance in that continuous
anatomy, so the plate thickens by exactly that many mm wherever it covers its bone.
"""

from __future__ import annotations

import numpy as np

from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume, bounding_box

FieldChange = tuple[int, tuple[slice, ...], np.ndarray]
"""(label, index box, addend): an addend to one label's smoothed field on a box of the grid."""


def resample_smoothly(original: Volume, motion: np.ndarray, sigma_mm: float = 0.35,
                      change: FieldChange | None = None) -> Volume:
    """``original``'s anatomy moved by the rigid ``motion`` (4x4, world mm) and rasterized again on the
    original grid: every label's indicator is smoothed (Gaussian, ``sigma_mm``) into a continuous anatomy,
    sampled trilinearly at the moved voxel centres, and each voxel takes the label of the largest value.
    ``change``: (label, box, addend) added to that label's smoothed field on the index box (an anatomical
    change, e.g. :func:`articular_shift`)."""
    from scipy import ndimage

    arr = np.asarray(original.array)
    to_original = np.linalg.inv(original.affine) @ np.linalg.inv(motion) @ original.affine  # index -> index
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in arr.shape], indexing="ij"), 0)
    src = np.tensordot(to_original[:3, :3].astype(np.float32), idx, axes=1)
    src += to_original[:3, 3].astype(np.float32)[:, None, None, None]
    del idx
    best = np.full(arr.shape, -1.0, dtype=np.float32)
    out = np.zeros(arr.shape, dtype=arr.dtype)
    sigma = sigma_mm / np.asarray(original.spacing)
    for label in np.unique(arr):
        field = ndimage.gaussian_filter((arr == label).astype(np.float32), sigma)
        if change is not None and change[0] == label:
            field[change[1]] += change[2]
        value = ndimage.map_coordinates(field, src, order=1, mode="nearest")
        better = value > best
        best[better], out[better] = value[better], label
    return original.with_array(out)


def articular_shift(original: Volume, schema: LabelSchema, plate: str, shift_mm: float, *,
                    sigma_mm: float = 0.35, normal_sigma_mm: float = 1.0) -> FieldChange:
    """(label, index box, addend) for :func:`resample_smoothly` that moves ``plate``'s articular surface
    outward by ``shift_mm`` and leaves its bone side alone.

    With ``U`` the smoothed indicator of bone + plate and ``n`` its outward normal (``U`` smoothed by
    ``normal_sigma_mm``), the plate's field gets ``2 (U(x - shift n) - U(x))``. The smoothed indicators of
    all labels sum to 1, so at the articular surface (where the bone's field is nil) the plate wins exactly
    where ``U(x - shift n) > 0.5``: the surface moved by ``shift`` along ``n``. Inside the bone + plate
    ``U`` is 1 on both sides of the bone-cartilage interface, so that interface does not move. The addend
    is kept within ``shift + 3 sigma`` of the plate, so bare bone away from the plate gets none; next to
    the plate's rim a bare-bone band that narrow can become cartilage (the rim grows, its interior not)."""
    from scipy import ndimage

    structure = schema.by_name(plate)
    spacing = np.asarray(original.spacing)
    box = bounding_box(np.asarray(original.array) == structure.id,
                       margin=int(np.ceil((shift_mm + 4.0 * sigma_mm + 1.0) / spacing.min())))
    sub = np.asarray(original.array)[box]
    union = np.isin(sub, [*schema.bone_ids(structure.bone), structure.id])
    near_plate = ndimage.distance_transform_edt(sub != structure.id, sampling=spacing) <= shift_mm + 3.0 * sigma_mm
    u = ndimage.gaussian_filter(union.astype(np.float32), sigma_mm / spacing)
    wide = ndimage.gaussian_filter(union.astype(np.float32), normal_sigma_mm / spacing)
    linear = original.affine[:3, :3]
    grad_world = np.stack(np.gradient(wide), axis=-1) @ np.linalg.inv(linear)  # per mm, world axes
    norm = np.linalg.norm(grad_world, axis=-1, keepdims=True)
    outward_idx = (-grad_world / np.maximum(norm, 1e-9)) @ np.linalg.inv(linear).T  # index units per mm
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in u.shape], indexing="ij"), axis=-1)
    moved_from = np.moveaxis(idx - shift_mm * outward_idx, -1, 0)
    shifted = ndimage.map_coordinates(u, moved_from, order=1, mode="nearest")
    return structure.id, box, np.where(near_plate, 2.0 * (shifted - u), 0.0).astype(np.float32)
