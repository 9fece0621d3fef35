"""MOAKS-style subregions of femur, tibia and patella, built from bone geometry in physical space.

All boundaries live in the anatomical frame of :mod:`~bml_pipeline.measure.frame` (coordinates
``lat`` = towards lateral, ``ap`` = anterior, ``si`` = superior, mm), so they follow the anatomy in
any pose, not the array axes. Following MOAKS (Hunter et al., Osteoarthritis Cartilage 2011):

- femur: medial/lateral split at the intercondylar notch (the least-populated ml position between the
  condyles, within 20 mm of the joint); trochlea / central (weight-bearing) / posterior split at the
  anterior and posterior rims of the tibial plateau of the same compartment (where the meniscal horns
  sit); the subregions cover the distal epiphysis, up to 0.55 x the condylar width above the joint;
- tibia: subspinous strip of +-8 % of the plateau width around the plateau's ml centre (under the
  tibial spines); medial and lateral plateaus each split into anterior/central/posterior thirds of
  their front-to-back extent; down to 0.4 x the plateau width below the plateau;
- patella: medial/lateral at the patella's ml centroid.

Without a tibia the femur's trochlea/central/posterior split uses thirds of each condyle's front-to-back
extent instead of the plateau rims.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bml_pipeline.measure.frame import KneeAxes

FEMUR_REGIONS = ("trochlea_medial", "trochlea_lateral", "central_medial", "central_lateral",
                 "posterior_medial", "posterior_lateral")
TIBIA_REGIONS = ("anterior_medial", "central_medial", "posterior_medial",
                 "anterior_lateral", "central_lateral", "posterior_lateral", "subspinous")
PATELLA_REGIONS = ("medial", "lateral")
BONE_REGIONS = {"femur": FEMUR_REGIONS, "tibia": TIBIA_REGIONS, "patella": PATELLA_REGIONS}

# Cartilage subregions: name -> bone subregions whose interface points it gathers.
CARTILAGE_REGIONS = {
    "femur": {"trochlea": ("trochlea_medial", "trochlea_lateral"), "central_medial": ("central_medial",),
              "central_lateral": ("central_lateral",), "posterior_medial": ("posterior_medial",),
              "posterior_lateral": ("posterior_lateral",)},
    "tibia": {"medial": ("anterior_medial", "central_medial", "posterior_medial"),
              "lateral": ("anterior_lateral", "central_lateral", "posterior_lateral")},
    "patella": {"patella": ("medial", "lateral")},
}

FEMUR_HEIGHT_PER_WIDTH = 0.55
TIBIA_DEPTH_PER_WIDTH = 0.4
SUBSPINOUS_HALF_WIDTH_PER_WIDTH = 0.08
SLAB_MM = 20.0
PLATEAU_SLAB_MM = 10.0


@dataclass(frozen=True)
class SubregionModel:
    """Subregion boundaries of one knee in frame coordinates (mm).

    ``lateral_sign`` is +1 when the frame's +ml points lateral (right knee), -1 otherwise.
    ``bounds`` holds, per bone, the landmarks the classifier uses (see :meth:`classify`).
    """

    axes: KneeAxes
    lateral_sign: float
    bounds: dict[str, dict[str, float]]

    def frame_coords(self, points: np.ndarray) -> np.ndarray:
        """(lat, ap, si) mm of world points (N, 3); ``lat`` grows towards lateral."""
        coords = self.axes.to_frame(points)
        coords[:, 0] *= self.lateral_sign
        return coords

    def classify(self, bone: str, points: np.ndarray, *, clip_height: bool = True) -> np.ndarray:
        """Subregion index into ``BONE_REGIONS[bone]`` of each world point (N, 3); -1 outside all
        subregions (beyond the epiphysis when ``clip_height``) or when the bone has no bounds."""
        out = np.full(len(points), -1, dtype=np.int8)
        b = self.bounds.get(bone)
        if b is None or len(points) == 0:
            return out
        lat, ap, si = self.frame_coords(points).T
        if bone == "femur":
            lateral = lat > b["notch_lat"]
            front = np.where(lateral, b["front_lateral"], b["front_medial"])
            back = np.where(lateral, b["back_lateral"], b["back_medial"])
            part = np.where(ap > front, 0, np.where(ap < back, 2, 1))
            out[:] = part * 2 + lateral
            if clip_height:
                out[si > b["top_si"]] = -1
        elif bone == "tibia":
            rel = lat - b["centre_lat"]
            lateral = rel > 0
            front = np.where(lateral, b["front_lateral"], b["front_medial"])
            back = np.where(lateral, b["back_lateral"], b["back_medial"])
            part = np.where(ap > front, 0, np.where(ap < back, 2, 1))
            out[:] = part + 3 * lateral
            out[np.abs(rel) < b["subspinous_half_width"]] = 6
            if clip_height:
                out[si < b["bottom_si"]] = -1
        elif bone == "patella":
            out[:] = lat > b["centre_lat"]
        return out

    def to_dict(self) -> dict[str, object]:
        return {"axes": self.axes.to_dict(), "lateral_sign": self.lateral_sign,
                "bounds_mm": {bone: dict(sorted(b.items())) for bone, b in sorted(self.bounds.items())}}


def build_subregions(axes: KneeAxes, side: str, points: dict[str, np.ndarray]) -> SubregionModel:
    """Subregion model from anatomical axes, the side and bone point clouds (world mm, per bone name)."""
    lateral_sign = 1.0 if side == "right" else -1.0
    model = SubregionModel(axes, lateral_sign, {})

    def coords(bone: str) -> np.ndarray | None:
        p = points.get(bone)
        return model.frame_coords(p) if p is not None and len(p) >= 50 else None

    bounds: dict[str, dict[str, float]] = {}
    tibia, femur, patella = coords("tibia"), coords("femur"), coords("patella")
    plateau_rims: dict[str, tuple[float, float]] = {}
    if tibia is not None:
        top = float(np.percentile(tibia[:, 2], 99.5))
        plateau = tibia[tibia[:, 2] > top - PLATEAU_SLAB_MM]
        lo, hi = np.percentile(plateau[:, 0], [2, 98])
        width = float(hi - lo)
        centre = float(0.5 * (lo + hi))
        half = SUBSPINOUS_HALF_WIDTH_PER_WIDTH * width
        t = {"centre_lat": centre, "subspinous_half_width": half, "bottom_si": top - TIBIA_DEPTH_PER_WIDTH * width,
             "top_si": top, "width": width}
        for name, sel in (("medial", plateau[:, 0] < centre - half), ("lateral", plateau[:, 0] > centre + half)):
            part = plateau[sel] if np.count_nonzero(sel) >= 10 else plateau
            back, front = (float(v) for v in np.percentile(part[:, 1], [2, 98]))
            plateau_rims[name] = (back, front)
            t[f"front_{name}"] = back + 2.0 * (front - back) / 3.0
            t[f"back_{name}"] = back + (front - back) / 3.0
        bounds["tibia"] = t
    if femur is not None:
        bottom = float(np.percentile(femur[:, 2], 0.5))
        condyles = femur[femur[:, 2] < bottom + SLAB_MM]
        lo, hi = np.percentile(condyles[:, 0], [2, 98])
        width = float(hi - lo)
        f = {"notch_lat": _notch(condyles[:, 0], float(lo), float(hi)), "top_si": bottom + FEMUR_HEIGHT_PER_WIDTH * width,
             "bottom_si": bottom, "width": width}
        for name, sel in (("medial", condyles[:, 0] < f["notch_lat"]), ("lateral", condyles[:, 0] >= f["notch_lat"])):
            if name in plateau_rims:
                back, front = plateau_rims[name]
            else:
                part = condyles[sel] if np.count_nonzero(sel) >= 10 else condyles
                b0, f0 = (float(v) for v in np.percentile(part[:, 1], [2, 98]))
                back, front = b0 + (f0 - b0) / 3.0, b0 + 2.0 * (f0 - b0) / 3.0
            f[f"front_{name}"], f[f"back_{name}"] = front, back
        bounds["femur"] = f
    if patella is not None:
        bounds["patella"] = {"centre_lat": float(patella[:, 0].mean())}
    return SubregionModel(axes, lateral_sign, bounds)


def _notch(lat: np.ndarray, lo: float, hi: float) -> float:
    """ml position of the intercondylar notch: the emptiest 1 mm bin of the condyles' ml histogram in
    the middle 40 % of their width (ties and flat histograms fall back to the middle)."""
    centre, half = 0.5 * (lo + hi), 0.2 * (hi - lo)
    edges = np.arange(centre - half, centre + half + 1.0, 1.0)
    if len(edges) < 3:
        return centre
    counts, _ = np.histogram(lat, bins=edges)
    smooth = np.convolve(counts, np.ones(3) / 3.0, mode="same")
    best = np.flatnonzero(smooth == smooth.min())
    return float(0.5 * (edges[best[len(best) // 2]] + edges[best[len(best) // 2] + 1]))
