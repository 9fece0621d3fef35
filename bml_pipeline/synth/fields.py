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
    x = 1.0 + np.arange(n_fine) / step
    j = np.arange(n_coarse)
    t = np.abs(x[:, None] - j[None, :])
    w = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def smooth_noise(shape: tuple[int, int, int], spacing: tuple[float, float, float], scale_mm: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian noise (float32, shape ``shape``) with correlation length about ``scale_mm``.

    Args:
        shape: grid shape (i, j, k).
        spacing: voxel size (mm) along i, j, k.
        scale_mm: spacing of the coarse control lattice (mm).
        rng: random generator (the field depends only on it and the arguments).
    """
    steps = [max(scale_mm / s, 1.0) for s in spacing]
    coarse_shape = [int(np.ceil((n - 1) / st)) + 4 for n, st in zip(shape, steps)]
    # Cubic B-spline interpolation shrinks the standard deviation of white noise about 3-fold in 3D.
    field = rng.standard_normal(coarse_shape).astype(np.float32) * np.float32(3.0)
    for axis, (n, st) in enumerate(zip(shape, steps)):
        w = _bspline_weights(n, coarse_shape[axis], st)
        field = np.moveaxis(np.tensordot(w, np.moveaxis(field, axis, 0), axes=(1, 0)), 0, axis)
    return np.ascontiguousarray(field)
