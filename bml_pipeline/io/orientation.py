"""Orientation conventions: LPS<->RAS conversion and reorientation to the closest canonical RAS.

ITK/SimpleITK and DICOM use LPS+ world coordinates; NIfTI (nibabel) and this package use RAS+.
The two differ by negating x and y: ``affine_ras = diag(-1, -1, 1, 1) @ affine_lps``. This module is
the only place that conversion happens.
"""

from __future__ import annotations

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_from_itk(spacing: tuple[float, ...], direction: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    """RAS+ voxel-to-world affine from ITK geometry (LPS+, index order x, y, z)."""
    linear = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = linear
    affine_lps[:3, 3] = origin
    return LPS_TO_RAS @ affine_lps


def itk_geometry_from_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, direction, origin) for SimpleITK from a RAS+ affine."""
    affine_lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    direction = affine_lps[:3, :3] / spacing
    return tuple(spacing.tolist()), tuple(direction.ravel().tolist()), tuple(affine_lps[:3, 3].tolist())


def to_closest_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute and flip array axes so they point as close as possible to R, A, S (no resampling).

    Returns the reordered array (a view where possible) and its affine; world coordinates of every
    voxel are unchanged.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return array, np.asarray(affine, dtype=np.float64)
    new_array = nib.orientations.apply_orientation(array, ornt)
    new_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return new_array, new_affine
