"""Real anatomy at another pose, and a known thickening of a cartilage plate, for validation.

A label map is made a continuous anatomy (every label's indicator smoothed, then trilinearly
interpolated) and rasterized again on its own grid after a rigid motion (:func:`resample_smoothly`):
unlike changing the affine (which moves the grid with the anatomy), the voxel grid then cuts the anatomy
differently, as two visits' scans do. An :class:`ArticularShift` moves a plate's articular surface in
that continuous anatomy outward by a known distance, so the plate thickens by that many mm wherever it
covers its bone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume, bounding_box


@dataclass(frozen=True, eq=False)
class ArticularShift:
    """The articular surface of plate ``label`` moved outward by ``shift_mm`` along the bone's normals,
    its bone side left alone: the plate thickens by ``shift_mm`` measured along the bone normal.

    With ``U`` the smoothed indicator of bone + plate and ``n`` the bone's outward normal (the gradient
    of its indicator smoothed by ``normal_sigma_mm``), the plate's field at a point ``x`` gets
    ``2 (U(x - shift n(x)) - U(x))``, all fields read by the same trilinear interpolation. The smoothed
    indicators of all labels sum to 1, so at the articular surface (where the bone's field is nil) the
    plate wins exactly where ``U(x - shift n(x)) > 0.5``: the continuous surface moved by ``shift`` along
    ``n``, so a ray along the bone normal crosses it ``shift`` farther out. Where the plate is thinner
    than about 1 mm the bone's field is not nil there, and the surface moves a little farther (use
    :func:`thickening_along` for the exact amount). Inside the bone + plate ``U`` is 1 on both sides of
    the bone-cartilage interface, so that interface does not move. The addend is kept within
    ``shift + 3 sigma`` of the plate, so bare bone away from it gets none; next to the plate's rim a
    bare-bone band that narrow can become cartilage (the rim grows, its interior does not).

    Attributes:
        label: the plate's label.
        shift_mm: outward displacement of its articular surface (mm).
        sigma_mm: smoothing of the continuous anatomy it was built for (:func:`resample_smoothly`).
        box: index box of the label grid holding the plate (and the fields below).
        union: smoothed indicator of bone + plate on the box.
        outward_idx: (3, ...) outward unit normal of the bone, in index units per mm.
        near_plate: where the addend applies (within ``shift + 3 sigma`` of the plate).
    """

    label: int
    shift_mm: float
    sigma_mm: float
    box: tuple[slice, slice, slice]
    union: np.ndarray
    outward_idx: np.ndarray
    near_plate: np.ndarray

    @classmethod
    def build(cls, original: Volume, schema: LabelSchema, plate: str, shift_mm: float, *,
              sigma_mm: float = 0.35, normal_sigma_mm: float = 1.5) -> ArticularShift:
        """The shift of ``plate`` of the label map ``original`` (smoothing ``sigma_mm`` as the
        continuous anatomy of :func:`resample_smoothly`)."""
        from scipy import ndimage

        structure = schema.by_name(plate)
        spacing = np.asarray(original.spacing)
        box = bounding_box(np.asarray(original.array) == structure.id,
                           margin=int(np.ceil((shift_mm + 4.0 * sigma_mm + 1.0) / spacing.min())))
        if box is None:
            raise ValueError(f"no {plate} in the label map")
        sub = np.asarray(original.array)[box]
        bone = np.isin(sub, schema.bone_ids(structure.bone))
        union = (bone | (sub == structure.id)).astype(np.float32)
        to_plate = ndimage.distance_transform_edt(sub != structure.id, sampling=spacing)
        wide = ndimage.gaussian_filter(bone.astype(np.float64), normal_sigma_mm / spacing)
        inv_linear = np.linalg.inv(original.affine[:3, :3])
        grad_world = np.einsum("a...,ab->b...", np.stack(np.gradient(wide)), inv_linear)  # per mm, world axes
        outward = -grad_world / np.maximum(np.linalg.norm(grad_world, axis=0), 1e-9)
        outward_idx = np.einsum("ab,b...->a...", inv_linear, outward).astype(np.float32)
        return cls(structure.id, shift_mm, sigma_mm, box, ndimage.gaussian_filter(union, sigma_mm / spacing),
                   outward_idx, to_plate <= shift_mm + 3.0 * sigma_mm)

    def addend(self, idx: np.ndarray) -> np.ndarray:
        """The plate field's addend at fractional indices ``idx`` (3, N) of the label grid."""
        from scipy import ndimage

        local = idx - np.array([s.start for s in self.box], dtype=idx.dtype)[:, None]
        shape = np.array(self.union.shape)[:, None]
        inside = np.all((local >= 0) & (local <= shape - 1), axis=0)
        out = np.zeros(idx.shape[1], dtype=np.float32)
        pts = local[:, inside]
        near = ndimage.map_coordinates(self.near_plate.view(np.uint8), pts, order=0, mode="nearest") > 0
        pts = pts[:, near]
        normal = np.stack([ndimage.map_coordinates(axis, pts, order=1, mode="nearest")
                           for axis in self.outward_idx])
        here = ndimage.map_coordinates(self.union, pts, order=1, mode="nearest")
        there = ndimage.map_coordinates(self.union, pts - self.shift_mm * normal, order=1, mode="nearest")
        values = np.zeros(inside.sum(), dtype=np.float32)
        values[near] = 2.0 * (there - here)
        out[inside] = values
        return out


