"""Analytic knee phantom: a label map in the ``oai_zib`` schema with known volumes and thicknesses.

Build a :class:`KneeSpec` (side, pose, cartilage thickness, lesions), then :func:`make_phantom` on any
grid (any spacing, axis order or obliquity; :func:`phantom_grid` gives one that holds the knee).

Hard-label rule (volume-preserving nested threshold). Per bone, three nested sets are rasterized with
partial-volume-correct supersampling (:func:`~bml_pipeline.synth.raster.rasterize_with_distance`):
its lesions ``L``, the whole bone ``B`` (lesions included) and the bone with its cartilage ``B+C``.
From the inside out, each set keeps the voxels of the set inside it and adds the voxels with the
largest fractions (ties broken by the SDF at the voxel centre) until its voxel count equals the sum of
its fractions, rounded. This is a per-set threshold on the fraction, close to 0.5, chosen so that no
volume is gained or lost: a plain ``fraction >= 0.5`` loses volume on convex surfaces (a voxel whose
centre is just inside a curved surface holds less than half), about 0.5 % for a 0.8 cm3 lesion at
1.5 mm slices. Labels: lesion for ``L``, bone for ``B`` minus ``L``, cartilage for ``B+C`` minus ``B``.
Different bones are disjoint.

Truth (:class:`PhantomTruth`): reference volumes per structure (closed form, quadrature or a fine
numerical integration, named per structure), the rasterized hard-label volumes, the mean cartilage
thickness per plate (area-weighted over the bone-side surface the plate covers, see
:mod:`~bml_pipeline.synth.shells`), each lesion's volume and centre, the pose and the side.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from typing import Any

import numpy as np

from bml_pipeline.labels import LabelSchema, load_schema
from bml_pipeline.synth import anatomy as A
from bml_pipeline.synth.raster import rasterize_sparse, rasterize_with_distance
from bml_pipeline.synth.sdf import Blob, rotation_matrix
from bml_pipeline.volume import Volume, VolumeMeta

log = logging.getLogger(__name__)

OAI_SPACING = (0.7, 0.3646, 0.3646)
"""Spacing (mm) of the OAI DESS label maps along array axes (R, A, S): sagittal 0.7 mm slices."""


@dataclass(frozen=True)
class Pose:
    """Rigid placement of the knee in world (RAS mm): ``world = R @ local + t``.

    ``rotation_deg`` rotates about x, then y, then z (right-handed); ``translation_mm`` moves the knee's
    local origin (near the joint centre).
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix of the rigid transform."""
        m = np.eye(4)
        m[:3, :3] = rotation_matrix(self.rotation_deg)
        m[:3, 3] = self.translation_mm
        return m

    @staticmethod
    def random(rng: np.random.Generator, max_rotation_deg: float = 10.0, max_translation_mm: float = 5.0) -> Pose:
        """A pose with rotations and translations uniform in +-the given limits."""
        return Pose(tuple(float(v) for v in rng.uniform(-max_rotation_deg, max_rotation_deg, 3)),
                    tuple(float(v) for v in rng.uniform(-max_translation_mm, max_translation_mm, 3)))

    def to_dict(self) -> dict[str, Any]:
        return {"rotation_deg": list(self.rotation_deg), "translation_mm": list(self.translation_mm),
                "matrix": np.round(self.matrix(), 12).tolist()}


@dataclass(frozen=True)
class Lesion:
    """A bone marrow lesion: an irregular blob of exactly ``volume_cm3`` inside ``bone``.

    Attributes:
        bone: "femur", "tibia" or "patella".
        centre_mm: centre in the local knee frame of a right knee (mm).
        radii_mm: ellipsoid semi-axes giving the shape (rescaled to the volume).
        rotation_deg: orientation of the semi-axes (x, then y, then z).
        volume_cm3: exact volume.
        irregularity: amplitude of the smooth radial modulation (0 = ellipsoid; at most 0.25).
        seed: seed of the modulation's random waves.
    """

    bone: str
    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    volume_cm3: float
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    irregularity: float = 0.15
    seed: int = 0

    def blob(self) -> Blob:
        """The lesion's shape, scaled to ``volume_cm3``."""
        if not 0.0 <= self.irregularity <= 0.25:
            raise ValueError(f"lesion irregularity must be within [0, 0.25], got {self.irregularity}")
        rng = np.random.default_rng(self.seed)
        waves = []
        weights = rng.dirichlet(np.ones(4)) * self.irregularity
        for a in weights:
            w = rng.normal(size=3)
            w *= rng.uniform(1.5, 3.0) / np.linalg.norm(w)
            waves.append((float(a), *map(float, w), float(rng.uniform(0, 2 * np.pi))))
        rot = rotation_matrix(self.rotation_deg)
        unit = Blob(self.centre_mm, self.radii_mm, tuple(map(tuple, rot)), tuple(waves))
        if self.volume_cm3 <= 0:
            raise ValueError(f"lesion volume must be positive, got {self.volume_cm3} cm3")
        scale = (self.volume_cm3 * 1000.0 / unit.volume_mm3()) ** (1 / 3)
        return replace(unit, scale=scale)


