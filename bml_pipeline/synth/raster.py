"""Partial-volume-correct rasterization of shapes given by signed distance functions (SDFs).

A shape is a function ``sdf(points) -> distances``: ``points`` has shape (N, 3) in world RAS mm, the
result (N,) is negative inside, positive outside, and its magnitude never exceeds the true distance to
the surface (exact SDFs and 1-Lipschitz under-estimates qualify). Each voxel gets the fraction of its
extent inside the shape, estimated by supersampling only the voxels near the surface; voxels whose
centre is farther from the surface than the voxel's half-diagonal are fully inside or outside.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product

import numpy as np

SDF = Callable[[np.ndarray], np.ndarray]
_CHUNK = 1 << 20  # points per SDF call, bounds memory


def voxel_half_diagonal(affine: np.ndarray) -> float:
    """Largest distance (mm) from a voxel's centre to any of its corners (oblique grids too)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    corners = np.array(list(product((-0.5, 0.5), repeat=3)))
    return float(np.linalg.norm(corners @ linear.T, axis=1).max())


def evaluate_on_grid(sdf: SDF, shape: tuple[int, int, int], affine: np.ndarray,
                     region: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """``sdf`` at every voxel centre of the grid (or of the sub-box ``region``), as float32."""
    region = region or tuple(slice(0, n) for n in shape)
    axes = [np.arange(s.start, s.stop, dtype=np.float64) for s in region]
    sub_shape = tuple(len(a) for a in axes)
    out = np.empty(int(np.prod(sub_shape)), dtype=np.float32)
    linear, origin = affine[:3, :3], affine[:3, 3]
    plane = sub_shape[1] * sub_shape[2]
    jj, kk = np.meshgrid(axes[1], axes[2], indexing="ij")
    jk = np.stack([jj.ravel(), kk.ravel()], axis=1) @ linear[:, 1:].T + origin
    rows_per_chunk = max(1, _CHUNK // plane)
    for start in range(0, sub_shape[0], rows_per_chunk):
        ii = axes[0][start:start + rows_per_chunk]
        pts = (ii[:, None, None] * linear[:, 0][None, None, :] + jk[None, :, :]).reshape(-1, 3)
        out[start * plane:start * plane + pts.shape[0]] = sdf(pts)
    return out.reshape(sub_shape)


def rasterize(sdf: SDF, shape: tuple[int, int, int], affine: np.ndarray, supersample: int | tuple[int, int, int] = 5,
              region: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """Fraction (0..1, float32) of each voxel inside the shape ``sdf < 0``.

    Args:
        sdf: signed distance function in world mm (see module docstring).
        shape: grid shape (i, j, k).
        affine: 4x4 voxel-to-RAS mm affine of the grid.
        supersample: sub-samples per voxel axis for boundary voxels (an int or one per axis); the
            volume error falls roughly with the square of this number.
        region: optional index box to evaluate; voxels outside it are 0.
    """
    affine = np.asarray(affine, dtype=np.float64)
    sub = (supersample,) * 3 if isinstance(supersample, int) else tuple(supersample)
    full_region = region or tuple(slice(0, n) for n in shape)
    dist = evaluate_on_grid(sdf, shape, affine, full_region)
    frac = (dist < 0).astype(np.float32)
    band = np.abs(dist) < voxel_half_diagonal(affine)
    idx = np.argwhere(band).astype(np.float64) + [s.start for s in full_region]
    if len(idx):
        offsets = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in sub], indexing="ij"), -1).reshape(-1, 3)
        linear, origin = affine[:3, :3], affine[:3, 3]
        centres = idx @ linear.T + origin
        delta = offsets @ linear.T
        inside = np.empty(len(idx), dtype=np.float32)
        per_chunk = max(1, _CHUNK // len(offsets))
        for start in range(0, len(idx), per_chunk):
            pts = (centres[start:start + per_chunk, None, :] + delta[None, :, :]).reshape(-1, 3)
            inside[start:start + per_chunk] = (sdf(pts) < 0).reshape(-1, len(offsets)).mean(axis=1)
        frac[band] = inside
    if region is None:
        return frac
    out = np.zeros(shape, dtype=np.float32)
    out[region] = frac
    return out