def resample_smoothly(original: Volume, motion: np.ndarray, sigma_mm: float = 0.35,
                      change: ArticularShift | None = None,
                      grid: tuple[tuple[int, int, int], np.ndarray] | None = None) -> Volume:
    """``original``'s anatomy moved by the rigid ``motion`` (4x4, world mm) and rasterized again on the
    original grid, or on ``grid`` (shape, affine) when given: every label's indicator is smoothed
    (Gaussian, ``sigma_mm``) into a continuous anatomy, sampled trilinearly at the moved voxel centres, and
    each voxel takes the label of the largest value; ``change`` (built with the same ``sigma_mm``)
    thickens one plate of that anatomy."""
    from scipy import ndimage

    if change is not None and change.sigma_mm != sigma_mm:
        raise ValueError(f"the change was built for {change.sigma_mm} mm smoothing, not {sigma_mm} mm")
    arr = np.asarray(original.array)
    shape, affine = grid if grid is not None else (arr.shape, original.affine)
    to_original = np.linalg.inv(original.affine) @ np.linalg.inv(motion) @ affine  # target index -> index
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), 0)
    src = np.tensordot(to_original[:3, :3].astype(np.float32), idx, axes=1)
    src += to_original[:3, 3].astype(np.float32)[:, None, None, None]
    del idx
    best = np.full(shape, -1.0, dtype=np.float32)
    out = np.zeros(shape, dtype=arr.dtype)
    sigma = sigma_mm / np.asarray(original.spacing)
    for label in np.unique(arr):
        field = ndimage.gaussian_filter((arr == label).astype(np.float32), sigma)
        value = ndimage.map_coordinates(field, src, order=1, mode="nearest")
        if change is not None and change.label == label:
            value += change.addend(src.reshape(3, -1)).reshape(value.shape)
        better = value > best
        best[better], out[better] = value[better], label
    return Volume(out, np.asarray(affine, dtype=np.float64).copy(), original.meta)


def grid_with_spacing(original: Volume,
                      spacing: tuple[float, float, float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) covering ``original``'s field of view with voxels of ``spacing`` (mm, its array axes,
    same directions)."""
    old = np.asarray(original.spacing)
    new = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(original.shape) * old
    shape = tuple(int(n) for n in np.maximum(1, np.round(extent / new)))
    affine = original.affine.copy()
    affine[:3, :3] = original.direction * new
    # The first voxel's outer face stays where the original's was.
    affine[:3, 3] = original.world_coords(np.zeros(3)) + original.direction @ ((new - old) / 2.0)
    return shape, affine


def thickening_along(original: Volume, change: ArticularShift, points_mm: np.ndarray,
                     directions: np.ndarray, *, step_mm: float = 0.01, max_mm: float = 8.0,
                     chunk: int = 1000) -> np.ndarray:
    """How much farther (mm) each ray leaves ``change``'s plate in the continuous anatomy (smoothed as
    ``change`` was built for) with the change than without: the exact thickening along rays from ``points_mm`` (N, 3, world mm of ``original``, on
    the bone surface) in unit ``directions`` (N, 3). NaN where a ray never meets the plate."""
    from scipy import ndimage

    arr = np.asarray(original.array)[change.box]
    labels = np.unique(arr)
    sigma = change.sigma_mm / np.asarray(original.spacing)
    fields = np.stack([ndimage.gaussian_filter((arr == label).astype(np.float32), sigma) for label in labels])
    plate = int(np.flatnonzero(labels == change.label)[0])
    inv = np.linalg.inv(original.affine)
    start = np.array([s.start for s in change.box], dtype=np.float64)
    origin_idx = points_mm @ inv[:3, :3].T + inv[:3, 3] - start
    step_idx = directions @ inv[:3, :3].T
    depths = np.arange(0.0, max_mm, step_mm)
    out = np.full(len(points_mm), np.nan)
    for lo in range(0, len(points_mm), chunk):
        o, d = origin_idx[lo:lo + chunk], step_idx[lo:lo + chunk]
        pos = (o[:, None, :] + depths[None, :, None] * d[:, None, :]).reshape(-1, 3).T
        values = np.stack([ndimage.map_coordinates(f, pos, order=1, mode="nearest") for f in fields])
        exits = []
        for with_change in (False, True):
            v = values.copy()
            if with_change:
                v[plate] += change.addend((pos + start[:, None]).astype(np.float32))
            inside = (np.argmax(v, axis=0) == plate).reshape(len(o), len(depths))
            exits.append(_end_of_first_run(inside) * step_mm)
        out[lo:lo + chunk] = exits[1] - exits[0]
    return out


def _end_of_first_run(inside: np.ndarray) -> np.ndarray:
    """Per row of a boolean (N, S) array, the index of the last true of its first run of trues; NaN when
    the row has none."""
    first = np.argmax(inside, axis=1)
    after = np.where(np.arange(inside.shape[1])[None, :] >= first[:, None], ~inside, False)
    stop = np.where(after.any(axis=1), np.argmax(after, axis=1), inside.shape[1])
    return np.where(inside.any(axis=1), stop - 1.0, np.nan)
