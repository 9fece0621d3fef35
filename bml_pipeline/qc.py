"""Quality control of a knee label map: is this segmentation fit to measure?

Checks, each ``pass``, ``warn`` or ``fail``, in world RAS millimetres (any array axis order):

- **volume**: each bone and plate within the range of the 52 expert OAI maps, widened by a margin
  (``configs/qc/oai_zib.yaml``, made by ``scripts/qc_reference.py``); a missing bone fails.
- **components**: each bone in one piece (its largest 6-connected component holds most of it).
- **arrangement**: femur above the tibia and meeting it at a joint, patella in front of the femur
  and close to it, above the tibial plateau; each plate lying on its bone.
- **field of view**: the femur may leave the scan only superiorly, the tibia only inferiorly, the
  patella not at all (a bone cut elsewhere is cut near the joint).
- **orientation**: the femur-tibia long axis within 45 degrees of the image's superior axis.
- **confidence** (segmented scans): the model's mean max-probability per structure, and, with
  flip test-time augmentation, the agreement (Dice) of the prediction with its mirror.
- **not segmented**: structures the model cannot label (a bones-and-cartilage model has no lesion
  classes): a warning, and those structures are unreliable (their volume would read 0, not "absent").

A structure with a failed check is *unreliable*: its measures are marked so in ``measurements.json``
and the report. The overall status is the worst check's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume

REFERENCE_DIR = Path(__file__).resolve().parent / "configs" / "qc"
STATUSES = ("pass", "warn", "fail")
MAX_AXIS_TILT_DEG = 45.0
JOINT_GAP_MM = (-12.0, 15.0)
"""Femur's lowest point minus the tibia's highest point along the long axis (plateau slopes overlap)."""
PATELLA_FEMUR_DISTANCE_MM = 15.0
PATELLA_ANTERIOR_MM = 5.0
PLATE_ON_BONE_MM = 7.0
PLATE_ON_BONE_FRACTION = 0.9
LARGEST_COMPONENT_FRACTION = 0.9
LOW_CONFIDENCE = 0.75
LOW_TTA_AGREEMENT = 0.8


@dataclass(frozen=True)
class Check:
    """One check: ``status`` pass / warn / fail, the structures it concerns, a one-sentence ``detail``."""

    name: str
    status: str
    detail: str
    structures: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "structures": list(self.structures)}


@dataclass(frozen=True)
class QcResult:
    """All checks of one label map; ``unreliable`` names the structures of failed checks."""

    checks: tuple[Check, ...]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return max((c.status for c in self.checks), key=STATUSES.index, default="pass")

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == "fail")

    @property
    def unreliable(self) -> tuple[str, ...]:
        names: list[str] = []
        for c in (*self.failures, *(c for c in self.checks if c.name == "not_segmented")):
            names += [s for s in c.structures if s not in names]
        return tuple(names)

    def summary(self) -> str:
        """One line: the status and the failed (else warned) checks' details."""
        worst = self.failures or tuple(c for c in self.checks if c.status == "warn")
        if not worst:
            return "QC pass"
        return f"QC {self.status}: " + "; ".join(c.detail for c in worst)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "unreliable": list(self.unreliable),
                "checks": [c.to_dict() for c in self.checks], "metrics": self.metrics}


@lru_cache(maxsize=4)
def reference_ranges(schema_name: str) -> dict[str, tuple[float, float]]:
    """Plausible volume range (cm3) per structure for a schema, from ``configs/qc/<schema>.yaml``."""
    import yaml

    path = REFERENCE_DIR / f"{schema_name}.yaml"
    if not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text())
    return {name: (float(v["low_cm3"]), float(v["high_cm3"])) for name, v in raw["volume_cm3"].items()}


