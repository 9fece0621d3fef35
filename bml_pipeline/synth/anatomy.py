"""Geometry of the analytic knee phantom in its local frame (mm).

Local frame of a right knee: x medial -> lateral, y posterior -> anterior, z inferior -> superior,
origin near the joint centre. A left knee is the mirror image (x negated), applied by the pose.

- Femur: two condyles, each a cylinder along x (radius 20 mm) cut by a ball (spherical ends), smoothly
  joined (4 mm blend) to an ellipsoidal trochlear block and a shaft capsule.
- Tibia: an ellipsoidal plateau cut by a large ball (radius 120 mm, a gently convex top) smoothly joined
  to a shaft capsule.
- Patella: a lens (intersection of two balls) whose dome of radius 25 mm faces the femur.
- Cartilage: femoral plates on the cylindrical part of each condyle, tibial plates on the plateau dome,
  the patellar plate on the patella's dome, each on a patch where the bone surface is exactly the base
  surface (no blend reaches it; checked in the tests).

No bone has a flat face: flat faces aligned with the voxel grid alias (their voxel volume jumps with
sub-voxel shifts), which would make the rasterized volumes depend on the pose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bml_pipeline.synth import sdf as S
from bml_pipeline.synth.shells import CylinderShell, Shell, SphereShell

BONES = ("femur", "tibia", "patella")
PLATES = {"femur": "femoral_cartilage", "tibia": "tibial_cartilage", "patella": "patellar_cartilage"}

# Femur
CONDYLE_R, CONDYLE_Y, CONDYLE_Z = 20.0, -8.0, 20.0
CONDYLE_X, CONDYLE_BALL = 21.0, 24.5   # axis x of each condyle, radius of its end-capping ball
TROCHLEA_C, TROCHLEA_RADII = (0.0, 3.0, 33.0), (33.0, 14.0, 17.0)
FEMUR_SHAFT = ((0.0, 0.0, 40.0), (0.0, 0.0, 55.0), 13.0)
FEMUR_BLEND = 4.0
# Tibia
PLATEAU_TOP, PLATEAU_DOME = -7.5, 120.0
PLATEAU_C, PLATEAU_RADII = (0.0, -4.0, -13.5), (38.0, 25.0, 14.0)
TIBIA_SHAFT = ((0.0, -6.0, -30.0), (0.0, -6.0, -38.0), 14.0)
TIBIA_BLEND = 5.0
DOME_CENTRE = (0.0, PLATEAU_C[1], PLATEAU_TOP - PLATEAU_DOME)
# Patella: the posterior dome (ball 1) and the anterior surface (ball 2), centres on a y line.
PATELLA_C, PATELLA_R = (0.0, 48.0, 34.0), 25.0
PATELLA_C2, PATELLA_R2 = (0.0, -10.0, 34.0), 50.0

# Local bounding boxes (lo, hi) in mm that hold each bone with its cartilage.
LOCAL_BOXES = {
    "femur": ((-47.0, -34.0, -4.5), (47.0, 19.0, 69.0)),
    "tibia": ((-39.0, -30.0, -53.0), (39.0, 22.0, -3.5)),
    "patella": ((-23.0, 18.5, 11.5), (23.0, 41.0, 56.5)),
}


def condyle_sdf(p: np.ndarray, cx: float) -> np.ndarray:
    """SDF (exact inside, bound outside) of one condyle centred at x = ``cx``."""
    cyl = np.hypot(p[:, 1] - CONDYLE_Y, p[:, 2] - CONDYLE_Z) - CONDYLE_R
    return np.maximum(cyl, S.ball(p, (cx, CONDYLE_Y, CONDYLE_Z), CONDYLE_BALL))


def condyle_patch_half_width() -> float:
    """Half-width in x (mm) of a condyle's cylindrical surface (where the ball does not cut it)."""
    return float(np.sqrt(CONDYLE_BALL**2 - CONDYLE_R**2))


def femur_sdf(p: np.ndarray) -> np.ndarray:
    """SDF (mm) of the whole femur (lesions included), local frame."""
    condyles = np.minimum(condyle_sdf(p, -CONDYLE_X), condyle_sdf(p, CONDYLE_X))
    d = S.smooth_union(condyles, S.ellipsoid(p, TROCHLEA_C, TROCHLEA_RADII), FEMUR_BLEND)
    a, b, r = FEMUR_SHAFT
    return S.smooth_union(d, S.capsule(p, a, b, r), FEMUR_BLEND)


