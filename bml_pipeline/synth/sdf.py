"""Signed distance functions (SDFs) of the primitives the knee phantom is built from.

Every function takes points ``p`` of shape (N, 3) in mm and returns (N,) float64 distances, negative
inside. Each result is either the exact Euclidean distance or a lower bound of its magnitude (what
:func:`bml_pipeline.synth.raster.rasterize` needs). Coordinates are the phantom's local knee frame
(x medial->lateral for a right knee, y posterior->anterior, z inferior->superior).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def transform(p: np.ndarray, matrix: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """``p @ matrix.T + shift`` for (N, 3) points, column by column (numpy's small-matrix matmul is
    many times slower on large N)."""
    m = np.asarray(matrix, float)
    out = np.empty((m.shape[0], len(p))).T
    for i in range(m.shape[0]):
        out[:, i] = p[:, 0] * m[i, 0] + p[:, 1] * m[i, 1] + p[:, 2] * m[i, 2]
        if shift is not None:
            out[:, i] += shift[i]
    return out


def norm(v: np.ndarray) -> np.ndarray:
    """Row norms of an (N, 3) array."""
    return np.sqrt(v[:, 0] ** 2 + v[:, 1] ** 2 + v[:, 2] ** 2)


def _offset_norm(p: np.ndarray, c, scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """``|(p - c) / scale|`` row by row, column-wise (no (N, 3) temporaries)."""
    total = ((p[:, 0] - c[0]) / scale[0]) ** 2
    total += ((p[:, 1] - c[1]) / scale[1]) ** 2
    total += ((p[:, 2] - c[2]) / scale[2]) ** 2
    return np.sqrt(total)


def capsule(p: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Exact SDF of the capsule of ``radius`` mm around segment ``a``-``b``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    inv = 1.0 / float(ab @ ab)
    h = (p[:, 0] - a[0]) * (ab[0] * inv) + (p[:, 1] - a[1]) * (ab[1] * inv) + (p[:, 2] - a[2]) * (ab[2] * inv)
    np.clip(h, 0.0, 1.0, out=h)
    total = (p[:, 0] - a[0] - h * ab[0]) ** 2
    total += (p[:, 1] - a[1] - h * ab[1]) ** 2
    total += (p[:, 2] - a[2] - h * ab[2]) ** 2
    return np.sqrt(total) - radius


def ball(p: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Exact SDF of a ball."""
    return _offset_norm(p, centre) - radius


def ellipsoid(p: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """SDF bound of an axis-aligned ellipsoid: ``(|(p - c) / radii| - 1) * min(radii)``."""
    radii = np.asarray(radii, float)
    return (_offset_norm(p, centre, radii) - 1.0) * radii.min()


def lens_volume(r1: float, r2: float, distance: float) -> float:
    """Volume (mm3) of the intersection of two balls of radii ``r1``, ``r2`` whose centres are
    ``distance`` apart (the sum of two spherical caps)."""
    a = (distance**2 + r1**2 - r2**2) / (2 * distance)
    return sphere_cap_volume(r1, r1 - a) + sphere_cap_volume(r2, r2 - (distance - a))


def sphere_cap_volume(radius: float, height: float) -> float:
    """Volume (mm3) of a spherical cap."""
    return float(np.pi * height * height * (3 * radius - height) / 3)


def smooth_union(d1: np.ndarray, d2: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (blend width ``k`` mm); equals ``min`` wherever ``|d1 - d2| >= k``.

    The result never exceeds ``min(d1, d2)`` and differs from it by at most ``k / 4``; it is a valid
    distance bound outside and a slight over-estimate of depth inside, harmless for rasterization
    because the sign is exact.
    """
    h = np.clip(0.5 + 0.5 * (d2 - d1) / k, 0.0, 1.0)
    return d2 * (1 - h) + d1 * h - k * h * (1 - h)


def rotation_matrix(degrees: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees, right-handed): ``Rz @ Ry @ Rx``."""
    ax, ay, az = np.deg2rad(np.asarray(degrees, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Blob:
    """A smooth irregular lesion: an ellipsoid whose radius is modulated by low-frequency waves.

    In the ellipsoid's normalized frame ``u = A^-1 R^T (p - c)`` the blob is ``|u| < 1 + h(u/|u|)``
    with ``h(n) = sum_k a_k sin(w_k . n + phi_k)``, scaled by ``scale`` (linear). Its volume is
    ``scale^3 det(A) integral (1 + h)^3 / 3 dOmega`` (Gauss-Legendre quadrature, exact to ~1e-12).

    Attributes:
        centre: centre (mm, local frame).
        radii: ellipsoid semi-axes at scale 1 (mm).
        rotation: 3x3 rotation (columns: semi-axis directions), as a nested tuple.
        waves: tuples (a, wx, wy, wz, phase) of the radial modulation; sum |a| must stay below 0.3.
        scale: linear scale factor (volume scales with its cube).
    """

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    rotation: tuple[tuple[float, ...], ...]
    waves: tuple[tuple[float, float, float, float, float], ...] = ()
    scale: float = 1.0

    def _h(self, n: np.ndarray) -> np.ndarray:
        out = np.zeros(len(n))
        for a, wx, wy, wz, phase in self.waves:
            out += a * np.sin(n @ np.array([wx, wy, wz]) + phase)
        return out

    def _gradient_bound(self) -> float:
        return float(sum(abs(a) * np.linalg.norm([wx, wy, wz]) for a, wx, wy, wz, _ in self.waves))

    def sdf(self, p: np.ndarray) -> np.ndarray:
        """Lower bound of the signed distance (mm): ``(|u| / (1 + h) - 1)`` times the smallest radius
        over the Lipschitz constant of that normalized function."""
        rot = np.asarray(self.rotation, float)
        radii = np.asarray(self.radii, float) * self.scale
        u = transform(p - np.asarray(self.centre, float), rot.T) / radii
        length = norm(u)
        n = u / np.maximum(length, 1e-12)[:, None]
        r = 1.0 + self._h(n)
        lo = 1.0 - sum(abs(w[0]) for w in self.waves)
        lipschitz = np.sqrt(1 / lo**2 + (self._gradient_bound() / lo**2) ** 2)
        return (length / r - 1.0) * radii.min() / lipschitz

    def volume_mm3(self) -> float:
        """Exact volume (mm3) by quadrature over the unit sphere."""
        nodes, weights = np.polynomial.legendre.leggauss(96)
        phi = (np.arange(192) + 0.5) * 2 * np.pi / 192
        ct, ph = np.meshgrid(nodes, phi, indexing="ij")
        st = np.sqrt(1 - ct**2)
        n = np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3)
        integrand = ((1 + self._h(n)) ** 3 / 3).reshape(ct.shape)
        unit = float((integrand * weights[:, None]).sum() * 2 * np.pi / 192)
        return unit * float(np.prod(self.radii)) * self.scale**3

    def surface_points(self, count: int = 4000) -> np.ndarray:
        """Points on the blob surface (mm, local frame), quasi-uniform in direction."""
        i = np.arange(count) + 0.5
        ct = 1 - 2 * i / count
        ph = np.pi * (1 + 5**0.5) * i
        st = np.sqrt(1 - ct**2)
        n = np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1)
        u = n * (1 + self._h(n))[:, None]
        return (u * np.asarray(self.radii) * self.scale) @ np.asarray(self.rotation, float).T + np.asarray(self.centre)

    def bounding_radius(self) -> float:
        """Radius (mm) of a sphere about the centre that holds the blob."""
        return float(max(self.radii) * self.scale * (1 + sum(abs(w[0]) for w in self.waves)))
