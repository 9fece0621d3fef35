"""Change between two visits of one knee: BML volumes and lesions, cartilage thickness and volume.

:func:`compare_visits` is the library entry point (batch and reports call it):

1. Same knee? The sides (given, from metadata, or from anatomy) must agree, and every bone's epiphysis
   surfaces must agree within ``AlignConfig.max_residual_mm`` after rigid alignment; otherwise
   :class:`KneeMismatchError` unless ``force``.
2. Alignment: per-bone rigid registration of the follow-up to the baseline (:mod:`.align`).
3. BML: per bone and subregion, each visit's own measured volumes (a lesion's volume needs no alignment);
   lesions are matched across visits through the bone's alignment (:mod:`.lesions`).
4. Cartilage thickness over the *same* subchondral region at both visits (:class:`CommonInterface`):
   each visit's interface points are mapped into the baseline's world and kept when they lie within
   ``interface_dilation_mm`` (at least half a voxel diagonal + 0.5 mm) of a baseline interface voxel,
   farther than ``rim_exclusion_mm`` from the plate's edge (the baseline's distance map, interpolated),
   and inside both fields of view. One continuous rule for both visits, so a
   different field of view, pose or partly segmented plate does not bias the change. Subregions are
   assigned with the baseline's subregion model at both visits.

   What remains is the pose dependence of the thickness itself, which is in the binary label maps:
   their staircase errors average out over many independent steps, except where a surface runs at one
   height over a grid plane for a long stretch. On the analytic phantom, whose condyles are cylinders, a
   visit whose condyle axis lies within about a degree of a grid plane reads its femoral mean with an
   SD of 0.10-0.13 % over grid positions, against 0.03-0.06 % at 2-4 deg; 95 of 99 phantom pairs
   recover a +2.4 % change within 0.3 percentage points. Real anatomy (doubly curved) re-rasterized at
   two poses with a known thickening: 31 of 31 (RMS 0.08-0.10 points; BENCHMARKS.md). The region mean is not
   re-weighted against it: a staircase's errors cancel only over whole steps, so down-weighting the
   surface that lies near a grid plane is a biased selection (an unchanged cylinder then read -0.9 to
   -1.1 %; ``scripts/diagnose_pose_dependence.py``, sections 4-6).

All deltas are follow-up minus baseline; ``delta_percent`` is ``100 * delta / baseline`` and null (None)
when the baseline is 0 or missing.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema, present_values
from bml_pipeline.longitudinal.align import AlignConfig, BoneAlignment, align_bone
from bml_pipeline.longitudinal.lesions import LesionGroup, match_lesions, summarize_groups
from bml_pipeline.longitudinal.transform import RigidTransform
from bml_pipeline.measure.thickness import available_threads
from bml_pipeline.volume import Volume, bounding_box

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
ALIGNMENT_MARGIN_MM = 0.5  # allowance for the alignment error in the common region's reach


class KneeMismatchError(InputError):
    """The two scans are not of the same knee (side or bone shapes differ)."""


THICKNESS_REGION = ("cartilage thickness_* and delta_* values are means over the common region: interface points "
                    "present at both visits after alignment, without the plate's outer rim (rim_exclusion_mm) and "
                    "points near either field of view (view_margin_mm); they are not the whole-plate means of "
                    "measurements.json. volume_* values are whole-plate.")


@dataclass(frozen=True)
class ChangeConfig:
    """Parameters of the change computation (lengths in mm).

    Attributes:
        align: per-bone registration parameters (incl. the same-knee residual limit).
        max_rotation_deg: a bone turned further than this between scans (in patient coordinates) means the
            scans are not of the same knee (a mirrored knee fits best upside down or back to front).
        interface_dilation_mm: an interface point (either visit, mapped into the baseline's world) can
            belong to the common region when it lies within this distance of a baseline interface voxel,
            and at least within half the baseline's voxel diagonal plus ``ALIGNMENT_MARGIN_MM`` (the surface
            lies up to half a voxel from the voxel centres, and the alignment adds its error). At 3 mm
            slices a fixed 1 mm left the bands between the slices out (their points 1.0-1.5 mm from a
            voxel centre).
        view_margin_mm: interface points nearer than this to either field-of-view face are left out (the
            thickness rays and normals need about 5 mm of context).
        max_centroid_mm: lesions whose centroids are this close after alignment are the same lesion.
        rim_exclusion_mm: interface within this distance of the plate's edge (bone surface the baseline
            cartilage does not cover) is left out of the thickness change. Cartilage tapers to zero at
            its rim, and how much of that sub-voxel taper a binary label map keeps depends on the knee's
            pose on the voxel grid, so a rim counted at both visits adds a pose-dependent bias to the
            mean (several percent on tapered phantom plates); the core's change is not biased by it.
            5 mm: a little more than the taper of real plates and of the phantom (4 mm); on the phantom
            pairs the thickness-change error fell from up to 0.83 pp (3 mm) to 0.40 pp. On the small
            tibial plate the rim costs area: its change is about twice as noisy as the femoral one.
        decimals: rounding of every reported number (byte-identical reruns).
        min_percent_baseline_cm3: a BML change in percent of a baseline below this volume is not reported
            (``delta_percent`` null, ``percent_withheld`` says why): percent of a near-zero baseline is
            noise (a 0.05 cm3 speck growing to 0.2 cm3 is "+300 %"); use ``delta_cm3`` there.
    """

    align: AlignConfig = field(default_factory=AlignConfig)
    max_rotation_deg: float = 90.0
    interface_dilation_mm: float = 1.0
    view_margin_mm: float = 6.0
    max_centroid_mm: float = 5.0
    rim_exclusion_mm: float = 5.0
    decimals: int = 6
    min_percent_baseline_cm3: float = 0.5


@dataclass(frozen=True)
class PlateChange:
    """Cartilage of one plate at both visits, over the common interface region.

    Thickness in mm (area-weighted mean over the common region), areas in mm2, volumes in cm3;
    ``subregions`` maps a cartilage subregion to its (baseline, follow-up) mean thickness.
    """

    plate: str
    thickness_baseline_mm: float | None
    thickness_followup_mm: float | None
    area_baseline_mm2: float
    area_followup_mm2: float
    volume_baseline_cm3: float | None
    volume_followup_cm3: float | None
    subregions: dict[str, tuple[float | None, float | None]]


@dataclass(frozen=True, eq=False)
class Change:
    """Everything that changed between two visits. :meth:`to_dict` gives the ``change.json`` content."""

    side: str | None
    alignment: dict[str, BoneAlignment]
    bml: dict[str, tuple[float | None, float | None]]
    bml_subregions: dict[str, dict[str, tuple[float | None, float | None]]]
    lesions: dict[str, tuple[LesionGroup, ...]]
    cartilage: dict[str, PlateChange]
    forced: bool
    mismatch: str | None
    config: ChangeConfig
    sources: dict[str, str | None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``change.json`` (see DESIGN.md: bml, cartilage, alignment, plus details)."""
        d = self.config.decimals
        bml: dict[str, Any] = {}
        for bone, (b, f) in self.bml.items():
            entry = _delta(b, f, "_cm3", d)
            if entry["delta_percent"] is not None and b is not None and b < self.config.min_percent_baseline_cm3:
                entry["delta_percent"] = None
                entry["percent_withheld"] = (f"baseline {b:.3f} cm3 is below {self.config.min_percent_baseline_cm3:g} "
                                             "cm3: percent change is not meaningful, use delta_cm3")
            if bone in self.bml_subregions:
                entry["subregions"] = {name: _delta(sb, sf, "_cm3", d)
                                       for name, (sb, sf) in self.bml_subregions[bone].items()}
            if bone in self.lesions:
                entry["lesions"] = summarize_groups(self.lesions[bone], d)
            bml[bone] = entry
        cartilage: dict[str, Any] = {}
        for plate, c in self.cartilage.items():
            entry = _delta(c.thickness_baseline_mm, c.thickness_followup_mm, "_mm", d, prefix="thickness_mean_")
            vol = _delta(c.volume_baseline_cm3, c.volume_followup_cm3, "_cm3", d, prefix="volume_")
            entry.update({"volume_baseline_cm3": vol["volume_baseline_cm3"],
                          "volume_followup_cm3": vol["volume_followup_cm3"],
                          "volume_delta_cm3": vol["delta_cm3"], "volume_delta_percent": vol["delta_percent"],
                          "area_baseline_mm2": round(c.area_baseline_mm2, 3),
                          "area_followup_mm2": round(c.area_followup_mm2, 3),
                          "subregions": {name: _delta(sb, sf, "_mm", d, prefix="thickness_mean_")
                                         for name, (sb, sf) in c.subregions.items()}})
            cartilage[plate] = entry
        return {
            "schema_version": SCHEMA_VERSION,
            "side": self.side,
            "baseline": {"labels": self.sources.get("baseline")},
            "followup": {"labels": self.sources.get("followup")},
            "same_knee": {"forced": self.forced, "problem": self.mismatch},
            "thickness_region": THICKNESS_REGION,
            "bml": bml,
            "cartilage": cartilage,
            "alignment": {bone: a.to_dict() for bone, a in self.alignment.items()},
            "config": _config_dict(self.config),
        }


