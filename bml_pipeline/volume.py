"""The `Volume` type: a 3D voxel array with a 4x4 RAS+ affine in millimetres, plus provenance.

Conventions, stated once here:

- ``array[i, j, k]`` is the voxel with index (i, j, k); ``affine @ (i, j, k, 1)`` is its centre in
  world coordinates, in mm, RAS+ (x grows towards the patient's Right, y Anterior, z Superior), as in
  NIfTI and nibabel. DICOM/ITK use LPS+; the conversion lives in :mod:`bml_pipeline.io.orientation` only.
- The affine is the single source of geometry: spacing, orientation and voxel volume are derived from
  it, never stored twice. Voxels are anisotropic and axes may be in any order or oblique.
- Two volumes are combined only when their grids match (:meth:`Volume.require_same_grid`); resampling is
  always explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bml_pipeline.errors import GeometryMismatchError, InputError

GRID_ATOL_MM = 1e-3
"""Tolerance (mm) on affine entries when deciding whether two grids are the same."""


@dataclass(frozen=True)
class VolumeMeta:
    """Provenance of a volume. Every field is optional; strings come from files and are untrusted."""

    source: str | None = None
    series_description: str | None = None
    echo_time_ms: float | None = None
    laterality: str | None = None  # "left" | "right" | None (unknown)
    acquisition_date: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array on a grid given by a 4x4 voxel-to-RAS affine (mm).

    Attributes:
        array: 3D numpy array indexed (i, j, k).
        affine: 4x4 float64 matrix mapping voxel indices to RAS+ mm.
        meta: provenance (source path, series description, echo time, laterality).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: VolumeMeta = field(default_factory=VolumeMeta)

    def __post_init__(self) -> None:
        source = self.meta.source
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise InputError(source, f"expected a 3D volume, got {arr.ndim}D with shape {arr.shape}")
        if min(arr.shape) < 1:
            raise InputError(source, f"empty volume with shape {arr.shape}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise InputError(source, "affine must be a finite 4x4 matrix")
        spacing = np.linalg.norm(aff[:3, :3], axis=0)
        if np.any(spacing <= 1e-6) or abs(np.linalg.det(aff[:3, :3])) <= 1e-12:
            raise InputError(source, "zero or negative voxel spacing (" + ", ".join(f"{s:.6g}" for s in spacing) + " mm)")
        if self.meta.laterality not in (None, "left", "right"):
            raise InputError(source, f"laterality must be 'left', 'right' or unknown, got {self.meta.laterality!r}")
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "affine", aff)

    def __repr__(self) -> str:
        """Shape, spacing, orientation, dtype and source; never the array."""
        spacing = ", ".join(f"{s:.4g}" for s in self.spacing)
        return (f"Volume(shape={self.shape}, spacing_mm=({spacing}), orientation={self.orientation!r}, "
                f"dtype={self.array.dtype}, source={self.meta.source!r})")

    # ---- derived geometry -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (i, j, k)."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in mm along the array axes (i, j, k)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm3 (|det| of the affine's linear part; exact for oblique grids)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"PIR"``: the world direction each array axis points to."""
        import nibabel as nib

        return "".join(nib.orientations.aff2axcodes(self.affine))

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit world directions of the array axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    def world_coords(self, ijk: np.ndarray) -> np.ndarray:
        """World RAS mm coordinates of voxel indices ``ijk`` (shape (..., 3)), fractional allowed."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def voxel_coords(self, xyz: np.ndarray) -> np.ndarray:
        """Fractional voxel indices of world RAS mm points ``xyz`` (shape (..., 3))."""
        inv = np.linalg.inv(self.affine)
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    # ---- combination ------------------------------------------------------------------------
    def same_grid(self, other: Volume, atol: float = GRID_ATOL_MM) -> bool:
        """True when both volumes have the same shape and affine (within ``atol`` mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def require_same_grid(self, other: Volume, what: str = "volumes") -> None:
        """Raise :class:`GeometryMismatchError` naming ``other``'s source unless grids match."""
        if not self.same_grid(other):
            raise GeometryMismatchError(
                other.meta.source,
                f"{what} are on different voxel grids: shape {other.shape} vs {self.shape}, "
                f"spacing {_fmt(other.spacing)} vs {_fmt(self.spacing)} mm, "
                f"origin {_fmt(other.affine[:3, 3])} vs {_fmt(self.affine[:3, 3])} mm",
            )

    def with_array(self, array: np.ndarray, **meta_changes: Any) -> Volume:
        """A volume on the same grid with a new array (and optionally updated metadata)."""
        if np.shape(array) != self.shape:
            raise ValueError(f"array shape {np.shape(array)} does not match grid {self.shape}")
        meta = replace(self.meta, **meta_changes) if meta_changes else self.meta
        return Volume(array, self.affine.copy(), meta)

    def crop(self, slices: tuple[slice, slice, slice]) -> Volume:
        """Sub-volume given by index slices (step 1); the affine's origin moves with the crop."""
        starts = np.array([s.indices(n)[0] for s, n in zip(slices, self.shape)], dtype=np.float64)
        affine = self.affine.copy()
        affine[:3, 3] = self.world_coords(starts)
        return Volume(self.array[slices], affine, self.meta)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """Index slices of the smallest box holding all true voxels of ``mask``, grown by ``margin``
    voxels and clipped to the array; None when the mask is empty."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        if hit.size == 0:
            return None
        slices.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)  # type: ignore[return-value]


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
