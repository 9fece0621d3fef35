"""Analytic cartilage-thickness phantoms: a cartilage plate (label 2) on a bone (label 1).

Each phantom is defined by signed distance functions in a local frame (u, v, w) whose w axis is the
bone's outward normal at the plate's centre, rotated by ``rotation`` against the voxel grid and
shifted by ``offset_mm``; both labels are rasterized with partial volumes
(:func:`bml_pipeline.synth.raster.rasterize`) and a voxel takes a label when at least half of it lies
inside: bone where the bone fraction >= 0.5, cartilage where the bone+cartilage fraction >= 0.5 and the
voxel is not bone. The plate's edges run along the bone normals, so the thickness along the normal is
exactly the plate's thickness function everywhere on the interface, and the true area-weighted mean
thickness is known in closed form:

- ``flat_plate``: bone slab, plate ``0 <= w <= t(u)`` over an L x L square;
- ``cylinder_plate``: bone cylinder of radius R (axis v), plate ``R <= r <= R + t(theta)`` over an arc;
- ``sphere_plate``: bone ball of radius R, plate ``R <= r <= R + t`` over a polar cap.

``lesion_block`` is the volumetry counterpart: ellipsoidal lesions (label 7) inside a bone block
(label 1) with exactly known volumes, centres and diameters.

Thickness may vary smoothly: ``t = t0 + amplitude * sin(2 pi s)`` with ``s`` running over exactly one
period across the plate (u / L, or the arc angle), so its mean over the interface is exactly ``t0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bml_pipeline.synth.raster import SDF, rasterize
from bml_pipeline.volume import Volume, VolumeMeta

BONE, CARTILAGE = 1, 2
MARGIN_MM = 6.0
"""Bone extends this far beyond the plate's edge (mm), so the interface normals near the edge are
those of the bone surface, not of its rim."""


@dataclass(frozen=True)
class PlatePhantom:
    """A rasterized plate phantom with its analytic truth.

    Attributes:
        labels: uint16 label Volume (0 background, 1 bone, 2 cartilage).
        mean_thickness_mm: exact area-weighted mean thickness over the bone-cartilage interface.
        interface_area_mm2: exact area of the interface.
        description: human-readable parameters.
    """

    labels: Volume
    mean_thickness_mm: float
    interface_area_mm2: float
    description: str


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation R = Rz(c) @ Ry(b) @ Rx(a) for angles (a, b, c) in degrees about the world x, y, z axes."""
    a, b, c = np.radians(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def flat_plate(thickness_mm: float, spacing: Sequence[float], *, angles_deg: Sequence[float] = (0, 0, 0),
               size_mm: float = 30.0, amplitude_mm: float = 0.0, bone_depth_mm: float = 5.0,
               offset_mm: Sequence[float] = (0.0, 0.0, 0.0), supersample: int = 4) -> PlatePhantom:
    """Flat plate of thickness ``t(u) = t0 + amplitude sin(2 pi u / L)`` over a ``size_mm`` square.

    The bone slab is ``bone_depth_mm`` deep and ``MARGIN_MM`` wider than the plate on every side.
    """
    t0, amp, half = float(thickness_mm), float(amplitude_mm), 0.5 * float(size_mm)
    _check(t0, amp)
    k = 2.0 * np.pi / size_mm
    lip = np.sqrt(1.0 + (amp * k) ** 2)  # Lipschitz bound of w - t(u)

    def bone(p: np.ndarray) -> np.ndarray:
        u, v, w = p.T
        return np.maximum.reduce([np.abs(u) - half - MARGIN_MM, np.abs(v) - half - MARGIN_MM, w, -w - bone_depth_mm])

    def plate(p: np.ndarray) -> np.ndarray:
        u, v, w = p.T
        return np.maximum.reduce([np.abs(u) - half, np.abs(v) - half, -w, (w - t0 - amp * np.sin(k * u)) / lip])

    box = ((-half - MARGIN_MM, -half - MARGIN_MM, -bone_depth_mm), (half + MARGIN_MM, half + MARGIN_MM, t0 + amp))
    desc = f"flat plate t={t0:g}+{amp:g}sin mm, {size_mm:g} mm square, angles {tuple(angles_deg)} deg"
    return _build(bone, plate, box, spacing, angles_deg, offset_mm, supersample, t0, size_mm ** 2, desc)


def cylinder_plate(thickness_mm: float, radius_mm: float, spacing: Sequence[float], *,
                   angles_deg: Sequence[float] = (0, 0, 0), arc_deg: float = 100.0, length_mm: float = 30.0,
                   amplitude_mm: float = 0.0, offset_mm: Sequence[float] = (0.0, 0.0, 0.0),
                   supersample: int = 4) -> PlatePhantom:
    """Plate on a bone cylinder (radius ``radius_mm``, axis u), over an arc of ``arc_deg`` around +w;
    thickness ``t0 + amplitude sin(2 pi theta / arc)`` (theta from +w, radians)."""
    t0, amp, r0 = float(thickness_mm), float(amplitude_mm), float(radius_mm)
    _check(t0, amp)
    arc = np.radians(arc_deg)
    if not 0 < arc < np.pi:
        raise ValueError("arc_deg must be in (0, 180)")
    k = 2.0 * np.pi / arc
    lip = np.sqrt(1.0 + (amp * k / r0) ** 2)
    half_len = 0.5 * float(length_mm)
    # Wedge |theta| <= arc/2 as two half-spaces through the axis.
    n1 = np.array([0.0, np.cos(arc / 2), -np.sin(arc / 2)])   # in (u, v, w); theta measured from +w in the v-w plane
    n2 = np.array([0.0, -np.cos(arc / 2), -np.sin(arc / 2)])

    floor = r0 * np.cos(min(arc / 2 + MARGIN_MM / r0, np.pi)) - MARGIN_MM  # bone below the arc, cut flat

    def bone(p: np.ndarray) -> np.ndarray:
        u, v, w = p.T
        return np.maximum.reduce([np.hypot(v, w) - r0, np.abs(u) - half_len - MARGIN_MM, floor - w])

    def plate(p: np.ndarray) -> np.ndarray:
        u, v, w = p.T
        r = np.hypot(v, w)
        theta = np.arctan2(v, w)
        return np.maximum.reduce([r0 - r, (r - r0 - t0 - amp * np.sin(k * theta)) / lip,
                                  p @ n1, p @ n2, np.abs(u) - half_len])

    area = r0 * arc * length_mm
    top = r0 + t0 + amp
    box = ((-half_len - MARGIN_MM, -top, max(floor, -top)), (half_len + MARGIN_MM, top, top))
    desc = f"cylinder plate t={t0:g}+{amp:g}sin mm, R={r0:g} mm, arc {arc_deg:g} deg, angles {tuple(angles_deg)} deg"
    return _build(bone, plate, box, spacing, angles_deg, offset_mm, supersample, t0, area, desc)


def sphere_plate(thickness_mm: float, radius_mm: float, spacing: Sequence[float], *,
                 angles_deg: Sequence[float] = (0, 0, 0), cap_deg: float = 50.0,
                 offset_mm: Sequence[float] = (0.0, 0.0, 0.0), supersample: int = 4) -> PlatePhantom:
    """Plate of constant thickness on a bone ball (radius ``radius_mm``) over the polar cap of
    half-angle ``cap_deg`` around +w."""
    t0, r0 = float(thickness_mm), float(radius_mm)
    _check(t0, 0.0)
    cap = np.radians(cap_deg)
    if not 0 < cap < np.pi / 2:
        raise ValueError("cap_deg must be in (0, 90)")

    floor = r0 * np.cos(min(cap + MARGIN_MM / r0, np.pi)) - MARGIN_MM  # bone below the cap, cut flat

    def bone(p: np.ndarray) -> np.ndarray:
        return np.maximum(np.linalg.norm(p, axis=1) - r0, floor - p[:, 2])

    def plate(p: np.ndarray) -> np.ndarray:
        r = np.linalg.norm(p, axis=1)
        polar = np.arccos(np.clip(p[:, 2] / np.maximum(r, 1e-12), -1.0, 1.0))
        cone = r * np.sin(np.clip(polar - cap, -np.pi / 2, np.pi / 2))
        return np.maximum.reduce([r0 - r, r - r0 - t0, cone])

    area = 2.0 * np.pi * r0 ** 2 * (1.0 - np.cos(cap))
    desc = f"sphere plate t={t0:g} mm, R={r0:g} mm, cap {cap_deg:g} deg, angles {tuple(angles_deg)} deg"
    top = r0 + t0
    box = ((-top, -top, max(floor, -top)), (top, top, top))
    return _build(bone, plate, box, spacing, angles_deg, offset_mm, supersample, t0, area, desc)


LESION = 7


@dataclass(frozen=True)
class LesionPhantom:
    """Bone block with ellipsoidal lesions. Volumes mm3, centres world RAS mm, diameters mm (2 x the
    largest semi-axis), in the order the lesions were given."""

    labels: Volume
    volumes_mm3: tuple[float, ...]
    centres_mm: tuple[tuple[float, float, float], ...]
    diameters_mm: tuple[float, ...]


def lesion_block(lesions: Sequence[tuple[Sequence[float], Sequence[float]]], spacing: Sequence[float], *,
                 angles_deg: Sequence[float] = (0, 0, 0), block_mm: float = 40.0, supersample: int = 4) -> LesionPhantom:
    """A cubic bone block (label 1, ``block_mm`` wide, centred at the origin) holding ellipsoidal lesions
    (label 7), each given as (centre_mm, semi_axes_mm) in the block's frame; the block and lesions are
    rotated by ``angles_deg``. Lesion labels are volume-preserving: the voxels with the largest lesion
    fractions, as many as the fractions sum to (a plain 0.5 threshold loses a few % of a small convex
    lesion at 1.5 mm slices, which is the phantom's error, not the measurement's)."""
    rot = rotation_matrix(angles_deg)
    half = 0.5 * float(block_mm)
    items = [(np.asarray(c, dtype=np.float64), np.asarray(r, dtype=np.float64)) for c, r in lesions]
    for c, r in items:
        if np.any(r <= 0) or np.any(np.abs(c) + r.max() > half - 1.0):
            raise ValueError("lesions must have positive semi-axes and lie 1 mm inside the block")

    def block(p: np.ndarray) -> np.ndarray:
        return np.abs(p @ rot).max(axis=1) - half

    def ellipsoid(c: np.ndarray, r: np.ndarray):
        # Lower bound of an ellipsoid's distance: scaled sphere distance times the smallest semi-axis.
        return lambda p: (np.linalg.norm((p @ rot - c) / r, axis=1) - 1.0) * r.min()

    spacing_arr = np.asarray(spacing, dtype=np.float64)
    corners = np.array([[x, y, z] for x in (-half, half) for y in (-half, half) for z in (-half, half)]) @ rot.T
    lo = np.floor(corners.min(axis=0) / spacing_arr) - 2
    shape = tuple(int(n) for n in np.ceil(corners.max(axis=0) / spacing_arr) + 2 - lo + 1)
    affine = np.diag([*spacing_arr, 1.0])
    affine[:3, 3] = lo * spacing_arr
    labels = np.zeros(shape, dtype=np.uint16)
    labels[rasterize(block, shape, affine, supersample) >= 0.5] = BONE
    for c, r in items:
        frac = rasterize(ellipsoid(c, r), shape, affine, supersample).ravel()
        candidates = np.flatnonzero(frac > 0)
        count = round(float(frac.sum(dtype=np.float64)))
        order = np.argsort(-frac[candidates], kind="stable")[:count]
        labels.ravel()[candidates[order]] = LESION
    meta = VolumeMeta(source="synthetic:lesion block")
    return LesionPhantom(
        Volume(labels, affine, meta),
        tuple(float(4.0 / 3.0 * np.pi * np.prod(r)) for _, r in items),
        tuple(tuple(float(x) for x in rot @ c) for c, _ in items),
        tuple(float(2.0 * r.max()) for _, r in items),
    )


def _check(t0: float, amp: float) -> None:
    if t0 <= 0 or amp < 0 or amp >= t0:
        raise ValueError("thickness must be > 0 and 0 <= amplitude < thickness")


def _build(bone: SDF, plate: SDF, box: tuple[tuple[float, float, float], tuple[float, float, float]],
           spacing: Sequence[float], angles_deg: Sequence[float], offset_mm: Sequence[float], supersample: int,
           mean_t: float, area: float, desc: str) -> PlatePhantom:
    """Rasterize local-frame SDFs rotated by ``angles_deg`` and shifted by ``offset_mm`` on a grid of
    ``spacing`` (mm, axis-aligned RAS) that holds the rotated local box ``box`` (lo, hi) + 2 voxels."""
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    rot = rotation_matrix(angles_deg)
    offset = np.asarray(offset_mm, dtype=np.float64)
    corners = np.array([[x, y, z] for x in (box[0][0], box[1][0]) for y in (box[0][1], box[1][1])
                        for z in (box[0][2], box[1][2])]) @ rot.T
    lo = np.floor(corners.min(axis=0) / spacing_arr) - 2
    hi = np.ceil(corners.max(axis=0) / spacing_arr) + 2
    shape = tuple(int(n) for n in hi - lo + 1)
    affine = np.diag([*spacing_arr, 1.0])
    affine[:3, 3] = lo * spacing_arr

    def local(sdf: SDF) -> SDF:
        return lambda p: sdf((p - offset) @ rot)  # rows: R^T (p - offset)

    def union(p: np.ndarray) -> np.ndarray:
        q = (p - offset) @ rot
        return np.minimum(bone(q), plate(q))

    bone_frac = rasterize(local(bone), shape, affine, supersample)
    union_frac = rasterize(union, shape, affine, supersample)
    labels = np.zeros(shape, dtype=np.uint16)
    labels[union_frac >= 0.5] = CARTILAGE
    labels[bone_frac >= 0.5] = BONE
    meta = VolumeMeta(source=f"synthetic:{desc}")
    return PlatePhantom(Volume(labels, affine, meta), float(mean_t), float(area), desc)