def compare_visits(baseline: Volume, followup: Volume, schema: LabelSchema, *,
                   baseline_measurements: dict[str, Any] | None = None,
                   followup_measurements: dict[str, Any] | None = None,
                   side: str | None = None, measure_config=None, config: ChangeConfig | None = None,
                   force: bool = False) -> Change:
    """Change from ``baseline`` to ``followup`` label maps of one knee.

    Args:
        baseline, followup: label maps (any grids, axis orders and fields of view).
        schema: their label schema.
        baseline_measurements, followup_measurements: each visit's ``measurements.json`` content when
            already measured (otherwise measured here with ``measure_config``).
        side: ``"left"``/``"right"`` when known for both visits (else from the measurements/anatomy).
        measure_config: :class:`~bml_pipeline.measure.config.MeasureConfig` for thickness and lesions.
        config: change parameters.
        force: compare even when the scans do not look like the same knee (the problem is recorded).

    Raises:
        KneeMismatchError: sides differ or bone shapes disagree after alignment (unless ``force``).
        InputError: a bone needed for alignment is missing.
    """
    from bml_pipeline.measure.config import MeasureConfig

    config = config or ChangeConfig()
    measure_config = measure_config or MeasureConfig()
    m_base = baseline_measurements or _measure(baseline, schema, side, measure_config)
    m_foll = followup_measurements or _measure(followup, schema, side, measure_config)
    side_b, side_f = side or m_base.get("side"), side or m_foll.get("side")
    problems = []
    if side_b and side_f and side_b != side_f:
        problems.append(f"the baseline is a {side_b} knee and the follow-up a {side_f} knee")

    if problems and not force:
        _refuse(baseline, followup, problems)
    alignment = {}
    present = [set(present_values(v.array)) for v in (baseline, followup)]
    for bone in (s.name for s in schema.bones):
        ids = set(schema.bone_ids(bone))
        if not (ids & present[0] and ids & present[1]):
            log.info("%s is missing at one visit; not aligned", bone)
            continue
        a = align_bone(baseline, followup, schema, bone, config=config.align)
        alignment[bone] = a
        if a.rotation_deg > config.max_rotation_deg:
            problems.append(f"the {bone} would have turned by {a.rotation_deg:.0f} degrees between the scans "
                            f"(same knee: below {config.max_rotation_deg:g} degrees)")
        elif a.residual_mm > config.align.max_residual_mm:
            problems.append(f"{bone} surfaces differ by {a.residual_mm:.2f} mm on average after alignment "
                            f"(same knee: below {config.align.max_residual_mm:g} mm)")
        elif a.coverage < config.align.min_coverage:
            problems.append(f"only {100 * a.coverage:.0f}% of the baseline {bone} epiphysis is in the follow-up's view")
        if problems and not force:
            _refuse(baseline, followup, problems)
    if not alignment:
        raise InputError(followup.meta.source, "no bone is present at both visits; nothing to align")
    mismatch = "; ".join(problems) or None
    if mismatch:
        log.warning("comparing anyway (forced): %s", mismatch)

    bml, bml_sub, lesions = {}, {}, {}
    for bone in (s.name for s in schema.bones):
        vb, vf = _get(m_base, "bml", bone, "volume_cm3"), _get(m_foll, "bml", bone, "volume_cm3")
        if vb is None and vf is None:
            continue
        bml[bone] = (vb, vf)
        sub_b = _get(m_base, "bml", bone, "subregions") or {}
        sub_f = _get(m_foll, "bml", bone, "subregions") or {}
        bml_sub[bone] = {name: (_get(sub_b, name, "volume_cm3"), _get(sub_f, name, "volume_cm3"))
                         for name in sorted(set(sub_b) | set(sub_f))}
        lesion = schema.lesion_of(bone)
        if lesion is not None and bone in alignment:
            lesions[bone] = match_lesions(baseline, followup, lesion.id, alignment[bone].transform,
                                          min_volume_mm3=measure_config.min_lesion_volume_mm3,
                                          connectivity=measure_config.lesion_connectivity,
                                          max_centroid_mm=config.max_centroid_mm)
    bml["total"] = (_get(m_base, "bml", "total_volume_cm3"), _get(m_foll, "bml", "total_volume_cm3"))

    model = _subregion_model(baseline, schema, side_b)
    plates = [plate.name for plate in schema.of_kind("cartilage") if plate.bone in alignment]

    def plate_change(plate: str) -> PlateChange:
        bone = schema.by_name(plate).bone
        return _plate_change(baseline, followup, schema, plate, alignment[bone].transform, model, config,
                             measure_config, (_get(m_base, "structures", plate, "volume_cm3"),
                                              _get(m_foll, "structures", plate, "volume_cm3")))

    # The plates concurrently, as in the measure stage (threads capped by OMP_NUM_THREADS when set).
    with ThreadPoolExecutor(max_workers=min(available_threads(), max(len(plates), 1))) as pool:
        cartilage = dict(zip(plates, pool.map(plate_change, plates)))
    return Change(side=side_b or side_f, alignment=alignment, bml=bml, bml_subregions=bml_sub, lesions=lesions,
                  cartilage=cartilage, forced=bool(mismatch), mismatch=mismatch, config=config,
                  sources={"baseline": baseline.meta.source, "followup": followup.meta.source})


