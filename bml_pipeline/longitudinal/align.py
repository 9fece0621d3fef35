"""Per-bone rigid alignment of a follow-up label map to its baseline.

Each bone is registered on its own (bones move relative to each other between visits) with SimpleITK:
truncated signed distance maps of the bone (bone + lesion labels) are matched with mean squares,
multi-resolution, starting from the shift between the centroids of the bone's *epiphysis* (its voxels
within ``region_mm`` of its cartilage plate) and, when that fit stays poor (large rotations), also from
the best of the four poses that map the epiphysis' principal axes onto each other. The metric only
counts points of that epiphysis band that are away from both scans' field-of-view faces, so a shaft cut
at a different height in the follow-up does not pull the alignment.

That pose is then refined on the label maps' own resolution by symmetric point-to-plane ICP between
the two sub-voxel epiphysis surfaces (:mod:`bml_pipeline.longitudinal.icp`); the pooled grid alone
leaves rotation errors of about 0.5 deg.

The result maps baseline world points (RAS mm) to follow-up world points. The residual is the mean
symmetric surface distance (mm) between the two epiphysis surfaces after alignment; a large residual
means the scans are not of the same bone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema
from bml_pipeline.longitudinal.icp import Surface, bone_surface, refine
from bml_pipeline.longitudinal.transform import RigidTransform
from bml_pipeline.volume import Volume, bounding_box

log = logging.getLogger(__name__)

_FLIP = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
_MAX_SURFACE_POINTS = 20000


@dataclass(frozen=True)
class AlignConfig:
    """Parameters of the per-bone registration (lengths in mm).

    Attributes:
        region_mm: the epiphysis is the bone within this distance of its cartilage plate.
        band_mm: signed distance maps are truncated at +-band_mm; points nearer than this to a scan's
            field-of-view face are ignored.
        pool_mm: label maps are pooled (majority vote) to voxels of at most about this size before the
            distance maps are computed (0.365 mm in-plane becomes 0.73 mm).
        grid_mm: spacing of the isotropic grid the distance maps are registered on.
        shrink_factors: multi-resolution pyramid, coarse to fine (in units of ``grid_mm``).
        smoothing_mm: Gaussian sigma per pyramid level (mm).
        iterations: optimizer iterations per level.
        sampling: fraction of masked fixed points sampled by the metric (fixed seed: deterministic).
        seed: random seed of the metric sampling.
        threads: SimpleITK threads; fixed, because the metric's partial sums depend on the thread count
            (same count, same result on any machine).
        max_residual_mm: a residual above this means the two scans are not of the same bone.
        min_coverage: least fraction of the baseline epiphysis surface that must map into the follow-up's
            field of view for the alignment to be trusted.
    """

    region_mm: float = 30.0
    band_mm: float = 3.0
    pool_mm: float = 0.75
    grid_mm: float = 1.0
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    iterations: int = 200
    sampling: float = 0.25
    seed: int = 20240601
    threads: int = 2
    max_residual_mm: float = 1.0
    min_coverage: float = 0.5


@dataclass(frozen=True, eq=False)
class BoneAlignment:
    """Alignment of one bone from baseline to follow-up.

    Attributes:
        bone: bone name in the label schema.
        transform: baseline world (RAS mm) -> follow-up world (RAS mm).
        centre_mm: centroid (RAS mm) of the baseline epiphysis; ``translation_mm`` is measured there.
        residual_mm: mean symmetric surface distance (mm) of the epiphyses after alignment.
        residual_p95_mm: 95th percentile of the same distances.
        coverage: fraction of the baseline epiphysis surface that lies inside the follow-up's view.
    """

    bone: str
    transform: RigidTransform
    centre_mm: np.ndarray
    residual_mm: float
    residual_p95_mm: float
    coverage: float

    @property
    def rotation_deg(self) -> float:
        return self.transform.rotation_deg

    @property
    def translation_vector_mm(self) -> np.ndarray:
        """Displacement (RAS mm) of the baseline epiphysis centroid."""
        return self.transform.displacement_at(self.centre_mm)

    @property
    def translation_mm(self) -> float:
        return float(np.linalg.norm(self.translation_vector_mm))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (degrees, mm; matrix maps baseline RAS mm to follow-up RAS mm)."""
        return {
            "rotation_deg": round(self.rotation_deg, 4),
            "translation_mm": round(self.translation_mm, 4),
            "residual": round(self.residual_mm, 4),
            "residual_p95_mm": round(self.residual_p95_mm, 4),
            "coverage": round(self.coverage, 4),
            "translation_vector_mm": [round(float(v), 4) for v in self.translation_vector_mm],
            "centre_mm": [round(float(v), 4) for v in self.centre_mm],
            "matrix": [[round(float(v), 8) for v in row] for row in self.transform.matrix],
        }


