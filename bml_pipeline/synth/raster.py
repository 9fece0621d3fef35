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


def rasterize_sparse(sdf: SDF, shape: tuple[int, int, int], affine: np.ndarray,
                     supersample: int | tuple[int, int, int] = 5,
                     region: tuple[slice, slice, slice] | None = None,
                     block: int | tuple[int, int, int] = 4) -> np.ndarray:
    """Same fractions as :func:`rasterize`, evaluating ``sdf`` only near the surface; returns only
    the sub-array of ``region`` (float32, shape of the region). See :func:`rasterize_with_distance`."""
    return rasterize_with_distance(sdf, shape, affine, supersample, region, block)[0]


def rasterize_with_distance(sdf: SDF, shape: tuple[int, int, int], affine: np.ndarray,
                            supersample: int | tuple[int, int, int] = 5,
                            region: tuple[slice, slice, slice] | None = None,
                            block: int | tuple[int, int, int] = 4) -> tuple[np.ndarray, np.ndarray]:
    """Fractions (as :func:`rasterize`) and the SDF at voxel centres over ``region`` (both float32,
    shape of the region). Where the SDF was not evaluated the distance holds a bound: ``-r`` inside,
    ``+r`` outside, ``r`` the block reach below (mm).

    The SDF is first sampled at the centres of blocks of ``block`` voxels per axis; a block whose centre lies
    farther from the surface than the block's radius plus a voxel half-diagonal is wholly inside or
    outside (the SDF bounds the true distance), so only the remaining blocks are evaluated voxel by
    voxel. Cost grows with the surface area instead of the volume.
    """
    affine = np.asarray(affine, dtype=np.float64)
    sub = (supersample,) * 3 if isinstance(supersample, int) else tuple(supersample)
    region = region or tuple(slice(0, n) for n in shape)
    lo = np.array([s.start for s in region])
    hi = np.array([s.stop for s in region])
    linear, origin = affine[:3, :3], affine[:3, 3]
    half_diag = voxel_half_diagonal(affine)
    blocks = np.array((block,) * 3 if isinstance(block, int) else block)
    corners = np.array(list(product((-0.5, 0.5), repeat=3))) * (blocks - 1)
    reach = float(np.linalg.norm(corners @ linear.T, axis=1).max()) + half_diag
    axes = [np.arange(a, b, n) for a, b, n in zip(lo, hi, blocks)]
    starts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    centre_dist = _sdf_chunked(sdf, _to_world(starts + (blocks - 1) / 2, linear, origin))
    out = np.zeros(tuple(hi - lo), dtype=np.float32)
    distance = np.full(tuple(hi - lo), reach, dtype=np.float32)
    offsets = np.stack(np.meshgrid(*[np.arange(n) for n in blocks], indexing="ij"), -1).reshape(-1, 3)
    for kind, chosen in (("inside", centre_dist <= -reach), ("active", np.abs(centre_dist) < reach)):
        idx = (starts[chosen][:, None, :] + offsets[None]).reshape(-1, 3)
        idx = idx[np.all((idx >= lo) & (idx < hi), axis=1)]
        if kind == "inside":
            local = idx - lo
            out[local[:, 0], local[:, 1], local[:, 2]] = 1.0
            distance[local[:, 0], local[:, 1], local[:, 2]] = -reach
            continue
        dist = _sdf_chunked(sdf, _to_world(idx, linear, origin))
        frac = (dist < 0).astype(np.float32)
        band = np.abs(dist) < half_diag
        if band.any():
            sub_offsets = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in sub], indexing="ij"),
                                   -1).reshape(-1, 3)
            centres = _to_world(idx[band], linear, origin)
            delta = sub_offsets @ linear.T
            inside = np.empty(len(centres), dtype=np.float32)
            per_chunk = max(1, _CHUNK // len(sub_offsets))
            for start in range(0, len(centres), per_chunk):
                chunk = centres[start:start + per_chunk]
                pts = np.empty((3, len(chunk), len(delta)))
                for axis in range(3):
                    np.add(chunk[:, axis, None], delta[None, :, axis], out=pts[axis])
                pts = pts.reshape(3, -1).T
                inside[start:start + per_chunk] = (sdf(pts) < 0).reshape(-1, len(sub_offsets)).mean(axis=1)
            frac[band] = inside
        local = idx - lo
        out[local[:, 0], local[:, 1], local[:, 2]] = frac
        distance[local[:, 0], local[:, 1], local[:, 2]] = dist
    return out, distance


def _sdf_chunked(sdf: SDF, points: np.ndarray) -> np.ndarray:
    out = np.empty(len(points), dtype=np.float32)
    for start in range(0, len(points), _CHUNK):
        out[start:start + _CHUNK] = sdf(points[start:start + _CHUNK])
    return out


def _to_world(ijk: np.ndarray, linear: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """World points of voxel indices, column by column (faster than a (N, 3) @ (3, 3) matmul); the
    (N, 3) result is column-major, so each coordinate column is contiguous."""
    out = np.empty((3, len(ijk))).T
    ijk = ijk.astype(np.float64, copy=False)
    for i in range(3):
        out[:, i] = ijk[:, 0] * linear[i, 0] + ijk[:, 1] * linear[i, 1] + ijk[:, 2] * linear[i, 2] + origin[i]
    return out