def change_row(change: dict[str, Any], **ids: Any) -> dict[str, Any]:
    """One flat row of a ``change.json`` dict (for ``change.csv`` / the batch's ``changes.csv``).

    ``ids`` (e.g. subject, baseline_visit, followup_visit) come first; then ``side``, and per bone / plate
    ``bml_<bone>_{baseline,followup,delta}_cm3``, ``bml_<bone>_delta_percent``, lesion counts,
    ``cartilage_<plate>_common_region_thickness_mean_{baseline,followup}_mm``, ``..._common_region_delta_mm``,
    ``..._common_region_delta_percent`` (thickness over the region both visits cover: not the whole-plate
    mean of ``cohort.csv``), ``cartilage_<plate>_whole_plate_volume_delta_cm3``, rates per year, and
    ``alignment_<bone>_{rotation_deg,translation_mm,residual}``.
    """
    row: dict[str, Any] = dict(ids)
    row["side"] = change.get("side")
    row["interval_days"] = change.get("interval_days")
    for bone, e in change.get("bml", {}).items():
        for key in ("baseline_cm3", "followup_cm3", "delta_cm3", "delta_percent", "delta_cm3_per_year"):
            row[f"bml_{bone}_{key}"] = e.get(key)
        for status in ("persisting", "new", "resolved"):
            if "lesions" in e:
                row[f"bml_{bone}_lesions_{status}"] = e["lesions"][status]["count"]
    for plate, e in change.get("cartilage", {}).items():
        # Thickness here is the common region's (THICKNESS_REGION); volume is the whole plate's.
        for key in ("thickness_mean_baseline_mm", "thickness_mean_followup_mm", "delta_mm", "delta_percent",
                    "delta_mm_per_year", "delta_percent_per_year"):
            row[f"cartilage_{plate}_common_region_{key}"] = e.get(key)
        row[f"cartilage_{plate}_whole_plate_volume_delta_cm3"] = e.get("volume_delta_cm3")
    for bone, e in change.get("alignment", {}).items():
        for key in ("rotation_deg", "translation_mm", "residual"):
            row[f"alignment_{bone}_{key}"] = e.get(key)
    return row