@dataclass(frozen=True, eq=False)
class _BoneField:
    """Per-scan data of one bone: truncated signed distance map on a crop, masks, surface points."""

    sdf: Volume            # float32 truncated SDF (mm, negative inside) on a crop of the label grid
    fixed_mask: np.ndarray  # metric mask on sdf's grid: near-surface epiphysis band, inside the view
    interior: np.ndarray    # sdf's grid voxels farther than band_mm from the scan's field-of-view faces
    region_points: np.ndarray  # (N, 3) RAS mm of epiphysis voxels (initialisation)
    surface: np.ndarray     # (M, 3) RAS mm points on the epiphysis surface, inside the view
    mesh: Surface           # sub-voxel epiphysis surface at the label map's resolution (ICP refinement)


def align_bone(baseline: Volume, followup: Volume, schema: LabelSchema, bone: str, *,
               config: AlignConfig | None = None) -> BoneAlignment:
    """Rigidly align ``bone`` of the follow-up label map to the baseline's.

    Args:
        baseline, followup: label maps (any grids, any axis order) of the same knee.
        schema: label schema (bone + lesion labels form the bone; its cartilage plate defines the epiphysis).
        bone: bone name, e.g. ``"femur"``.
        config: registration parameters.

    Raises:
        InputError: the bone is absent from either label map.
    """
    config = config or AlignConfig()
    fixed = _bone_field(baseline, schema, bone, config)
    moving = _bone_field(followup, schema, bone, config)
    images = (*_to_sitk(fixed.sdf, fixed.fixed_mask, config), *_to_sitk(moving.sdf, moving.interior, config))
    centre = fixed.region_points.mean(axis=0)
    candidates = _initial_poses(fixed.region_points, moving.region_points)
    # Start from the centroid shift (knees are scanned in similar poses; a bone that is symmetric about an
    # axis then keeps its orientation); the principal-axes poses are tried only when that fit is poor.
    best = _register(images, candidates[0], centre, config, bone)
    result = _finish(bone, best, centre, fixed, moving)
    if result.residual_mm > config.max_residual_mm:
        scores = [_pose_score(fixed, moving, pose) for pose in candidates[1:]]
        log.debug("%s: residual %.2f mm from the centroid start; principal-axes scores %s", bone,
                  result.residual_mm, np.round(scores, 3).tolist())
        other = _finish(bone, _register(images, candidates[1 + int(np.argmin(scores))], centre, config, bone),
                        centre, fixed, moving)
        if other.residual_mm < result.residual_mm:
            result = other
    refined = _finish(bone, refine(fixed.mesh, moving.mesh, result.transform), centre, fixed, moving)
    return refined if refined.residual_mm <= result.residual_mm + 0.05 else result


