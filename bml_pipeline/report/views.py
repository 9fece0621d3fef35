"""2D views of a 3D volume for reports: slices and projections in anatomical display orientation.

Display conventions (radiological, as in clinical viewers), for every view:

- ``sagittal`` (plane normal R-L): anterior on the viewer's left, superior at the top.
- ``coronal`` (normal A-P): the patient's right on the viewer's left, superior at the top.
- ``axial`` (normal S-I): the patient's right on the viewer's left, anterior at the top.

Views follow the acquisition grid: the plane is the array axis closest to the view's normal (found
from the affine, never from the axis order), so native slices are shown without interpolating across
slices. For oblique grids the orientation letters name the nearest anatomical direction. Each view is
resampled in-plane to square pixels in millimetres, so anisotropic voxels show with their true
physical aspect ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# view -> (normal world axis, (column world axis, sign), (row world axis, sign)); world axes x=R, y=A, z=S.
# A sign of -1 means the world coordinate decreases along increasing display index.
VIEWS: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {
    "sagittal": (0, (1, -1), (2, -1)),
    "coronal": (1, (0, -1), (2, -1)),
    "axial": (2, (0, -1), (1, -1)),
}
_LETTERS = (("L", "R"), ("P", "A"), ("I", "S"))  # (negative, positive) end of each world axis


@dataclass(frozen=True)
class ViewGeometry:
    """Where a 2D view lies in its volume and how it maps to the screen.

    Attributes:
        view: ``"sagittal"``, ``"coronal"`` or ``"axial"``.
        normal_axis: array axis perpendicular to the view plane.
        row_axis, col_axis: array axes shown down the rows and along the columns.
        row_flip, col_flip: whether those axes are reversed for display.
        box: index box (crop) of the volume the view covers.
        pixel_mm: side of one (square) display pixel in mm.
        shape: display image shape (rows, columns).
        letters: orientation letters at the (top, bottom, left, right) edges.
    """

    view: str
    normal_axis: int
    row_axis: int
    col_axis: int
    row_flip: bool
    col_flip: bool
    box: tuple[slice, slice, slice]
    pixel_mm: float
    shape: tuple[int, int]
    letters: tuple[str, str, str, str]

    @property
    def size_mm(self) -> tuple[float, float]:
        """(height, width) of the view in mm."""
        return self.shape[0] * self.pixel_mm, self.shape[1] * self.pixel_mm


def axis_map(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each array axis: the nearest world axis (0=x/R, 1=y/A, 2=z/S) and its sign (+1/-1)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return ornt[:, 0].astype(int), ornt[:, 1].astype(int)


def view_geometry(affine: np.ndarray, shape: tuple[int, int, int], view: str,
                  box: tuple[slice, slice, slice] | None = None, max_pixels: int = 480,
                  min_pixel_mm: float = 0.25) -> ViewGeometry:
    """Geometry of ``view`` over the index ``box`` (default: the whole grid) of a volume.

    The display pixel is the finer in-plane spacing, enlarged if needed so that the longer side has
    at most ``max_pixels`` pixels, and never finer than ``min_pixel_mm``.
    """
    normal_world, (col_world, col_sign), (row_world, row_sign) = VIEWS[view]
    world_of, sign_of = axis_map(affine)
    axis_of_world = {int(w): a for a, w in enumerate(world_of)}
    normal_axis, row_axis, col_axis = (axis_of_world[normal_world], axis_of_world[row_world],
                                       axis_of_world[col_world])
    box = box or tuple(slice(0, n) for n in shape)  # type: ignore[assignment]
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    extent = [(box[a].stop - box[a].start) * spacing[a] for a in (row_axis, col_axis)]
    pixel = max(min(spacing[row_axis], spacing[col_axis]), max(extent) / max_pixels, min_pixel_mm)
    out_shape = (max(1, round(extent[0] / pixel)), max(1, round(extent[1] / pixel)))
    row_letters, col_letters = _LETTERS[row_world], _LETTERS[col_world]
    top, bottom = (row_letters[1], row_letters[0]) if row_sign < 0 else row_letters
    left, right = (col_letters[1], col_letters[0]) if col_sign < 0 else col_letters
    return ViewGeometry(view, normal_axis, row_axis, col_axis,
                        bool(sign_of[row_axis] != row_sign), bool(sign_of[col_axis] != col_sign),
                        box, float(pixel), out_shape, (top, bottom, left, right))


def window_box(affine: np.ndarray, shape: tuple[int, int, int], view: str, point_mm: np.ndarray,
               size_mm: float) -> tuple[slice, slice, slice]:
    """Index box of a square ``size_mm`` window of ``view`` centred on world point ``point_mm``.

    The box spans the whole grid along the view's normal axis; in-plane it may extend past the grid
    (the view is padded with background there), so windows of two visits cover the same millimetres.
    """
    g = view_geometry(affine, shape, view)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    centre = inv[:3, :3] @ np.asarray(point_mm, dtype=np.float64) + inv[:3, 3]
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    box = [slice(0, n) for n in shape]
    for axis in (g.row_axis, g.col_axis):
        count = max(1, round(size_mm / spacing[axis]))
        start = round(centre[axis] - count / 2)
        box[axis] = slice(start, start + count)
    return tuple(box)  # type: ignore[return-value]


def slice_index(geometry: ViewGeometry, affine: np.ndarray, point_mm: np.ndarray, n: int) -> int:
    """Index along the view's normal axis of the slice through world point ``point_mm`` (clipped)."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    ijk = inv[:3, :3] @ np.asarray(point_mm, dtype=np.float64) + inv[:3, 3]
    return int(np.clip(np.round(ijk[geometry.normal_axis]), 0, n - 1))