DEFAULT_LESIONS = (
    Lesion("femur", (-A.CONDYLE_X, A.CONDYLE_Y - 11.0 * np.sin(np.deg2rad(15)),
                     A.CONDYLE_Z - 11.0 * np.cos(np.deg2rad(15))),
           (9.0, 11.0, 6.5), 3.0, rotation_deg=(-15.0, 0.0, 0.0), seed=1),
    Lesion("tibia", (17.0, -4.0, A.PLATEAU_TOP - 6.5), (8.0, 8.0, 4.0), 0.8, seed=2),
)


@dataclass(frozen=True)
class KneeSpec:
    """Everything that defines a phantom knee apart from the voxel grid.

    Attributes:
        side: "right" or "left" (the left knee is the mirror image in x).
        pose: rigid placement in world RAS mm.
        thickness: peak cartilage thicknesses.
        thickness_scale: per plate name, a factor on the thickness field (1.024 = +2.4 %).
        lesions: bone marrow lesions.
    """

    side: str = "right"
    pose: Pose = field(default_factory=Pose)
    thickness: A.Thickness = field(default_factory=A.Thickness)
    thickness_scale: tuple[tuple[str, float], ...] = ()
    lesions: tuple[Lesion, ...] = DEFAULT_LESIONS

    def __post_init__(self) -> None:
        if self.side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {self.side!r}")
        for plate, _ in self.thickness_scale:
            if plate not in A.PLATES.values():
                raise ValueError(f"unknown cartilage plate {plate!r}")
        for lesion in self.lesions:
            if lesion.bone not in A.BONES:
                raise ValueError(f"unknown bone {lesion.bone!r} for a lesion")

    def world_from_local(self) -> np.ndarray:
        """4x4 affine local knee frame -> world RAS mm (the mirror for a left knee, then the pose)."""
        mirror = np.diag([-1.0 if self.side == "left" else 1.0, 1.0, 1.0, 1.0])
        return self.pose.matrix() @ mirror

    def plates(self) -> dict[str, tuple]:
        return A.plates(self.thickness, dict(self.thickness_scale))


TRUTH_DEFINITIONS = {
    "reference_cm3": "exact volume of the analytic shape (closed form, surface quadrature, or a fine numerical "
                     "integration where the bone is a smooth union; see 'method')",
    "rasterized_cm3": "hard-label voxel count times the voxel volume (volume-preserving nested threshold)",
    "mean_thickness_mm": "area-weighted mean of the plate's thickness, measured along the bone surface normal, "
                         "over the bone-side surface the plate covers (thickness tapers to 0 at the plate rim)",
    "pose": "world RAS mm = R @ local + t, R = Rz @ Ry @ Rx; a left knee is the right knee mirrored in local x",
}


