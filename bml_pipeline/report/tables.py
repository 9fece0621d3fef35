"""Table rows for reports, read defensively from ``measurements.json`` / ``change.json`` dicts.

A missing structure or number becomes None, which templates show as "absent"; nothing here raises on
a partial file. Units: volumes in cm3, lengths in mm, centroids in world RAS mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume, bounding_box

BONES = ("femur", "tibia", "patella")
PLATES = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")
THICKNESS_STATS = ("mean", "median", "sd", "p95", "max")


@dataclass(frozen=True)
class Lesion:
    """One lesion as shown in the report (rank 1 = largest of its bone)."""

    bone: str
    rank: int
    volume_cm3: float | None
    centroid_mm: tuple[float, float, float] | None
    diameter_mm: float | None
    subregion: str | None


@dataclass(frozen=True)
class ChangeRow:
    """One line of a change table. ``worse`` says whether the direction is the one of progression."""

    group: str
    name: str
    unit: str
    baseline: float | None
    followup: float | None
    delta: float | None
    delta_percent: float | None
    direction: str  # "increase" | "decrease" | "no change" | "absent"
    worse: bool | None
    subregion: str | None = None
    """Set on a subregion's row (shown indented under its bone or plate)."""


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def pretty(name: str) -> str:
    """Human name of a structure or subregion key (``femoral_cartilage`` -> ``Femoral cartilage``)."""
    text = str(name).replace("_", " ")
    return text[:1].upper() + text[1:]


def bml_rows(measurements: dict[str, Any]) -> list[dict[str, Any]]:
    """Per bone: volume, lesion count and MOAKS subregions (volume, % of subregion, grade)."""
    bml = mapping(measurements.get("bml"))
    rows = []
    for bone in _ordered(bml, BONES, skip=("total_volume_cm3",)):
        entry = mapping(bml.get(bone))
        subregions = [
            {"name": str(name), "volume_cm3": number(mapping(sub).get("volume_cm3")),
             "percent": number(mapping(sub).get("percent_of_subregion")),
             "grade": _grade(mapping(sub).get("grade"))}
            for name, sub in sorted(mapping(entry.get("subregions")).items())
        ]
        rows.append({"bone": bone, "present": bone in bml, "volume_cm3": number(entry.get("volume_cm3")),
                     "lesion_count": _count(entry.get("lesion_count")), "subregions": subregions,
                     "max_grade": max((s["grade"] for s in subregions if s["grade"] is not None), default=None)})
    return rows


def cartilage_rows(measurements: dict[str, Any]) -> list[dict[str, Any]]:
    """Per plate: volume, thickness statistics (mm) and subregion mean thickness (mm)."""
    cartilage = mapping(measurements.get("cartilage"))
    rows = []
    for plate in _ordered(cartilage, PLATES):
        entry = mapping(cartilage.get(plate))
        thickness = mapping(entry.get("thickness_mm"))
        subregions = [{"name": str(name), "thickness_mean_mm": number(mapping(sub).get("thickness_mean_mm"))}
                      for name, sub in sorted(mapping(entry.get("subregions")).items())]
        rows.append({"plate": plate, "present": plate in cartilage, "volume_cm3": number(entry.get("volume_cm3")),
                     "thickness": {k: number(thickness.get(k)) for k in THICKNESS_STATS}, "subregions": subregions})
    return rows


def structure_rows(measurements: dict[str, Any]) -> list[dict[str, Any]]:
    """Every structure's volume (cm3), in file order."""
    return [{"name": str(name), "volume_cm3": number(mapping(entry).get("volume_cm3"))}
            for name, entry in mapping(measurements.get("structures")).items()]


def lesions_from_measurements(measurements: dict[str, Any]) -> dict[str, list[Lesion]] | None:
    """Per-bone lesion lists when ``measurements.json`` has them (``bml.<bone>.lesions``), else None."""
    bml = mapping(measurements.get("bml"))
    found: dict[str, list[Lesion]] = {}
    any_list = False
    for bone in _ordered(bml, BONES, skip=("total_volume_cm3",)):
        items = mapping(bml.get(bone)).get("lesions")
        if not isinstance(items, list):
            continue
        any_list = True
        lesions = []
        for item in (i for i in items if isinstance(i, dict)):
            volume = number(item.get("volume_cm3"))
            if volume is None and number(item.get("volume_mm3")) is not None:
                volume = number(item.get("volume_mm3")) / 1000.0  # type: ignore[operator]
            centroid = item.get("centroid_mm")
            point = (tuple(float(c) for c in centroid) if isinstance(centroid, (list, tuple)) and len(centroid) == 3
                     and all(number(c) is not None for c in centroid) else None)
            sub = item.get("subregion")
            lesions.append((volume, point, number(item.get("diameter_mm")), sub if isinstance(sub, str) else None))
        lesions.sort(key=lambda lesion: -(lesion[0] or 0.0))
        found[bone] = [Lesion(bone, i + 1, *lesion) for i, lesion in enumerate(lesions)]  # type: ignore[arg-type]
    return found if any_list else None