# ---- cartilage over the common region ----------------------------------------------------------

def _plate_change(baseline: Volume, followup: Volume, schema: LabelSchema, plate: str, transform: RigidTransform,
                  model, config: ChangeConfig, measure_config, volumes) -> PlateChange:
    from bml_pipeline.measure.thickness import cartilage_thickness

    region = CommonInterface.build(baseline, followup, schema, plate, transform, config)
    res_b = cartilage_thickness(baseline, schema, plate, config=measure_config)
    res_f = cartilage_thickness(followup, schema, plate, config=measure_config)
    # Both visits' interface points are judged in the baseline's world by one continuous rule, so the
    # region's edge sits at the same anatomical place at both visits (no voxel re-quantisation).
    points_f = transform.inverse().apply(res_f.points_mm)
    in_b, in_f = region.contains(res_b.points_mm), region.contains(points_f)
    mean_b, mean_f = res_b.mean_in(in_b), res_f.mean_in(in_f)
    subregions: dict[str, tuple[float | None, float | None]] = {}
    bone = schema.by_name(plate).bone
    if model is not None and bone is not None:
        from bml_pipeline.measure.subregions import BONE_REGIONS, CARTILAGE_REGIONS

        names = BONE_REGIONS[bone]
        idx_b = model.classify(bone, res_b.points_mm, clip_height=False)
        idx_f = model.classify(bone, points_f, clip_height=False)
        for name, parts in CARTILAGE_REGIONS[bone].items():
            ids = [names.index(p) for p in parts]
            subregions[name] = (res_b.mean_in(in_b & np.isin(idx_b, ids)), res_f.mean_in(in_f & np.isin(idx_f, ids)))
    return PlateChange(plate, mean_b, mean_f, float(res_b.areas_mm2[in_b].sum()), float(res_f.areas_mm2[in_f].sum()),
                       volumes[0], volumes[1], subregions)


