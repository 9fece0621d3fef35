"""Smooth random fields on voxel grids, made by separable cubic B-spline upsampling of a coarse grid.

A field with correlation length ``scale_mm`` draws independent Gaussian values on a coarse lattice with
that spacing and interpolates them along each array axis in turn (three small matrix products), never
zooming the full volume. Values have zero mean and roughly unit standard deviation.
"""

from __future__ import annotations

import numpy as np


def _bspline_weights(n_fine: int, n_coarse: int, step: float) -> np.ndarray:
    """(n_fine, n_coarse) float32 matrix of cubic B-spline weights; fine sample ``i`` sits at coarse
    coordinate ``1 + i / step`` (one control point of padding on each side)."""
    return _bspline_weights_at(1.0 + np.arange(n_fine) / step, n_coarse)


def _bspline_weights_at(x: np.ndarray, n_coarse: int) -> np.ndarray:
    """(len(x), n_coarse) float32 cubic B-spline weights at coarse coordinates ``x``."""
    j = np.arange(n_coarse)
    t = np.abs(np.asarray(x, float)[:, None] - j[None, :])
    w = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def _lattice(shape: tuple[int, int, int], spacing: tuple[float, float, float],
             scale_mm: float) -> tuple[list[int], list[float]]:
    """Shape of the control lattice with spacing ``scale_mm`` and its step in fine voxels per axis."""
    steps = [max(scale_mm / s, 1.0) for s in spacing]
    return [int(np.ceil((n - 1) / st)) + 4 for n, st in zip(shape, steps)], steps


def _interpolate(coarse: np.ndarray, shape: tuple[int, int, int], steps: list[float]) -> np.ndarray:
    """Cubic B-spline interpolation of a control lattice onto the full grid, one axis at a time: a
    small matrix product along the last axis, then four-tap sums along the others (each output row
    mixes four rows of the coarser array), so the full grid is touched only a few times."""
    field = coarse @ _bspline_weights(shape[2], coarse.shape[2], steps[2]).T   # (c0, c1, n2)
    field = _four_tap(field, 1, shape[1], steps[1])                             # (c0, n1, n2)
    return _four_tap(field, 0, shape[0], steps[0])                              # (n0, n1, n2)


def _four_tap(field: np.ndarray, axis: int, n: int, step: float) -> np.ndarray:
    """Cubic B-spline interpolation along ``axis`` (0 or 1) to ``n`` samples at coarse coordinates
    ``1 + i / step``."""
    x = 1.0 + np.arange(n) / step
    base = np.floor(x).astype(int) - 1
    t = (x - np.floor(x)).astype(np.float32)
    weights = np.stack([(1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
                        t**3 / 6], axis=1).astype(np.float32)
    src = np.moveaxis(field, axis, 0)
    out = np.empty((n,) + src.shape[1:], dtype=np.float32)
    tmp = np.empty(src.shape[1:], dtype=np.float32)
    for i in range(n):
        row = out[i]
        np.multiply(src[base[i]], weights[i, 0], out=row)
        for k in range(1, 4):
            np.multiply(src[base[i] + k], weights[i, k], out=tmp)
            row += tmp
    return np.moveaxis(out, 0, axis)


def _control_values(rng: np.random.Generator, coarse_shape: list[int]) -> np.ndarray:
    # Cubic B-spline interpolation shrinks the standard deviation of white noise about 3-fold in 3D.
    return rng.standard_normal(coarse_shape).astype(np.float32) * np.float32(3.0)


def smooth_noise(shape: tuple[int, int, int], spacing: tuple[float, float, float], scale_mm: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian noise (float32, shape ``shape``) with correlation length about ``scale_mm``.

    Args:
        shape: grid shape (i, j, k).
        spacing: voxel size (mm) along i, j, k.
        scale_mm: spacing of the coarse control lattice (mm).
        rng: random generator (the field depends only on it and the arguments).
    """
    coarse_shape, steps = _lattice(shape, spacing, scale_mm)
    return _interpolate(_control_values(rng, coarse_shape), shape, steps)


def smooth_log_field(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                     components: list[tuple[float, float]], rng: np.random.Generator) -> np.ndarray:
    """``exp(sum_k a_k n_k)`` (float32) for smooth noises ``n_k`` of scales ``s_k``, given as
    ``components = [(s_k mm, a_k), ...]`` (finest first), with one full-grid interpolation.

    The coarser lattices are first evaluated at the finest lattice's nodes (a B-spline of a smoother
    field, accurate to well under 1 % of its amplitude), summed there, and interpolated once.
    """
    fine_shape, fine_steps = _lattice(shape, spacing, components[0][0])
    total = _control_values(rng, fine_shape) * np.float32(components[0][1])
    for scale, amplitude in components[1:]:
        coarse_shape, steps = _lattice(shape, spacing, scale)
        values = _control_values(rng, coarse_shape)
        for axis in range(3):
            nodes = 1.0 + (np.arange(fine_shape[axis]) - 1.0) * fine_steps[axis] / steps[axis]
            w = _bspline_weights_at(nodes, coarse_shape[axis])
            values = np.moveaxis(np.tensordot(w, np.moveaxis(values, axis, 0), axes=(1, 0)), 0, axis)
        total += values * np.float32(amplitude)
    field = _interpolate(np.ascontiguousarray(total), shape, fine_steps)
    return np.exp(field, out=field)
