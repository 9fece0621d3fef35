"""Cartilage plates as shells of known, smoothly varying thickness on analytic bone surfaces.

A plate lies on a patch of a base surface (cylinder or sphere) that coincides exactly with the
bone surface there. At each point ``s`` of the patch the cartilage spans the segment from ``s`` along
the outward normal to ``s + t(s) n(s)``; ``t`` tapers smoothly (sin^2 ramp) to zero at the patch edge.

Truth, computed by quadrature over the patch parameters (midpoint rule on a fine grid; relative error
below 1e-6 for these smooth integrands):

- volume = integral over the patch of ``t + H t^2 + K t^3 / 3`` dA (Steiner's formula, H the mean and K
  the Gaussian curvature of the base surface; ``1/(2R), 0`` for a cylinder, ``1/R, 1/R^2``
  for a sphere);
- mean thickness = area-weighted mean of ``t`` over the bone-side (inner) surface of the patch, i.e.
  ``integral t dA / area(patch)``, the patch being the support of ``t`` (all of the bone surface the
  plate covers).

Local frame as in :mod:`bml_pipeline.synth.sdf`; lengths in mm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from bml_pipeline.synth.sdf import norm, transform

_QUAD = 500  # quadrature nodes per parameter axis


def taper(s: np.ndarray, width: float) -> np.ndarray:
    """0 for ``s <= 0``, ``sin^2(pi s / 2 width)`` up to ``width``, then 1 (``s`` in mm from the edge)."""
    x = np.clip(np.asarray(s, float) / width, 0.0, 1.0)
    return np.sin(0.5 * np.pi * x) ** 2


@dataclass(frozen=True)
class Shell:
    """Common parameters of a plate.

    Attributes:
        peak_mm: thickness on the interior of the patch before modulation (mm).
        variation: relative amplitude of the smooth thickness modulation (0 = constant interior).
        taper_mm: width of the edge ramp, as arc length on the base surface (mm).
        scale: multiplies the whole thickness field (a +2.4 % change is ``scale=1.024``).
    """

    peak_mm: float
    variation: float = 0.15
    taper_mm: float = 4.0
    scale: float = 1.0

    def scaled(self, factor: float) -> Shell:
        """The same plate with every thickness multiplied by ``factor``."""
        return replace(self, scale=self.scale * factor)

    # Subclasses implement: _params(p) -> (u, v, radial), thickness(u, v), _quadrature() -> (t, dA, H, K).
    def sdf(self, p: np.ndarray) -> np.ndarray:
        """Lower bound of the signed distance (mm) to the plate."""
        u, v, height = self._params(p)
        t = self.thickness(u, v)
        return np.maximum(np.maximum(-height, (height - t) / self._lipschitz), self._extent(p))

    def truth(self) -> dict[str, float]:
        """Volume (mm3), bone-side area (mm2) and mean thickness (mm) of the plate."""
        t, da, h, k = self._quad
        area = float(da.sum())
        return {"volume_mm3": float(((t + h * t**2 + k * t**3 / 3) * da).sum()),
                "area_mm2": area, "mean_thickness_mm": float((t * da).sum() / area),
                "max_thickness_mm": float(t.max())}

    @cached_property
    def _quad(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Thickness samples, their surface area elements (mm2), and the mean and Gaussian curvature."""
        return self._quadrature()

    def local_box(self, margin_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box (lo, hi, mm, local frame) holding the plate, grown by ``margin_mm``."""
        u, v, _, _ = self._grid()
        uu, vv = np.meshgrid(u[::8], v[::8], indexing="ij")
        top = self.scale * self.peak_mm * (1 + abs(self.variation))
        pts = np.concatenate([self._point(uu.ravel(), vv.ravel(), h) for h in (0.0, top)])
        return pts.min(axis=0) - margin_mm, pts.max(axis=0) + margin_mm

    @cached_property
    def _lipschitz(self) -> float:
        """Bound on |grad (height - t)|: sqrt(1 + g^2), g the steepest thickness slope per mm on the
        base surface (slopes only shrink farther out, where arc lengths grow)."""
        t = self._quad[0]
        gu, gv = self._slopes(t)
        return float(np.sqrt(1.0 + (np.hypot(gu, gv).max() * 1.02) ** 2))

    def _modulation(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Smooth relative modulation from normalized patch coordinates ``a, b`` in [0, 1]."""
        return 1.0 + self.variation * np.sin(2.4 * a + 0.7) * np.cos(1.9 * b - 0.4)


@dataclass(frozen=True)
class CylinderShell(Shell):
    """Plate on a cylinder along x (axis through ``(y0, z0)``, radius ``radius``), over
    ``x0 <= x <= x1`` and angles ``phi0 <= phi <= phi1`` (radians; 0 points inferior, positive anterior)."""

    y0: float = 0.0
    z0: float = 0.0
    radius: float = 20.0
    x0: float = -10.0
    x1: float = 10.0
    phi0: float = -1.9
    phi1: float = 1.0

    def _extent(self, p: np.ndarray) -> np.ndarray:
        """Exact SDF of the region holding the plate: the slab x0..x1 cut by the wedge phi0..phi1
        (half-planes through the axis; the wedge must be narrower than 180 degrees)."""
        dy, dz = p[:, 1] - self.y0, p[:, 2] - self.z0
        # Direction of angle phi is (sin phi, -cos phi) in (y, z); inward normals of the wedge's sides.
        n0 = (np.cos(self.phi0), np.sin(self.phi0))
        n1 = (-np.cos(self.phi1), -np.sin(self.phi1))
        return np.max(np.stack([self.x0 - p[:, 0], p[:, 0] - self.x1,
                                -(n0[0] * dy + n0[1] * dz), -(n1[0] * dy + n1[1] * dz)]), axis=0)

    def _point(self, x: np.ndarray, phi: np.ndarray, height: float) -> np.ndarray:
        r = self.radius + height
        return np.stack([x, self.y0 + r * np.sin(phi), self.z0 - r * np.cos(phi)], axis=1)

    def _params(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dy, dz = p[:, 1] - self.y0, p[:, 2] - self.z0
        return p[:, 0], np.arctan2(dy, -dz), np.hypot(dy, dz) - self.radius

    def thickness(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """Thickness (mm) at patch coordinates ``x`` (mm) and ``phi`` (rad); 0 off the patch."""
        arc = self.radius * np.minimum(phi - self.phi0, self.phi1 - phi)
        edge = np.minimum(x - self.x0, self.x1 - x)
        a = (x - self.x0) / (self.x1 - self.x0)
        b = (phi - self.phi0) / (self.phi1 - self.phi0)
        return self.scale * self.peak_mm * taper(edge, self.taper_mm) * taper(arc, self.taper_mm) * self._modulation(a, b)

    def _grid(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        du, dv = (self.x1 - self.x0) / _QUAD, (self.phi1 - self.phi0) / _QUAD
        u = self.x0 + (np.arange(_QUAD) + 0.5) * du
        v = self.phi0 + (np.arange(_QUAD) + 0.5) * dv
        return u, v, du, dv

    def _quadrature(self):
        u, v, du, dv = self._grid()
        uu, vv = np.meshgrid(u, v, indexing="ij")
        t = self.thickness(uu, vv)
        da = np.full(t.shape, self.radius * du * dv)
        return t, da, 1 / (2 * self.radius), 0.0

    def _slopes(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, _, du, dv = self._grid()
        return np.gradient(t, du, axis=0), np.gradient(t, dv * self.radius, axis=1)


@dataclass(frozen=True)
class SphereShell(Shell):
    """Plate on the sphere ``|p - centre| = radius`` around the pole ``axis`` (unit vector), over polar
    angles ``alpha <= alpha1`` (radians)."""

    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radius: float = 25.0
    axis: tuple[float, float, float] = (0.0, -1.0, 0.0)
    alpha1: float = 0.8

    def _frame(self) -> np.ndarray:
        n = np.asarray(self.axis, float)
        helper = np.array([0.0, 0.0, 1.0]) if abs(n[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
        e1 = np.cross(helper, n)
        e1 /= np.linalg.norm(e1)
        return np.stack([e1, np.cross(n, e1), n], axis=1)

    def _extent(self, p: np.ndarray) -> np.ndarray:
        """Exact SDF of the half-space ``(p - centre) . axis >= radius cos(alpha1)`` holding the plate."""
        return self.radius * np.cos(self.alpha1) - (p - np.asarray(self.centre)) @ np.asarray(self.axis, float)

    def _point(self, alpha: np.ndarray, beta: np.ndarray, height: float) -> np.ndarray:
        r = self.radius + height
        local = np.stack([r * np.sin(alpha) * np.cos(beta), r * np.sin(alpha) * np.sin(beta), r * np.cos(alpha)], 1)
        return local @ self._frame().T + np.asarray(self.centre)

    def _params(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = transform(p - np.asarray(self.centre), self._frame().T)
        r = norm(d)
        alpha = np.arccos(np.clip(d[:, 2] / np.maximum(r, 1e-12), -1, 1))
        return alpha, np.arctan2(d[:, 1], d[:, 0]), r - self.radius

    def thickness(self, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """Thickness (mm) at polar angle ``alpha`` and azimuth ``beta`` (radians); 0 beyond ``alpha1``."""
        edge = (self.alpha1 - alpha) * self.radius
        a = alpha / self.alpha1 * np.cos(beta) * 0.5 + 0.5
        b = alpha / self.alpha1 * np.sin(beta) * 0.5 + 0.5
        return self.scale * self.peak_mm * taper(edge, self.taper_mm) * self._modulation(a, b)

    def _grid(self):
        du, dv = self.alpha1 / _QUAD, 2 * np.pi / _QUAD
        return (np.arange(_QUAD) + 0.5) * du, -np.pi + (np.arange(_QUAD) + 0.5) * dv, du, dv

    def _quadrature(self):
        u, v, du, dv = self._grid()
        uu, vv = np.meshgrid(u, v, indexing="ij")
        t = self.thickness(uu, vv)
        da = self.radius**2 * np.sin(uu) * du * dv
        return t, da, 1 / self.radius, 1 / self.radius**2

    def _slopes(self, t):
        u, _, du, dv = self._grid()
        gu = np.gradient(t, du * self.radius, axis=0)
        gv = np.gradient(t, dv, axis=1) / (self.radius * np.maximum(np.sin(u), 1e-3))[:, None]
        return gu, gv