@dataclass(frozen=True, eq=False)
class CommonInterface:
    """The part of a plate's bone-cartilage interface measured at both visits, as a rule on baseline
    world points (RAS mm): within ``reach_mm`` of a baseline interface voxel, farther than
    ``rim_exclusion_mm`` from the plate's edge, and inside both fields of view (``view_margin_mm``).

    The distance to the edge is the baseline's voxel distance map (to the nearest bone-surface voxel the
    cartilage does not cover) interpolated trilinearly, so the region's edge moves continuously with
    the anatomy and does not jump by whole slices: with thick slices, a rule on voxel centres took or
    left whole bands between the slices, differently for the two visits (3 mm slices: -1.3 to +2.2 pp).
    """

    interface: Any  # scipy cKDTree of the RAS mm of the baseline's interface voxels; None if none
    reach_mm: float  # how far from an interface voxel centre a point may lie
    rim_distance: np.ndarray | None  # mm to the plate's uncovered edge on the index box ``box``; None: no rim rule
    box: tuple[slice, ...]
    baseline: Volume
    followup: Volume
    transform: RigidTransform
    config: ChangeConfig

    @classmethod
    def build(cls, baseline: Volume, followup: Volume, schema: LabelSchema, plate: str,
              transform: RigidTransform, config: ChangeConfig) -> CommonInterface:
        from scipy import ndimage
        from scipy.spatial import cKDTree

        structure = schema.by_name(plate)
        reach = max(config.interface_dilation_mm,
                    0.5 * float(np.linalg.norm(baseline.spacing)) + ALIGNMENT_MARGIN_MM)
        cart_full = baseline.array == structure.id
        box = bounding_box(cart_full, margin=int(np.ceil(config.rim_exclusion_mm / min(baseline.spacing))) + 2)
        empty = cls(None, reach, None, (slice(0, 0),) * 3, baseline, followup, transform, config)
        if box is None or structure.bone is None:
            return empty
        sub = baseline.array[box]
        bone, cart = np.isin(sub, schema.bone_ids(structure.bone)), cart_full[box]
        six = ndimage.generate_binary_structure(3, 1)
        touching = (bone & ndimage.binary_dilation(cart, six)) | (cart & ndimage.binary_dilation(bone, six))
        if not touching.any():
            return empty
        rim_distance = None
        if config.rim_exclusion_mm > 0:
            uncovered = bone & ndimage.binary_dilation(~bone, six) & ~ndimage.binary_dilation(cart, six)
            if uncovered.any():
                rim_distance = ndimage.distance_transform_edt(~uncovered, sampling=baseline.spacing).astype(np.float32)
                if not np.any(rim_distance[touching] > config.rim_exclusion_mm):
                    log.warning("%s: plate narrower than twice the %.1f mm rim; rim kept", plate,
                                config.rim_exclusion_mm)
                    rim_distance = None
        interface_mm = baseline.world_coords(np.argwhere(touching) + [s.start for s in box])
        return cls(cKDTree(interface_mm), reach, rim_distance, box, baseline, followup, transform, config)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which baseline-world points (N, 3) belong to the common interface."""
        from scipy import ndimage

        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if self.interface is None or len(points) == 0:
            return np.zeros(len(points), dtype=bool)
        near, _ = self.interface.query(points, distance_upper_bound=self.reach_mm)
        inside = np.isfinite(near)
        if self.rim_distance is not None:
            ijk = self.baseline.voxel_coords(points) - [s.start for s in self.box]
            rim = ndimage.map_coordinates(self.rim_distance, ijk.T, order=1, mode="nearest")
            inside &= rim > self.config.rim_exclusion_mm
        margin = self.config.view_margin_mm
        return (inside & in_view(self.baseline, points, margin)
                & in_view(self.followup, self.transform.apply(points), margin))


def in_view(volume: Volume, points: np.ndarray, margin_mm: float) -> np.ndarray:
    """Which world points (N, 3) lie inside ``volume``'s field of view, at least ``margin_mm`` from its faces."""
    ijk = volume.voxel_coords(points)
    margin = margin_mm / np.asarray(volume.spacing)
    upper = np.asarray(volume.shape) - 1 - margin
    return np.all((ijk >= margin) & (ijk <= upper), axis=1)