def tibia_sdf(p: np.ndarray) -> np.ndarray:
    """SDF (mm) of the whole tibia (lesions included), local frame."""
    a, b, r = TIBIA_SHAFT
    plateau = np.maximum(S.ellipsoid(p, PLATEAU_C, PLATEAU_RADII), S.ball(p, DOME_CENTRE, PLATEAU_DOME))
    return S.smooth_union(plateau, S.capsule(p, a, b, r), TIBIA_BLEND)


def patella_sdf(p: np.ndarray) -> np.ndarray:
    """SDF bound (mm) of the whole patella (lesions included), local frame."""
    return np.maximum(S.ball(p, PATELLA_C, PATELLA_R), S.ball(p, PATELLA_C2, PATELLA_R2))


BONE_SDFS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "femur": femur_sdf, "tibia": tibia_sdf, "patella": patella_sdf}

# Reference volumes (mm3) of the whole bones built by smooth unions: ``integrate_volume_mm3`` at 0.2 mm
# with 4^3 subsamples, mean of two grid offsets that agreed within 2.5 mm3 (2e-5); a test re-derives them
# on a coarser grid. The patella has a closed form.
BONE_VOLUME_MM3 = {"femur": 123279.4, "tibia": 52270.9,
                   "patella": S.lens_volume(PATELLA_R, PATELLA_R2, PATELLA_C[1] - PATELLA_C2[1])}
BONE_VOLUME_METHOD = {"femur": "numerical integration (0.2 mm grid, 4^3 subsamples at the surface)",
                      "tibia": "numerical integration (0.2 mm grid, 4^3 subsamples at the surface)",
                      "patella": "closed form (lens of two balls)"}


@dataclass(frozen=True)
class Thickness:
    """Peak (interior) cartilage thickness per plate (mm) and the smooth relative variation."""

    femoral_mm: float = 2.4
    tibial_mm: float = 2.6
    patellar_mm: float = 3.0
    variation: float = 0.15


def plates(th: Thickness, scale: dict[str, float] | None = None) -> dict[str, tuple[Shell, ...]]:
    """The cartilage shells of each plate, thickness multiplied by ``scale[plate]`` (default 1)."""
    scale = scale or {}
    inner = condyle_patch_half_width() - 1.0
    fem = tuple(
        CylinderShell(peak_mm=th.femoral_mm, variation=th.variation, scale=scale.get("femoral_cartilage", 1.0),
                      y0=CONDYLE_Y, z0=CONDYLE_Z, radius=CONDYLE_R, x0=cx - inner, x1=cx + inner,
                      phi0=np.deg2rad(-115.0), phi1=np.deg2rad(55.0))
        for cx in (-CONDYLE_X, CONDYLE_X))
    tib = tuple(
        SphereShell(peak_mm=th.tibial_mm, variation=th.variation, scale=scale.get("tibial_cartilage", 1.0),
                    centre=DOME_CENTRE, radius=PLATEAU_DOME, axis=_unit((cx, 0.0, PLATEAU_DOME)),
                    alpha1=13.0 / PLATEAU_DOME)
        for cx in (-17.0, 17.0))
    pat = (SphereShell(peak_mm=th.patellar_mm, variation=th.variation, scale=scale.get("patellar_cartilage", 1.0),
                       centre=PATELLA_C, radius=PATELLA_R, axis=(0.0, -1.0, 0.0), alpha1=0.8),)
    return {"femoral_cartilage": fem, "tibial_cartilage": tib, "patellar_cartilage": pat}


def _unit(v: tuple[float, float, float]) -> tuple[float, float, float]:
    n = np.asarray(v, float)
    return tuple(float(x) for x in n / np.linalg.norm(n))


def union_sdf(shells: tuple[Shell, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """SDF bound of the union of disjoint shells."""
    def f(p: np.ndarray) -> np.ndarray:
        return np.min(np.stack([s.sdf(p) for s in shells]), axis=0)
    return f