def lesions_from_labels(labels: Volume, schema: LabelSchema) -> dict[str, list[Lesion]]:
    """Connected lesions (26-connected) per bone computed from the label map: volume and centroid."""
    from scipy import ndimage

    found: dict[str, list[Lesion]] = {}
    for bone in schema.bones:
        lesion = schema.lesion_of(bone.name)
        if lesion is None:
            continue
        box = bounding_box(labels.array == lesion.id)
        if box is None:
            found[bone.name] = []
            continue
        mask = labels.array[box] == lesion.id
        components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        index = np.arange(1, n + 1)
        counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
        centres = np.atleast_2d(np.array(ndimage.center_of_mass(mask, components, index), dtype=np.float64))
        centres = labels.world_coords(centres + np.array([s.start for s in box]))
        order = np.argsort(-counts, kind="stable")
        found[bone.name] = [Lesion(bone.name, r + 1, float(counts[i] * labels.voxel_volume_mm3 / 1000.0),
                                   tuple(float(c) for c in centres[i]), None, None)  # type: ignore[arg-type]
                            for r, i in enumerate(order)]
    return found


def change_rows(change: dict[str, Any] | None, baseline: dict[str, Any], followup: dict[str, Any]) -> list[ChangeRow]:
    """BML volume and cartilage thickness change per bone/plate.

    Uses ``change.json`` (whose deltas come from aligned bones) where it has a row, else the difference
    of the two visits' measurements.
    """
    change = mapping(change)
    rows = []
    bml_change = mapping(change.get("bml"))
    base_bml, follow_bml = mapping(baseline.get("bml")), mapping(followup.get("bml"))
    for bone in (*BONES, "total"):
        entry = mapping(bml_change.get(bone))
        if entry:
            values = [number(entry.get(k)) for k in ("baseline_cm3", "followup_cm3", "delta_cm3", "delta_percent")]
            rows.append(_change_row("BML volume", bone, "cm3", values, worse_when="increase"))
            rows += _subregion_rows("BML volume", bone, "cm3", entry, ("baseline_cm3", "followup_cm3", "delta_cm3"),
                                    "increase")
            continue
        else:
            key = "total_volume_cm3"
            b = number(base_bml.get(key)) if bone == "total" else number(mapping(base_bml.get(bone)).get("volume_cm3"))
            f = number(follow_bml.get(key)) if bone == "total" else number(mapping(follow_bml.get(bone)).get("volume_cm3"))
            values = [b, f, *_delta(b, f)]
        rows.append(_change_row("BML volume", bone, "cm3", values, worse_when="increase"))
    cart_change = mapping(change.get("cartilage"))
    base_c, follow_c = mapping(baseline.get("cartilage")), mapping(followup.get("cartilage"))
    for plate in PLATES:
        entry = mapping(cart_change.get(plate))
        if entry:
            values = [number(entry.get(k)) for k in ("thickness_mean_baseline_mm", "thickness_mean_followup_mm",
                                                     "delta_mm", "delta_percent")]
            rows.append(_change_row("Mean cartilage thickness, common region", plate, "mm", values,
                                    worse_when="decrease"))
            rows += _subregion_rows("Mean cartilage thickness, common region", plate, "mm", entry,
                                    ("thickness_mean_baseline_mm", "thickness_mean_followup_mm", "delta_mm"), "decrease")
            continue
        else:
            b = number(mapping(mapping(base_c.get(plate)).get("thickness_mm")).get("mean"))
            f = number(mapping(mapping(follow_c.get(plate)).get("thickness_mm")).get("mean"))
            values = [b, f, *_delta(b, f)]
        rows.append(_change_row("Mean cartilage thickness, whole plate", plate, "mm", values, worse_when="decrease"))
    return rows


def alignment_rows(change: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per-bone alignment quality from ``change.json``: rotation (deg), translation (mm), residual."""
    alignment = mapping(mapping(change).get("alignment"))
    return [{"bone": bone, "rotation_deg": number(mapping(e).get("rotation_deg")),
             "translation_mm": number(mapping(e).get("translation_mm")), "residual": number(mapping(e).get("residual"))}
            for bone, e in sorted(alignment.items())]


def _delta(b: float | None, f: float | None) -> list[float | None]:
    if b is None or f is None:
        return [None, None]
    return [f - b, (f - b) / b * 100.0 if b > 0 else None]


def _subregion_rows(group: str, name: str, unit: str, entry: dict[str, Any], keys: tuple[str, str, str],
                    worse_when: str) -> list[ChangeRow]:
    """One row per subregion of a ``change.json`` bone or plate entry that has a value at either visit."""
    rows = []
    for sub, values in mapping(entry.get("subregions")).items():
        b, f, d = (number(mapping(values).get(k)) for k in keys)
        if b is None and f is None:
            continue
        row = _change_row(group, name, unit, [b, f, d, number(mapping(values).get("delta_percent"))], worse_when)
        rows.append(replace(row, subregion=str(sub)))
    return rows


def _change_row(group: str, name: str, unit: str, values: list[float | None], worse_when: str) -> ChangeRow:
    b, f, d, p = values
    if d is None:
        direction = "absent"
    elif round(d, 3) == 0:
        direction = "no change"
    else:
        direction = "increase" if d > 0 else "decrease"
    worse = None if direction in ("absent", "no change") else direction == worse_when
    return ChangeRow(group, name, unit, b, f, d, p, direction, worse)


def _ordered(data: dict[str, Any], known: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    """``known`` names first (all of them, present or not), then any other keys in file order."""
    return [*known, *(k for k in data if k not in known and k not in skip and isinstance(data[k], dict))]


def _grade(value: Any) -> int | None:
    v = number(value)
    return int(v) if v is not None else None


def _count(value: Any) -> int | None:
    v = number(value)
    return int(v) if v is not None else None