def _register(images, start: RigidTransform, centre: np.ndarray, config: AlignConfig, bone: str) -> RigidTransform:
    """Multi-resolution mean-squares registration of the SDF images from ``start`` (rotation about ``centre``)."""
    import SimpleITK as sitk

    f_img, f_mask, m_img, m_mask = images
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(config.threads)
    method.SetMetricAsMeanSquares()
    method.SetMetricFixedMask(f_mask)
    method.SetMetricMovingMask(m_mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(config.sampling, config.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                    numberOfIterations=config.iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    transform = _to_itk(start, centre)
    method.SetInitialTransform(transform, inPlace=True)
    method.SetShrinkFactorsPerLevel(list(config.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(config.smoothing_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.Execute(f_img, m_img)
    log.debug("%s: metric %.4f after %d iterations (%s)", bone, method.GetMetricValue(),
              method.GetOptimizerIteration(), method.GetOptimizerStopConditionDescription())
    return _from_itk(transform)


def _finish(bone: str, transform: RigidTransform, centre: np.ndarray, fixed: _BoneField,
            moving: _BoneField) -> BoneAlignment:
    distances, coverage = _surface_distances(fixed, moving, transform)
    return BoneAlignment(
        bone=bone, transform=transform, centre_mm=centre,
        residual_mm=float(distances.mean()) if distances.size else float("inf"),
        residual_p95_mm=float(np.percentile(distances, 95)) if distances.size else float("inf"),
        coverage=coverage,
    )


# ---- per-scan preparation ---------------------------------------------------------------------

def label_mask(array: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
    """Boolean mask of the voxels whose label is one of ``ids`` (a lookup table: faster than np.isin)."""
    lut = np.zeros(max(int(array.max()), *ids) + 1, dtype=bool)
    lut[list(ids)] = True
    return lut[array]


def _bone_field(labels: Volume, schema: LabelSchema, bone: str, config: AlignConfig) -> _BoneField:
    from scipy import ndimage

    bone_mask = label_mask(labels.array, schema.bone_ids(bone))
    if not bone_mask.any():
        raise InputError(labels.meta.source, f"no {bone} voxels in the label map; cannot align it")
    plate = schema.cartilage_of(bone)
    cart_mask = labels.array == plate.id if plate is not None else np.zeros_like(bone_mask)
    spacing = np.asarray(labels.spacing)
    band_vox = np.ceil(config.band_mm / spacing).astype(int) + 1
    if cart_mask.any():
        margin = np.ceil((config.region_mm + 2 * config.band_mm) / spacing).astype(int) + 1
        near = _grow(bounding_box(cart_mask), margin, labels.shape)
        box = _intersect(near, _grow(bounding_box(bone_mask), band_vox, labels.shape))
    else:
        log.warning("%s: no %s cartilage; the whole bone drives its alignment", labels.meta.source, bone)
        box = _grow(bounding_box(bone_mask), band_vox, labels.shape)
    interior = np.zeros(labels.shape, dtype=bool)
    interior[tuple(slice(int(m), max(int(n - m), int(m))) for m, n in zip(band_vox, labels.shape))] = True
    # Work on a grid pooled to about pool_mm (distance maps are the cost; the registration grid is coarser).
    factors = np.maximum(1, np.floor(config.pool_mm / spacing)).astype(int)
    affine = _pooled_affine(labels.crop(box).affine, factors)
    bone_c = _pool(bone_mask[box], factors, "majority")
    cart_c = _pool(cart_mask[box], factors, "any")
    interior = _pool(interior[box], factors, "all")
    spacing = spacing * factors

    inside = ndimage.distance_transform_edt(bone_c, sampling=spacing)
    outside = ndimage.distance_transform_edt(~bone_c, sampling=spacing)
    sdf = np.clip(np.where(bone_c, -inside, outside), -config.band_mm, config.band_mm).astype(np.float32)

    if cart_c.any():
        to_cart = _coarse_distance(cart_c, spacing)
        region = bone_c & (to_cart <= config.region_mm)
        near_region = to_cart <= config.region_mm + config.band_mm
    else:
        region, near_region = bone_c, np.ones_like(bone_c)

    if not (region & interior).any():
        raise InputError(labels.meta.source, f"the {bone} near its cartilage lies at the edge of the field of view")
    fixed_mask = (np.abs(sdf) < config.band_mm) & near_region & interior
    sdf_volume = Volume(sdf, affine, labels.meta)
    region_points = sdf_volume.world_coords(np.argwhere(region & interior)[:: max(1, int(region.sum()) // 50000)])
    surface = _surface_points(sdf_volume, bone_c, region & interior)
    keep_native = _unpool(region & interior, factors, bone_mask[box].shape)
    mesh = bone_surface(bone_mask[box], labels.crop(box).affine, keep_native)
    return _BoneField(sdf_volume, fixed_mask, interior, region_points, surface, mesh)


def _unpool(mask: np.ndarray, factors: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A pooled ``mask`` repeated back to the native grid of ``shape``."""
    for axis, f in enumerate(factors):
        mask = np.repeat(mask, f, axis=axis)
    return mask[tuple(slice(0, n) for n in shape)]


def _coarse_distance(mask: np.ndarray, spacing: np.ndarray, target_mm: float = 1.5) -> np.ndarray:
    """Distance (mm) to ``mask``, computed on a grid pooled to about ``target_mm`` (accurate to ~1 voxel)."""
    from scipy import ndimage

    factors = np.maximum(1, np.floor(target_mm / spacing)).astype(int)
    dist = ndimage.distance_transform_edt(~_pool(mask, factors, "any"), sampling=spacing * factors)
    for axis, f in enumerate(factors):
        dist = np.repeat(dist, f, axis=axis)
    return dist[tuple(slice(0, n) for n in mask.shape)]


def _pool(mask: np.ndarray, factors: np.ndarray, how: str) -> np.ndarray:
    """``mask`` pooled over blocks of ``factors`` voxels (the last partial block padded with False):
    ``"majority"`` (at least half true), ``"any"`` or ``"all"``."""
    if np.all(factors == 1):
        return mask
    shape = [int(np.ceil(n / f) * f) for n, f in zip(mask.shape, factors)]
    padded = np.zeros(shape, dtype=bool)
    padded[tuple(slice(0, n) for n in mask.shape)] = mask
    blocks = padded.reshape(shape[0] // factors[0], factors[0], shape[1] // factors[1], factors[1],
                            shape[2] // factors[2], factors[2])
    if how == "any":
        return blocks.any(axis=(1, 3, 5))
    if how == "all":
        return blocks.all(axis=(1, 3, 5))
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32) >= 0.5


def _pooled_affine(affine: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Affine of the grid pooled by ``factors`` (voxel centres at the block centres)."""
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors.astype(np.float64))
    scale[:3, 3] = (factors - 1) / 2.0
    return affine @ scale


def _surface_points(crop: Volume, mask: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """RAS mm midpoints of the faces between ``mask`` voxels and their non-mask 6-neighbours (where
    ``keep`` holds on the mask side), subsampled evenly to at most ``_MAX_SURFACE_POINTS``."""
    points = []
    for axis in range(3):
        for step in (1, -1):
            shifted = np.roll(mask, -step, axis=axis)
            edge = np.zeros_like(mask)
            sl = [slice(None)] * 3
            sl[axis] = slice(0, -1) if step == 1 else slice(1, None)
            edge[tuple(sl)] = True
            face = mask & ~shifted & keep & edge
            ijk = np.argwhere(face).astype(np.float64)
            ijk[:, axis] += 0.5 * step
            points.append(ijk)
    ijk = np.concatenate(points)
    ijk = ijk[:: max(1, len(ijk) // _MAX_SURFACE_POINTS)]
    return crop.world_coords(ijk)


def _grow(box: tuple[slice, ...] | None, margin: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    assert box is not None
    return tuple(slice(max(s.start - int(m), 0), min(s.stop + int(m), n)) for s, m, n in zip(box, margin, shape))


def _intersect(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(x.start, y.start), max(min(x.stop, y.stop), max(x.start, y.start) + 1)) for x, y in zip(a, b))


# ---- initialisation ---------------------------------------------------------------------------

def _initial_poses(fixed_pts: np.ndarray, moving_pts: np.ndarray) -> list[RigidTransform]:
    """Candidate baseline->follow-up poses: centroid shift with no rotation, and the four proper rotations
    taking the baseline epiphysis' principal axes onto the follow-up's."""
    cf, cm = fixed_pts.mean(axis=0), moving_pts.mean(axis=0)
    vf = np.linalg.eigh(np.cov((fixed_pts - cf).T))[1]
    vm = np.linalg.eigh(np.cov((moving_pts - cm).T))[1]
    poses = [RigidTransform.from_rotation(np.eye(3), cm - cf)]
    for signs in product((1.0, -1.0), repeat=3):
        rot = vm @ np.diag(signs) @ vf.T
        if np.linalg.det(rot) > 0:
            poses.append(RigidTransform.from_rotation(rot, cm - rot @ cf))
    return poses


def _pose_score(fixed: _BoneField, moving: _BoneField, pose: RigidTransform) -> float:
    """Mean squared SDF difference (mm2) at the fixed surface points mapped by ``pose`` (points that land
    outside the moving view count as the full band): how well a candidate starting pose fits."""
    values, inside = _sample_sdf(moving, pose.apply(fixed.surface))
    full = np.full(len(inside), float(np.abs(moving.sdf.array).max()))
    full[inside] = values
    return float(np.mean(full**2))


# ---- SimpleITK bridges ------------------------------------------------------------------------

def _to_sitk(sdf: Volume, mask: np.ndarray, config: AlignConfig):
    """The SDF (linear) and mask (nearest) resampled to an isotropic ``grid_mm`` grid with the crop's
    orientation, as SimpleITK images in LPS."""
    import SimpleITK as sitk

    from bml_pipeline.io.orientation import itk_geometry_from_affine

    spacing, direction, origin = itk_geometry_from_affine(sdf.affine)
    images = []
    for array, pixel in ((sdf.array, sitk.sitkFloat32), (mask.astype(np.uint8), sitk.sitkUInt8)):
        img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        img = sitk.Cast(img, pixel)
        img.SetSpacing(spacing)
        img.SetDirection(direction)
        img.SetOrigin(origin)
        images.append(img)
    extent = np.asarray(sdf.shape) * np.asarray(spacing)
    size = [int(np.ceil(e / config.grid_mm)) for e in extent]
    out_origin = np.asarray(origin) + np.asarray(direction).reshape(3, 3) @ (
        (np.full(3, config.grid_mm) - np.asarray(spacing)) / 2.0)
    grid = {"size": size, "outputOrigin": tuple(out_origin.tolist()), "outputSpacing": (config.grid_mm,) * 3,
            "outputDirection": direction}
    sdf_img = sitk.Resample(images[0], transform=sitk.Transform(), interpolator=sitk.sitkLinear,
                            defaultPixelValue=float(config.band_mm), outputPixelType=sitk.sitkFloat32, **grid)
    mask_img = sitk.Resample(images[1], transform=sitk.Transform(), interpolator=sitk.sitkNearestNeighbor,
                             defaultPixelValue=0, outputPixelType=sitk.sitkUInt8, **grid)
    return sdf_img, mask_img


def _to_itk(pose: RigidTransform, centre_ras: np.ndarray):
    """A SimpleITK Euler3DTransform (LPS, rotation centre ``centre_ras``) equal to ``pose``."""
    import SimpleITK as sitk

    rot = _FLIP @ pose.rotation @ _FLIP
    trans = _FLIP @ pose.matrix[:3, 3]
    centre = _FLIP @ centre_ras
    tx = sitk.Euler3DTransform()
    tx.SetCenter(tuple(centre.tolist()))
    tx.SetMatrix(tuple(rot.ravel().tolist()))
    tx.SetTranslation(tuple((trans + rot @ centre - centre).tolist()))
    return tx


def _from_itk(tx) -> RigidTransform:
    """RAS rigid transform equal to a SimpleITK (LPS) matrix-offset transform."""
    rot = np.asarray(tx.GetMatrix()).reshape(3, 3)
    centre = np.asarray(tx.GetCenter())
    offset = np.asarray(tx.GetTranslation()) + centre - rot @ centre
    return RigidTransform.from_rotation(_FLIP @ rot @ _FLIP, _FLIP @ offset)


# ---- residual ---------------------------------------------------------------------------------

def _surface_distances(fixed: _BoneField, moving: _BoneField, transform: RigidTransform) -> tuple[np.ndarray, float]:
    """Distances (mm) of each epiphysis surface to the other after alignment (both directions, points
    that land inside the other scan's view only), and the fraction of baseline surface points that do."""
    d_fm, inside_fm = _sample_sdf(moving, transform.apply(fixed.surface))
    d_mf, _ = _sample_sdf(fixed, transform.inverse().apply(moving.surface))
    coverage = float(inside_fm.mean()) if inside_fm.size else 0.0
    return np.abs(np.concatenate([d_fm, d_mf])), coverage


def _sample_sdf(field: _BoneField, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear SDF values at RAS ``points`` that fall inside the field's view, and the in-view flags."""
    from scipy import ndimage

    ijk = field.sdf.voxel_coords(points)
    near = np.clip(np.round(ijk).astype(int), 0, np.asarray(field.sdf.shape) - 1)
    inside = np.all((ijk >= 0) & (ijk <= np.asarray(field.sdf.shape) - 1), axis=1)
    inside &= field.interior[near[:, 0], near[:, 1], near[:, 2]]
    values = ndimage.map_coordinates(field.sdf.array, ijk[inside].T, order=1, mode="nearest", prefilter=False)
    return values.astype(np.float64), inside