def extract_slice(array: np.ndarray, geometry: ViewGeometry, index: int, order: int) -> np.ndarray:
    """The slice at ``index`` along the normal axis, oriented and resampled for display.

    ``order`` is the interpolation order: 0 (nearest) for labels, 1 (linear) for images.
    """
    g = geometry
    box = list(g.box)
    box[g.normal_axis] = slice(index, index + 1)
    plane = np.squeeze(_padded(array, tuple(box)), axis=g.normal_axis)
    return _orient_resample(plane, g, order, _plane_axes(g))


def extract_projection(array: np.ndarray, geometry: ViewGeometry, order: int = 0, cropped: bool = False) -> np.ndarray:
    """Maximum of ``array`` along the view's normal axis (within the box), oriented for display.

    ``cropped``: ``array`` already is the box's content (a crop of the volume), not the whole volume."""
    g = geometry
    plane = np.max(array if cropped else array[g.box], axis=g.normal_axis)
    return _orient_resample(plane, g, order, _plane_axes(g))


def display_position(geometry: ViewGeometry, affine: np.ndarray, point_mm: np.ndarray) -> tuple[float, float]:
    """Position of world point ``point_mm`` in the view as fractions (row, column) of its height/width."""
    g = geometry
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    ijk = inv[:3, :3] @ np.asarray(point_mm, dtype=np.float64) + inv[:3, 3]
    out = []
    for axis, flip in ((g.row_axis, g.row_flip), (g.col_axis, g.col_flip)):
        start, stop = g.box[axis].start, g.box[axis].stop
        frac = (ijk[axis] - start + 0.5) / (stop - start)
        out.append(float(1.0 - frac if flip else frac))
    return out[0], out[1]


def _padded(array: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """``array[box]`` where ``box`` may reach past the array; outside voxels are 0."""
    inner = []
    for s, n in zip(box, array.shape):
        start = min(max(0, s.start), n)
        inner.append(slice(start, max(start, min(n, s.stop))))
    data = array[tuple(inner)]
    pads = []
    for s, i in zip(box, inner):
        before = min(max(i.start - s.start, 0), s.stop - s.start)
        pads.append((before, s.stop - s.start - before - (i.stop - i.start)))
    return np.pad(data, pads) if any(p != (0, 0) for p in pads) else data


def _plane_axes(g: ViewGeometry) -> tuple[int, int]:
    """Positions of the row and column axes in the 2D plane left after removing the normal axis."""
    remaining = [a for a in range(3) if a != g.normal_axis]
    return remaining.index(g.row_axis), remaining.index(g.col_axis)


def _orient_resample(plane: np.ndarray, g: ViewGeometry, order: int, axes: tuple[int, int]) -> np.ndarray:
    from scipy import ndimage

    plane = np.transpose(plane, axes)
    if g.row_flip:
        plane = plane[::-1, :]
    if g.col_flip:
        plane = plane[:, ::-1]
    rows, cols = g.shape
    n_r, n_c = plane.shape
    # Display pixel centres, expressed as fractional source indices (pixel-centre aligned).
    r = (np.arange(rows) + 0.5) * (n_r / rows) - 0.5
    c = (np.arange(cols) + 0.5) * (n_c / cols) - 0.5
    if order == 0:
        ri = np.clip(np.round(r).astype(int), 0, n_r - 1)
        ci = np.clip(np.round(c).astype(int), 0, n_c - 1)
        return plane[np.ix_(ri, ci)]
    rr, cc = np.meshgrid(r, c, indexing="ij")
    return ndimage.map_coordinates(plane.astype(np.float32), [rr, cc], order=order, mode="nearest")
