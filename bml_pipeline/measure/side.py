"""Which knee is it? Left/right from anatomy, when neither the caller nor the file says.

With the anatomical axes of :mod:`~bml_pipeline.measure.frame`, ``+ml`` points to the patient's
right (RAS handedness). Then the knee is a right knee exactly when ``+ml`` is lateral: in RAS a right
knee's lateral side is +x (away from the body's midline) and its medial side -x; a left knee is the
mirror image. So the side follows from deciding which end of the ml axis is lateral, using
asymmetries of the bones (each "vote" below is measured in mm, positive when +ml looks lateral):

- ``tibial_plateau_depth``: the medial tibial plateau is longer front-to-back than the lateral one;
- ``trochlear_ridge``: the lateral trochlear ridge stands further anterior than the medial one;
- ``patella_offset``: the patella sits lateral of the femoral condyles' mid-line;
- ``femoral_shaft_offset``: the femoral shaft lies lateral of the condyle mass (the medial condyle
  and epicondyle flare out further);
- ``tibial_tuberosity_offset``: the tibial tuberosity is lateral of the plateau centre;
- ``medial_condyle_distal``: the medial femoral condyle reaches further distally.

Each vote's reliability (how often its sign was right) was measured on the 52 OAI label maps in
``shared/data/oai_labels`` (all right knees: all six cues agree on every one of them; mirrored maps
give left) and is combined as independent log-odds. The confidence reported is that posterior,
capped at 0.99 because 52 knees cannot support more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bml_pipeline.labels import LabelSchema
from bml_pipeline.measure.frame import KneeAxes, bone_point_sets, knee_axes
from bml_pipeline.volume import Volume

# cue -> (fraction of the 52 OAI knees where its sign was right, with a +1/+2 Laplace prior;
#         dead zone in mm below which the cue abstains)
CUE_RELIABILITY: dict[str, tuple[float, float]] = {
    "tibial_plateau_depth": (48 / 54, 1.0),
    "trochlear_ridge": (50 / 54, 1.0),
    "patella_offset": (49 / 54, 1.5),
    "femoral_shaft_offset": (53 / 54, 1.0),
    "tibial_tuberosity_offset": (52 / 54, 1.0),
    "medial_condyle_distal": (50 / 54, 0.5),
}
MAX_CONFIDENCE = 0.99
CONFLICT_CONFIDENCE = 0.9
"""Anatomy this sure of the other side than the caller or the file says is a side conflict (flagged)."""


@dataclass(frozen=True)
class SideEstimate:
    """Side of the knee, how it was decided and how sure. ``source``: "input", "metadata", "anatomy"
    or "unknown"; ``votes``: anatomical cue values (mm, positive = +ml looks lateral);
    ``anatomy_side`` and ``anatomy_confidence``: what the anatomy says, also when the side was given."""

    side: str | None
    source: str
    confidence: float
    votes: dict[str, float]
    anatomy_side: str | None = None
    anatomy_confidence: float = 0.5

    @property
    def conflict(self) -> str | None:
        """A sentence when a given side contradicts confident anatomy, else None."""
        if self.source not in ("input", "metadata") or self.anatomy_side in (None, self.side):
            return None
        if self.anatomy_confidence < CONFLICT_CONFIDENCE:
            return None
        given = "the --side option" if self.source == "input" else "the file's laterality tag"
        return (f"{given} says {self.side} but the anatomy says {self.anatomy_side} (confidence "
                f"{self.anatomy_confidence:.2f}): medial and lateral may be swapped")

    def to_dict(self) -> dict[str, object]:
        return {"side": self.side, "source": self.source, "confidence": self.confidence,
                "anatomy_side": self.anatomy_side, "anatomy_confidence": self.anatomy_confidence,
                "conflict": self.conflict, "votes_mm": dict(sorted(self.votes.items()))}


def side_votes(axes: KneeAxes, points: dict[str, np.ndarray]) -> dict[str, float]:
    """Anatomical cue values (mm, positive when +ml looks lateral) from bone point clouds (world mm)."""
    votes: dict[str, float] = {}
    femur = axes.to_frame(points["femur"])
    tibia = axes.to_frame(points["tibia"])
    top = np.percentile(tibia[:, 2], 99.5)
    plateau = tibia[tibia[:, 2] > top - 8.0]
    centre_t = float(np.median(plateau[:, 0]))
    lat_t, med_t = plateau[plateau[:, 0] > centre_t + 5.0], plateau[plateau[:, 0] < centre_t - 5.0]
    if len(lat_t) > 10 and len(med_t) > 10:
        votes["tibial_plateau_depth"] = _depth(med_t) - _depth(lat_t)
    bottom = np.percentile(femur[:, 2], 0.5)
    condyles = femur[femur[:, 2] < bottom + 20.0]
    centre_f = float(np.median(condyles[:, 0]))
    distal = femur[femur[:, 2] < bottom + 45.0]
    plus, minus = distal[distal[:, 0] > centre_f + 5.0], distal[distal[:, 0] < centre_f - 5.0]
    if len(plus) > 10 and len(minus) > 10:
        votes["trochlear_ridge"] = float(np.percentile(plus[:, 1], 99.5) - np.percentile(minus[:, 1], 99.5))
    c_plus, c_minus = condyles[condyles[:, 0] > centre_f + 5.0], condyles[condyles[:, 0] < centre_f - 5.0]
    if len(c_plus) > 10 and len(c_minus) > 10:
        votes["medial_condyle_distal"] = float(np.percentile(c_plus[:, 2], 1) - np.percentile(c_minus[:, 2], 1))
    if "patella" in points and len(points["patella"]) > 10:
        votes["patella_offset"] = float(axes.to_frame(points["patella"])[:, 0].mean() - centre_f)
    shaft = femur[femur[:, 2] > bottom + 45.0]
    if len(shaft) > 10:
        votes["femoral_shaft_offset"] = float(shaft[:, 0].mean() - condyles[:, 0].mean())
    below = tibia[(tibia[:, 2] < top - 10.0) & (tibia[:, 2] > top - 30.0)]
    if len(below) > 10:
        front = below[below[:, 1] > np.percentile(below[:, 1], 95)]
        votes["tibial_tuberosity_offset"] = float(front[:, 0].mean() - centre_t)
    return votes


def side_from_votes(votes: dict[str, float]) -> tuple[str | None, float]:
    """("right" | "left" | None, confidence) from cue values, as naive-Bayes log-odds."""
    logit = 0.0
    for name, value in votes.items():
        reliability, dead_zone = CUE_RELIABILITY[name]
        if abs(value) >= dead_zone:
            logit += math.copysign(math.log(reliability / (1.0 - reliability)), value)
    if logit == 0.0:
        return None, 0.5
    confidence = min(MAX_CONFIDENCE, 1.0 / (1.0 + math.exp(-abs(logit))))
    return ("right" if logit > 0 else "left"), confidence


def _depth(points: np.ndarray) -> float:
    return float(np.percentile(points[:, 1], 98) - np.percentile(points[:, 1], 2))


def infer_side(labels: Volume, schema: LabelSchema) -> tuple[str | None, float]:
    """Side of the knee in ``labels`` from anatomy alone: ("left" | "right" | None, confidence 0.5..0.99).

    None (confidence 0.5) when femur or tibia is missing or no cue is decisive.
    """
    estimate = estimate_side(labels, schema)
    return estimate.side, estimate.confidence


def estimate_side(labels: Volume, schema: LabelSchema, *, side: str | None = None, metadata_side: str | None = None,
                  axes: KneeAxes | None = None, points: dict[str, np.ndarray] | None = None) -> SideEstimate:
    """Side from the caller (``side``), else from metadata (``metadata_side``, else the label map's own
    laterality), else from anatomy. The anatomy is read in every case, so a given side that
    contradicts it is reported (:attr:`SideEstimate.conflict`)."""
    if side is not None and side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    points = points if points is not None else bone_point_sets(labels, schema)
    axes = axes if axes is not None else knee_axes(labels, schema, points)
    votes = side_votes(axes, points) if axes is not None else {}
    inferred, confidence = side_from_votes(votes) if votes else (None, 0.5)
    if side is not None:
        return SideEstimate(side, "input", 1.0, votes, inferred, confidence)
    metadata_side = metadata_side or labels.meta.laterality
    if metadata_side is not None:
        return SideEstimate(metadata_side, "metadata", 1.0, votes, inferred, confidence)
    return SideEstimate(inferred, "anatomy" if inferred else "unknown", confidence, votes, inferred, confidence)