def check_labels(labels: Volume, schema: LabelSchema, volumes_cm3: dict[str, float | None],
                 confidence: dict[str, float] | None = None,
                 tta_agreement: dict[str, float] | None = None,
                 not_segmented: list[str] | None = None) -> QcResult:
    """Run every check on ``labels`` (``volumes_cm3``: structure volumes already measured, None when
    absent; ``confidence`` and ``tta_agreement``: per structure name, from the segmentation stage;
    ``not_segmented``: structures the model has no class for)."""
    metrics: dict[str, Any] = {}
    checks = [*_volume_checks(volumes_cm3, schema)]
    step = max(1, round(1.0 / min(labels.spacing)))  # work on a ~1 mm subsample
    sub = np.asarray(labels.array)[::step, ::step, ::step]
    affine = labels.affine.copy()
    affine[:3, :3] *= step
    grid = Volume(sub, affine)
    bones = {b.name: np.isin(sub, schema.bone_ids(b.name)) for b in schema.bones}
    bones = {k: v for k, v in bones.items() if v.any()}
    checks += _component_checks(bones, metrics)
    checks += _arrangement_checks(grid, bones, metrics)
    checks += _plate_checks(grid, schema, bones, metrics)
    checks += _field_of_view_checks(grid, bones)
    if confidence:
        metrics["confidence"] = {k: round(v, 3) for k, v in confidence.items()}
        checks.append(_floor_check("confidence", confidence, LOW_CONFIDENCE, "warn",
                                   "low model confidence (mean max-probability", "model confident for every structure"))
    if not_segmented:
        checks.append(Check("not_segmented", "warn", "the segmentation model does not label "
                            f"{', '.join(not_segmented)}: not measured", tuple(not_segmented)))
    if tta_agreement:
        metrics["tta_agreement_dice"] = {k: round(v, 3) for k, v in tta_agreement.items()}
        checks.append(_floor_check("tta_agreement", tta_agreement, LOW_TTA_AGREEMENT, "fail",
                                   "prediction and its mirror disagree (Dice", "prediction agrees with its mirror"))
    return QcResult(tuple(checks), metrics)


def _floor_check(name: str, values: dict[str, float], floor: float, status: str, problem: str, fine: str) -> Check:
    """``status`` naming the structures whose value is below ``floor``, else pass."""
    low = [k for k, v in values.items() if v < floor]
    if not low:
        return Check(name, "pass", fine)
    return Check(name, status, f"{problem} < {floor}) for {', '.join(low)}", tuple(low))


def _volume_checks(volumes: dict[str, float | None], schema: LabelSchema) -> list[Check]:
    ranges = reference_ranges(schema.name)
    out = []
    for s in (*schema.of_kind("bone"), *schema.of_kind("cartilage")):
        value = volumes.get(s.name)
        if value is None:
            out.append(Check("volume", "fail", f"{s.name} is missing", (s.name,)))
            continue
        if s.kind == "bone":  # a bone's full extent includes its lesions
            lesion = schema.lesion_of(s.name)
            value += (volumes.get(lesion.name) or 0.0) if lesion else 0.0
        if s.name in ranges:
            low, high = ranges[s.name]
            if not low <= value <= high:
                out.append(Check("volume", "fail", f"{s.name} volume {value:.1f} cm3 is outside the plausible "
                                 f"{low:.1f}-{high:.1f} cm3", (s.name,)))
    if not out:
        out.append(Check("volume", "pass", "every bone and plate present, volumes plausible"))
    return out


def _component_checks(bones: dict[str, np.ndarray], metrics: dict[str, Any]) -> list[Check]:
    out = []
    fractions = {}
    for name, mask in bones.items():
        comps, n = ndimage.label(mask)
        sizes = np.bincount(comps.ravel())[1:]
        fractions[name] = float(sizes.max() / sizes.sum())
        if fractions[name] < LARGEST_COMPONENT_FRACTION:
            out.append(Check("components", "fail", f"{name} is in {n} pieces (the largest holds "
                             f"{100 * fractions[name]:.0f} %)", (name,)))
    metrics["largest_component_fraction"] = {k: round(v, 3) for k, v in fractions.items()}
    return out or [Check("components", "pass", "each bone in one piece")]


def _world_points(grid: Volume, mask: np.ndarray) -> np.ndarray:
    return grid.world_coords(np.argwhere(mask).astype(np.float64))


def _arrangement_checks(grid: Volume, bones: dict[str, np.ndarray], metrics: dict[str, Any]) -> list[Check]:
    if "femur" not in bones or "tibia" not in bones:
        return [Check("arrangement", "fail", "femur and tibia are both needed for an anatomical frame",
                      tuple(b for b in ("femur", "tibia") if b not in bones))]
    out = []
    femur, tibia = _world_points(grid, bones["femur"]), _world_points(grid, bones["tibia"])
    both = np.concatenate([femur, tibia])
    centred = both - both.mean(0)
    axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
    if np.dot(femur.mean(0) - tibia.mean(0), axis) < 0:
        axis = -axis
    tilt = float(np.degrees(np.arccos(np.clip(axis[2], -1, 1))))
    metrics["long_axis_tilt_deg"] = round(tilt, 1)
    if femur.mean(0)[2] <= tibia.mean(0)[2]:
        out.append(Check("arrangement", "fail", "the femur is not above the tibia (image superior axis)",
                         ("femur", "tibia")))
    elif tilt > MAX_AXIS_TILT_DEG:
        out.append(Check("orientation", "fail", f"the femur-tibia long axis is {tilt:.0f} deg from the image's "
                         f"superior axis (limit {MAX_AXIS_TILT_DEG:.0f})", ("femur", "tibia")))
    gap = float(np.percentile(femur @ axis, 0.5) - np.percentile(tibia @ axis, 99.5))
    metrics["joint_gap_mm"] = round(gap, 1)
    if not JOINT_GAP_MM[0] <= gap <= JOINT_GAP_MM[1]:
        out.append(Check("arrangement", "fail", f"femur and tibia do not meet at a joint (gap {gap:.0f} mm along "
                         "the long axis)", ("femur", "tibia")))
    if "patella" in bones:
        out += _patella_checks(grid, bones, femur, tibia, axis, metrics)
    return out or [Check("arrangement", "pass", "femur above tibia at a joint, patella in front of the femur")]


