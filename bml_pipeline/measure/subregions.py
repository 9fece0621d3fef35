"""MOAKS-style subregions of femur, tibia and patella, built from bone geometry in physical space.

All boundaries live in the anatomical frame of :mod:`~bml_pipeline.measure.frame` (coordinates
``lat`` = towards lateral, ``ap`` = anterior, ``si`` = superior, mm), so they follow the anatomy in
any pose, not the array axes. Following MOAKS (Hunter et al., Osteoarthritis Cartilage 2011):

- femur: medial/lateral split at the intercondylar notch (the least-populated ml position between the
  condyles, within 20 mm of the joint); trochlea / central (weight-bearing) / posterior split at the
  anterior and posterior rims of the tibial plateau of the same compartment (where the meniscal horns
  sit); the subregions cover the distal epiphysis: up to 0.35 x the condylar width above the most distal
  point (about the physeal scar), the trochlea up to 0.55 x (where the trochlear cartilage ends);
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

FEMUR_HEIGHT_PER_WIDTH = 0.35
TROCHLEA_HEIGHT_PER_WIDTH = 0.55
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
        if bone not in self.bounds or len(points) == 0:
            return np.full(len(points), -1, dtype=np.int8)
        lat, ap, si = self.frame_coords(points).T
        return self._classify(bone, lat, ap, si, clip_height)

    def classify_voxels(self, bone: str, affine: np.ndarray, ijk: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """:meth:`classify` of the voxel centres with integer indices ``ijk`` (as from ``np.nonzero``) on
        a grid with ``affine``. Frame coordinates are separable per array axis, so each is a sum of
        three small lookups instead of a matrix product per voxel."""
        if bone not in self.bounds or len(ijk[0]) == 0:
            return np.full(len(ijk[0]), -1, dtype=np.int8)
        m = self.axes.matrix * np.array([[self.lateral_sign], [1.0], [1.0]])
        affine = np.asarray(affine, dtype=np.float64)
        per_axis = m @ affine[:3, :3]  # (frame coordinate, array axis)
        const = m @ (affine[:3, 3] - self.axes.origin)
        coords = []
        for c in range(3):
            total = np.full(len(ijk[0]), const[c], dtype=np.float32)
            for a in range(3):
                lookup = (per_axis[c, a] * np.arange(int(ijk[a].max()) + 1)).astype(np.float32)
                total += lookup[ijk[a]]
            coords.append(total)
        return self._classify(bone, *coords, clip_height=True)

    def _classify(self, bone: str, lat: np.ndarray, ap: np.ndarray, si: np.ndarray, clip_height: bool) -> np.ndarray:
        b = self.bounds[bone]
        if bone == "femur":
            lateral = lat > b["notch_lat"]
            front = np.where(lateral, b["front_lateral"], b["front_medial"])
            back = np.where(lateral, b["back_lateral"], b["back_medial"])
            trochlea = ap > front
            out = (np.where(trochlea, 0, np.where(ap < back, 2, 1)) * 2 + lateral).astype(np.int8)
            if clip_height:
                out[si > np.where(trochlea, b["trochlea_top_si"], b["top_si"])] = -1
        elif bone == "tibia":
            rel = lat - b["centre_lat"]
            lateral = rel > 0
            front = np.where(lateral, b["front_lateral"], b["front_medial"])
            back = np.where(lateral, b["back_lateral"], b["back_medial"])
            out = (np.where(ap > front, 0, np.where(ap < back, 2, 1)) + 3 * lateral).astype(np.int8)
            out[np.abs(rel) < b["subspinous_half_width"]] = 6
            if clip_height:
                out[si < b["bottom_si"]] = -1
        else:
            out = (lat > b["centre_lat"]).astype(np.int8)
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
        f = {"notch_lat": _notch(condyles[:, 0], float(lo), float(hi)), "bottom_si": bottom, "width": width,
             "top_si": bottom + FEMUR_HEIGHT_PER_WIDTH * width,
             "trochlea_top_si": bottom + TROCHLEA_HEIGHT_PER_WIDTH * width}
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
