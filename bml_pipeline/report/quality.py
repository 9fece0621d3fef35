"""Quality flags a reader should see before trusting the numbers.

Flags come from four places: the side (unknown or inferred), the field of view (a bone touching the
volume border near the joint), the label map's quality control (``measurements.json``'s ``qc`` block,
:mod:`bml_pipeline.qc`), and volumes or thicknesses outside plausible adult ranges. Problems met while
loading the run are added as notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bml_pipeline.labels import LabelSchema
from bml_pipeline.report.figures import label_boxes, label_mask
from bml_pipeline.report.tables import mapping, number, pretty
from bml_pipeline.report.views import axis_map
from bml_pipeline.volume import Volume

BORDER_NEAR_JOINT_MM = 45.0
"""A bone voxel on the volume border closer than this to the joint centre means the field of view
cuts through the bone where it matters (shafts leaving the volume farther away are normal)."""

PLAUSIBLE = {
    # structure: (quantity, low, high, unit); ranges wide enough for any adult knee in OAI-like scans.
    "femoral_cartilage": ("volume_cm3", 2.0, 40.0, "cm³"),
    "tibial_cartilage": ("volume_cm3", 0.5, 20.0, "cm³"),
    "patellar_cartilage": ("volume_cm3", 0.3, 12.0, "cm³"),
}
PLAUSIBLE_MEAN_THICKNESS_MM = (0.5, 5.0)
PLAUSIBLE_BML_TOTAL_CM3 = 30.0

_LETTER = (("left", "right"), ("posterior", "anterior"), ("inferior", "superior"))


@dataclass(frozen=True)
class Flag:
    """One quality flag: ``level`` is ``"warning"`` or ``"note"``."""

    level: str
    title: str
    detail: str


def quality_flags(measurements: dict[str, Any], labels: Volume | None,
                  schema: LabelSchema, notes: tuple[str, ...] = ()) -> list[Flag]:
    """All flags for one run, warnings first."""
    flags = [*_side_flags(measurements), *_qc_flags(measurements), *_plausibility_flags(measurements)]
    if labels is not None:
        flags += border_flags(labels, schema)
    flags += [Flag("note", "Report", note) for note in notes]
    return sorted(flags, key=lambda f: f.level != "warning")


def border_flags(labels: Volume, schema: LabelSchema, radius_mm: float = BORDER_NEAR_JOINT_MM) -> list[Flag]:
    """Bones touching a face of the volume within ``radius_mm`` of the joint centre (the centre of the
    cartilage's bounding box, else of all labels')."""
    array = labels.array
    objects = label_boxes(array)
    ids = [s.id for s in schema.of_kind("cartilage")] or [s.id for s in schema.structures]
    boxes = [objects[i - 1] for i in ids if 0 < i <= len(objects) and objects[i - 1] is not None]
    if not boxes:
        return []
    # The joint centre: the centre of the cartilage's bounding box (precise enough for a radius test).
    centre = [(min(b[a].start for b in boxes) + max(b[a].stop for b in boxes) - 1) / 2 for a in range(3)]
    joint = labels.world_coords(np.array(centre))
    world_of, sign_of = axis_map(labels.affine)
    flags = []
    for bone in schema.bones:
        ids = schema.bone_ids(bone.name)
        hits = []
        for axis in range(3):
            for end in (0, array.shape[axis] - 1):
                face = array[(slice(None),) * axis + (end,)]
                where = np.argwhere(label_mask(face, ids))
                if where.size == 0:
                    continue
                ijk = np.insert(where.astype(np.float64), axis, end, axis=1)
                distance = float(np.linalg.norm(labels.world_coords(ijk) - joint, axis=1).min())
                if distance < radius_mm:
                    positive = (end > 0) == (sign_of[axis] > 0)
                    hits.append(f"{_LETTER[world_of[axis]][int(positive)]} border, {distance:.0f} mm from the joint")
        if hits:
            flags.append(Flag("warning", f"Field of view cuts the {bone.name}",
                              f"The {bone.name} touches the volume's {'; '.join(hits)}: part of it may be "
                              "outside the scan, so its volume and lesions there may be incomplete."))
    return flags


def _side_flags(m: dict[str, Any]) -> list[Flag]:
    side = m.get("side")
    source = m.get("side_source")
    confidence = number(m.get("side_confidence"))
    if side not in ("left", "right"):
        return [Flag("warning", "Side unknown", "Neither the header nor the anatomy gave the knee's side; "
                     "medial and lateral cannot be named.")]
    if isinstance(source, str) and source.lower() not in ("input", "metadata", "header", "dicom"):
        conf = f" (confidence {confidence:.2f})" if confidence is not None else ""
        return [Flag("warning" if confidence is not None and confidence < 0.9 else "note", "Side inferred",
                     f"The {side} side was inferred from {source}{conf}, not read from the image header.")]
    return []


def _qc_flags(m: dict[str, Any]) -> list[Flag]:
    checks = mapping(m.get("qc")).get("checks") or []
    return [Flag("warning", f"Quality control {c.get('status')}ed: {str(c.get('name', '')).replace('_', ' ')}",
                 str(c.get("detail", ""))) for c in checks if isinstance(c, dict) and c.get("status") in ("fail", "warn")]


def _plausibility_flags(m: dict[str, Any]) -> list[Flag]:
    flags = []
    cartilage = mapping(m.get("cartilage"))
    for plate, (key, low, high, unit) in PLAUSIBLE.items():
        entry = mapping(cartilage.get(plate))
        value = number(entry.get(key))
        if value is not None and not low <= value <= high:
            flags.append(Flag("warning", f"Implausible {pretty(plate).lower()} volume",
                              f"{value:.2f} {unit}, expected {low}–{high} {unit}."))
        mean = number(mapping(entry.get("thickness_mm")).get("mean"))
        lo, hi = PLAUSIBLE_MEAN_THICKNESS_MM
        if mean is not None and not lo <= mean <= hi:
            flags.append(Flag("warning", f"Implausible {pretty(plate).lower()} thickness",
                              f"mean {mean:.2f} mm, expected {lo}–{hi} mm."))
    total = number(mapping(m.get("bml")).get("total_volume_cm3"))
    if total is not None and total > PLAUSIBLE_BML_TOTAL_CM3:
        flags.append(Flag("warning", "Implausible BML volume",
                          f"total {total:.2f} cm³ is above {PLAUSIBLE_BML_TOTAL_CM3} cm³."))
    return flags