def _patella_checks(grid: Volume, bones: dict[str, np.ndarray], femur: np.ndarray, tibia: np.ndarray,
                    axis: np.ndarray, metrics: dict[str, Any]) -> list[Check]:
    patella = _world_points(grid, bones["patella"])
    near = _distance_to(grid, bones["femur"], bones["patella"])
    metrics["patella_to_femur_mm"] = round(near, 1)
    condyles = femur[femur @ axis < np.percentile(femur @ axis, 0.5) + 30.0]
    offset = patella.mean(0) - condyles.mean(0)
    offset -= np.dot(offset, axis) * axis
    anterior = float(offset[1])  # world A component, the long axis removed
    metrics["patella_anterior_mm"] = round(anterior, 1)
    above = float(np.median(patella @ axis) - np.percentile(tibia @ axis, 99.5))
    metrics["patella_above_plateau_mm"] = round(above, 1)
    problems = []
    if near > PATELLA_FEMUR_DISTANCE_MM:
        problems.append(f"{near:.0f} mm from the femur")
    if anterior < PATELLA_ANTERIOR_MM:
        problems.append(f"not in front of the femoral condyles ({anterior:+.0f} mm anterior)")
    if above < 0:
        problems.append("below the tibial plateau")
    if problems:
        return [Check("arrangement", "fail", "the patella is " + " and ".join(problems), ("patella",))]
    return []


def _distance_to(grid: Volume, target: np.ndarray, source: np.ndarray) -> float:
    """Smallest distance (mm) from a ``source`` voxel to a ``target`` voxel, within their joint box."""
    box = ndimage.find_objects((target | source).astype(np.uint8))[0]
    dist = ndimage.distance_transform_edt(~target[box], sampling=grid.spacing)
    return float(dist[source[box]].min())


def _plate_checks(grid: Volume, schema: LabelSchema, bones: dict[str, np.ndarray],
                  metrics: dict[str, Any]) -> list[Check]:
    out = []
    on_bone = {}
    for plate in schema.of_kind("cartilage"):
        mask = np.asarray(grid.array) == plate.id
        if not mask.any() or plate.bone not in bones:
            continue
        bone = bones[plate.bone]
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        pad = tuple(slice(max(0, s.start - 6), s.stop + 6) for s in box)
        dist = ndimage.distance_transform_edt(~bone[pad], sampling=grid.spacing)
        on_bone[plate.name] = float(np.mean(dist[mask[pad]] <= PLATE_ON_BONE_MM))
        if on_bone[plate.name] < PLATE_ON_BONE_FRACTION:
            out.append(Check("arrangement", "fail", f"{plate.name} does not lie on the {plate.bone} (only "
                             f"{100 * on_bone[plate.name]:.0f} % within {PLATE_ON_BONE_MM:g} mm of it)", (plate.name,)))
    metrics["plate_on_bone_fraction"] = {k: round(v, 3) for k, v in on_bone.items()}
    return out or [Check("plates", "pass", "each plate lies on its bone")]


def _field_of_view_checks(grid: Volume, bones: dict[str, np.ndarray]) -> list[Check]:
    """A bone may leave the scan only along its shaft: femur superiorly, tibia inferiorly."""
    allowed = {"femur": "superior", "tibia": "inferior"}
    out = []
    direction = grid.affine[:3, :3] / np.linalg.norm(grid.affine[:3, :3], axis=0)
    for name, mask in bones.items():
        cut = []
        for axis in range(3):
            for end, sign in ((0, -1.0), (mask.shape[axis] - 1, 1.0)):
                if not mask.take(end, axis=axis).any():
                    continue
                outward = sign * direction[:, axis]
                world_axis = int(np.argmax(np.abs(outward)))
                face = (("left", "right"), ("posterior", "anterior"), ("inferior", "superior"))[world_axis][
                    int(outward[world_axis] > 0)]
                if face != allowed.get(name):
                    cut.append(face)
        if cut:
            out.append(Check("field_of_view", "fail", f"the {name} is cut by the field of view at its "
                             f"{' and '.join(sorted(set(cut)))} border", (name,)))
    return out or [Check("field_of_view", "pass", "bones leave the scan only along their shafts")]
