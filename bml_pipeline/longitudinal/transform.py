"""Rigid transforms in world RAS mm and the resampling of masks through them.

A :class:`RigidTransform` maps points of the *baseline* world (RAS+, mm) to the *follow-up* world:
``y = R @ x + t``. Resampling a follow-up array onto the baseline grid evaluates it at ``T(x)``;
pulling a baseline mask into the follow-up grid evaluates it at ``T^-1(y)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bml_pipeline.volume import Volume, bounding_box

_CHUNK = 1 << 20  # points per resampling call, bounds memory


@dataclass(frozen=True, eq=False)
class RigidTransform:
    """A rigid map ``y = matrix[:3, :3] @ x + matrix[:3, 3]`` between two RAS mm worlds.

    Attributes:
        matrix: 4x4 float64 homogeneous matrix (proper rotation + translation).
    """

    matrix: np.ndarray

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
        object.__setattr__(self, "matrix", m)

    @classmethod
    def identity(cls) -> RigidTransform:
        return cls(np.eye(4))

    @classmethod
    def from_rotation(cls, rotation: np.ndarray, translation: np.ndarray) -> RigidTransform:
        m = np.eye(4)
        m[:3, :3] = rotation
        m[:3, 3] = translation
        return cls(m)

    @property
    def rotation(self) -> np.ndarray:
        return self.matrix[:3, :3]

    @property
    def rotation_deg(self) -> float:
        """Angle (degrees) of the rotation about its axis."""
        cos = (np.trace(self.rotation) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Map points of shape (..., 3) in mm."""
        points = np.asarray(points, dtype=np.float64)
        return points @ self.rotation.T + self.matrix[:3, 3]

    def inverse(self) -> RigidTransform:
        return RigidTransform(np.linalg.inv(self.matrix))

    def compose(self, first: RigidTransform) -> RigidTransform:
        """The transform ``self(first(x))``."""
        return RigidTransform(self.matrix @ first.matrix)

    def displacement_at(self, point: np.ndarray) -> np.ndarray:
        """``T(p) - p`` in mm: the translation seen at ``point`` (independent of any rotation centre)."""
        point = np.asarray(point, dtype=np.float64)
        return self.apply(point) - point


def rotation_difference_deg(a: RigidTransform, b: RigidTransform) -> float:
    """Angle (degrees) of the rotation taking ``a``'s rotation to ``b``'s."""
    return RigidTransform.from_rotation(a.rotation.T @ b.rotation, np.zeros(3)).rotation_deg


def pull_to_grid(source: Volume, transform: RigidTransform, target: Volume, *, order: int = 0,
                 cval: float = 0.0) -> np.ndarray:
    """``source`` resampled onto ``target``'s grid, where ``transform`` maps source world to target world.

    Target voxel ``y`` receives ``source`` at ``transform^-1(y)``. Only the box of the target grid that can
    receive non-``cval`` values is computed (the mapped bounding box of ``source``'s non-``cval`` voxels).

    Args:
        source: the volume to resample (labels: ``order=0``).
        transform: source world (RAS mm) -> target world (RAS mm).
        target: the grid to resample onto (only its shape and affine are used).
        order: spline order for :func:`scipy.ndimage.map_coordinates` (0 nearest, 1 linear).
        cval: value outside ``source``.

    Returns:
        Array of ``target.shape`` with ``source``'s dtype.
    """
    from scipy import ndimage

    out = np.full(target.shape, cval, dtype=source.array.dtype)
    box = bounding_box(source.array != cval)
    if box is None:
        return out
    corners = np.array([[s.start - 1, s.stop] for s in box], dtype=np.float64)
    grid = np.stack(np.meshgrid(*corners, indexing="ij"), -1).reshape(-1, 3)
    ijk = target.voxel_coords(transform.apply(source.world_coords(grid)))
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, target.shape)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, 0, target.shape)
    if np.any(hi <= lo):
        return out
    inverse = transform.inverse()
    jj, kk = np.meshgrid(np.arange(lo[1], hi[1]), np.arange(lo[2], hi[2]), indexing="ij")
    plane = np.stack([np.zeros(jj.size), jj.ravel(), kk.ravel()], axis=1).astype(np.float64)
    step = max(1, _CHUNK // plane.shape[0])
    for i0 in range(lo[0], hi[0], step):
        rows = np.arange(i0, min(i0 + step, hi[0]), dtype=np.float64)
        pts = np.repeat(plane[None], len(rows), axis=0)
        pts[..., 0] = rows[:, None]
        src_ijk = source.voxel_coords(inverse.apply(target.world_coords(pts.reshape(-1, 3))))
        values = ndimage.map_coordinates(source.array, src_ijk.T, order=order, mode="constant", cval=cval,
                                         prefilter=False)
        out[i0:i0 + len(rows), lo[1]:hi[1], lo[2]:hi[2]] = values.reshape(len(rows), jj.shape[0], jj.shape[1])
    return out