@dataclass(frozen=True)
class PhantomTruth:
    """Known answers for one phantom on one grid (JSON-ready through :meth:`to_dict`).

    ``structures[name]`` has ``reference_cm3`` (the shape's exact volume), ``method`` (how that was
    obtained) and ``rasterized_cm3`` (hard labels x voxel volume). ``cartilage[plate]`` has
    ``mean_thickness_mm`` (area-weighted over the covered bone surface), ``area_mm2`` of that surface
    and ``max_thickness_mm``. ``lesions`` lists each lesion's bone, label, volume and world centre.
    """

    side: str
    pose: dict[str, Any]
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    structures: dict[str, dict[str, Any]]
    cartilage: dict[str, dict[str, float]]
    lesions: list[dict[str, Any]]
    bml: dict[str, float]
    definitions: dict[str, str] = field(default_factory=lambda: dict(TRUTH_DEFINITIONS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Phantom:
    """A rasterized phantom: its label map and the truth about it."""

    labels: Volume
    truth: PhantomTruth
    spec: KneeSpec


def local_box_world(spec: KneeSpec, bone: str) -> tuple[np.ndarray, np.ndarray]:
    """World RAS axis-aligned box (lo, hi, mm) holding ``bone`` and its cartilage under ``spec``'s pose."""
    return _world_box(*A.LOCAL_BOXES[bone], spec.world_from_local())


def _world_box(lo, hi, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[(lo[i], hi[i])[c[i]] for i in range(3)] for c in product((0, 1), repeat=3)])
    world = corners @ m[:3, :3].T + m[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def phantom_grid(spec: KneeSpec, spacing: tuple[float, float, float] = OAI_SPACING,
                 margin_mm: float = 4.0, shape: tuple[int, int, int] | None = None,
                 direction: np.ndarray | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid (shape, 4x4 affine) centred on the knee that holds all of it.

    Args:
        spec: the knee (its pose decides where it is).
        spacing: voxel size (mm) along the array axes.
        margin_mm: space kept around the knee when ``shape`` is not given.
        shape: grid shape; by default the smallest that holds the knee plus the margin.
        direction: 3x3 matrix whose columns are the world directions of the array axes (default RAS).
    """
    boxes = [local_box_world(spec, b) for b in A.BONES]
    lo = np.min([b[0] for b in boxes], axis=0) - margin_mm
    hi = np.max([b[1] for b in boxes], axis=0) + margin_mm
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    linear = direction * np.asarray(spacing, float)
    corners = np.array([[(lo[i], hi[i])[c[i]] for i in range(3)] for c in product((0, 1), repeat=3)])
    ijk_extent = np.abs((corners - corners.mean(0)) @ np.linalg.inv(linear).T).max(axis=0) * 2
    if shape is None:
        shape = tuple(int(np.ceil(e)) + 1 for e in ijk_extent)
    centre = (lo + hi) / 2
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((np.asarray(shape) - 1) / 2)
    return tuple(int(n) for n in shape), affine


def _region(shape, affine, lo, hi, what: str) -> tuple[slice, slice, slice]:
    corners = np.array([[(lo[i], hi[i])[c[i]] for i in range(3)] for c in product((0, 1), repeat=3)])
    inv = np.linalg.inv(affine)
    ijk = corners @ inv[:3, :3].T + inv[:3, 3]
    start = np.floor(ijk.min(axis=0)).astype(int) - 1
    stop = np.ceil(ijk.max(axis=0)).astype(int) + 2
    if np.any(start < 0) or np.any(stop > np.asarray(shape)):
        raise ValueError(f"the phantom's {what} does not fit in the grid of shape {tuple(shape)}; "
                         "use phantom_grid() or a larger field of view")
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def check_lesions_inside(spec: KneeSpec, margin_mm: float = 0.3) -> None:
    """Raise ValueError unless every lesion lies inside its bone, ``margin_mm`` from the bone surface."""
    for lesion in spec.lesions:
        depth = A.BONE_SDFS[lesion.bone](lesion.blob().surface_points())
        if depth.max() > -margin_mm:
            raise ValueError(f"a {lesion.volume_cm3:.3f} cm3 lesion at {lesion.centre_mm} reaches "
                             f"{depth.max():+.2f} mm from the {lesion.bone} surface (must stay inside)")


def make_phantom(spec: KneeSpec, shape: tuple[int, int, int] | None = None, affine: np.ndarray | None = None,
                 *, spacing: tuple[float, float, float] = OAI_SPACING,
                 supersample: int | tuple[int, int, int] | None = None,
                 schema: LabelSchema | None = None) -> Phantom:
    """Rasterize the knee ``spec`` on a grid (hard labels, nested 0.5 rule; see module docstring).

    Args:
        spec: the knee.
        shape, affine: the grid; when omitted, :func:`phantom_grid` with ``spacing``.
        spacing: voxel size (mm) along the array axes for the default grid.
        supersample: sub-samples per voxel axis for surface voxels; default 3, and 5 along axes at
            least twice as coarse as the finest. Odd counts keep the 0.5 threshold unbiased: for a
            locally flat surface it then agrees with the voxel centre's side.
        schema: label schema with the ``oai_zib`` structure names (default ``oai_zib``).

    Raises:
        ValueError: when the knee does not fit the grid or a lesion leaves its bone.
    """
    schema = schema or load_schema("oai_zib")
    if shape is None or affine is None:
        shape, affine = phantom_grid(spec, spacing)
    affine = np.asarray(affine, float)
    spacing_now = np.linalg.norm(affine[:3, :3], axis=0)
    if supersample is None:
        supersample = tuple(5 if s >= 2 * spacing_now.min() else 3 for s in spacing_now)
    blocks = tuple(int(max(1, round(1.5 / s))) for s in spacing_now)
    check_lesions_inside(spec)
    to_world = spec.world_from_local()
    # The local SDFs are rasterized on the grid expressed in the knee's frame: an isometry of the world
    # grid, so distances, fractions and volumes are those of the posed knee.
    local_affine = np.linalg.inv(to_world) @ affine
    vox_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    labels = np.zeros(shape, dtype=np.uint16)
    plates = spec.plates()
    structures: dict[str, dict[str, Any]] = {}
    cartilage: dict[str, dict[str, float]] = {}
    lesions_out: list[dict[str, Any]] = []
    bml: dict[str, float] = {}
    for bone in A.BONES:
        plate = A.PLATES[bone]
        lesion_struct = schema.lesion_of(bone)
        region = _region(shape, affine, *local_box_world(spec, bone), bone)
        f_bone, d_bone = rasterize_with_distance(A.BONE_SDFS[bone], shape, local_affine,
                                                 supersample, region, blocks)
        f_cart = np.zeros_like(f_bone)
        d_cart = np.full_like(d_bone, np.inf)
        for shell in plates[plate]:
            lo, hi = shell.local_box()
            sub = _region(shape, affine, *_world_box(lo, hi, to_world), plate)
            local = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(sub, region))
            f, d = rasterize_with_distance(shell.sdf, shape, local_affine, supersample, sub, blocks)
            f_cart[local] += f
            d_cart[local] = np.minimum(d_cart[local], d)
        f_les = np.zeros_like(f_bone)
        d_les = np.full_like(d_bone, np.inf)
        lesion_ref = 0.0
        for lesion in (x for x in spec.lesions if x.bone == bone):
            blob = lesion.blob()
            r = blob.bounding_radius()
            centre_world = to_world[:3, :3] @ np.asarray(blob.centre) + to_world[:3, 3]
            sub = _region(shape, affine, centre_world - r, centre_world + r, f"{bone} lesion")
            local = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(sub, region))
            f, d = rasterize_with_distance(blob.sdf, shape, local_affine, supersample, sub, blocks)
            f_les[local] = np.maximum(f_les[local], f)
            d_les[local] = np.minimum(d_les[local], d)
            volume = blob.volume_mm3() / 1000.0
            lesion_ref += volume
            lesions_out.append({"bone": bone, "label": lesion_struct.name if lesion_struct else None,
                                "volume_cm3": volume, "centre_ras_mm": centre_world.round(6).tolist()})
        is_lesion = _grow_set(f_les, d_les, np.zeros(f_les.shape, bool))
        is_whole = _grow_set(f_bone, d_bone, is_lesion)
        is_outer = _grow_set(np.minimum(f_bone + f_cart, 1.0), np.minimum(d_bone, d_cart), is_whole)
        view = labels[region]
        free = view == 0
        view[is_outer & ~is_whole & free] = schema.by_name(plate).id
        view[is_whole & ~is_lesion & free] = schema.by_name(bone).id
        if lesion_struct is not None:
            view[is_lesion & free] = lesion_struct.id
        elif lesion_ref > 0:
            raise ValueError(f"label schema {schema.name!r} has no lesion label for the {bone}")
        truths = [s.truth() for s in plates[plate]]
        area = sum(t["area_mm2"] for t in truths)
        cart_ref = sum(t["volume_mm3"] for t in truths) / 1000.0
        cartilage[plate] = {"mean_thickness_mm": sum(t["mean_thickness_mm"] * t["area_mm2"] for t in truths) / area,
                            "area_mm2": area, "max_thickness_mm": max(t["max_thickness_mm"] for t in truths),
                            "volume_cm3": cart_ref}
        structures[bone] = {"reference_cm3": A.BONE_VOLUME_MM3[bone] / 1000.0 - lesion_ref,
                            "method": A.BONE_VOLUME_METHOD[bone] + (", minus lesions" if lesion_ref else ""),
                            "rasterized_cm3": float(np.count_nonzero(view == schema.by_name(bone).id)) * vox_mm3 / 1000}
        structures[plate] = {"reference_cm3": cart_ref, "method": "surface quadrature (Steiner formula)",
                             "rasterized_cm3": float(np.count_nonzero(view == schema.by_name(plate).id)) * vox_mm3 / 1000}
        if lesion_struct is not None:
            structures[lesion_struct.name] = {
                "reference_cm3": lesion_ref, "method": "closed form (quadrature over the sphere)",
                "rasterized_cm3": float(np.count_nonzero(view == lesion_struct.id)) * vox_mm3 / 1000}
            bml[bone] = lesion_ref
    bml["total"] = sum(bml.values())
    truth = PhantomTruth(side=spec.side, pose=spec.pose.to_dict(), spacing_mm=tuple(np.linalg.norm(affine[:3, :3], axis=0).round(9).tolist()),
                         shape=tuple(shape), structures=structures, cartilage=cartilage, lesions=lesions_out, bml=bml)
    volume = Volume(labels, affine, VolumeMeta(source="synth:phantom", laterality=spec.side))
    return Phantom(volume, truth, spec)


def _grow_set(frac: np.ndarray, dist: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Hard mask holding ``inner`` plus the voxels of largest ``frac`` (then smallest ``dist``) until its
    count equals ``round(sum(frac))`` (never fewer than ``inner`` and the full voxels)."""
    target = round(float(frac.sum(dtype=np.float64)))
    mask = inner | (frac >= 1.0)
    need = target - int(np.count_nonzero(mask))
    if need > 0:
        candidates = np.flatnonzero(~mask & (frac > 0))
        order = np.lexsort((dist.ravel()[candidates], -frac.ravel()[candidates]))
        mask.ravel()[candidates[order[:need]]] = True
    return mask


def integrate_volume_mm3(local_sdf, lo: tuple[float, float, float], hi: tuple[float, float, float],
                         step: float = 0.1, supersample: int = 2) -> float:
    """Volume (mm3) of ``{local_sdf < 0}`` inside the box ``lo``-``hi``, by summing partial-volume
    fractions on an isotropic ``step`` grid. Used to derive the smooth-union bones' reference volumes."""
    lo_a, hi_a = np.asarray(lo, float), np.asarray(hi, float)
    shape = tuple(int(n) for n in np.ceil((hi_a - lo_a) / step) + 1)
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = lo_a
    frac = rasterize_sparse(local_sdf, shape, affine, supersample, block=8)
    return float(frac.sum(dtype=np.float64)) * step**3
