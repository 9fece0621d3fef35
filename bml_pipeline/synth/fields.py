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
    """Cubic B-spline interpolation of a control lattice onto the full grid (three matrix products)."""
    w0, w1, w2 = (_bspline_weights(n, c, st) for n, c, st in zip(shape, coarse.shape, steps))
    field = coarse @ w2.T                                  # (c0, c1, n2), contiguous
    field = np.matmul(w1, field)                           # (c0, n1, n2)
    field = w0 @ field.reshape(coarse.shape[0], -1)        # (n0, n1 * n2)
    return field.reshape(shape)


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