# ---- helpers -----------------------------------------------------------------------------------

def _measure(labels: Volume, schema: LabelSchema, side: str | None, measure_config) -> dict[str, Any]:
    from bml_pipeline.measure import measure_labels

    return measure_labels(labels, schema, side=side, config=measure_config).to_dict()


def _subregion_model(labels: Volume, schema: LabelSchema, side: str | None):
    """The baseline's subregion model (None when the side or the anatomical axes are unknown)."""
    from bml_pipeline.measure.frame import bone_point_sets, knee_axes
    from bml_pipeline.measure.subregions import build_subregions

    if side is None:
        return None
    points = bone_point_sets(labels, schema)
    axes = knee_axes(labels, schema, points)
    return build_subregions(axes, side, points) if axes is not None else None


def _refuse(baseline: Volume, followup: Volume, problems: list[str]) -> None:
    raise KneeMismatchError(followup.meta.source, f"not the same knee as {baseline.meta.source}: "
                            f"{'; '.join(problems)} (use --allow-mismatch to compare anyway)")


def _get(tree: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _delta(baseline: float | None, followup: float | None, unit: str, decimals: int,
           prefix: str = "") -> dict[str, float | None]:
    """{prefix}baseline{unit}, {prefix}followup{unit}, delta{unit}, delta_percent (None when undefined)."""
    delta = None if baseline is None or followup is None else followup - baseline
    percent = None if delta is None or not baseline else 100.0 * delta / baseline
    r = lambda v: None if v is None else round(float(v), decimals)
    return {f"{prefix}baseline{unit}": r(baseline), f"{prefix}followup{unit}": r(followup),
            f"delta{unit}": r(delta), "delta_percent": r(percent)}


def _config_dict(config: ChangeConfig) -> dict[str, Any]:
    out = asdict(config)
    out["align"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["align"].items()}
    return out
