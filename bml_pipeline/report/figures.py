"""Report figures: key slices, lesion maps and cartilage thickness maps, as embedded PNG panels.

Each :class:`Panel` carries its pixels (a PNG data URI), its physical size in mm (pixels are square
in mm, see :mod:`bml_pipeline.report.views`) and its orientation letters; the HTML overlays letters,
a 10 mm scale bar and lesion numbers as text, so they stay sharp and readable at any zoom.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from bml_pipeline.labels import LabelSchema
from bml_pipeline.report import render
from bml_pipeline.report.rundir import RunData
from bml_pipeline.report.tables import Lesion, number
from bml_pipeline.report.views import (
    ViewGeometry,
    display_position,
    extract_projection,
    extract_slice,
    slice_index,
    view_geometry,
    window_box,
)
from bml_pipeline.volume import Volume, bounding_box

log = logging.getLogger(__name__)

SLICE_WINDOW_MM = 110.0
"""Side of the square window (mm) of every key slice, centred on its point, the same in both visits."""

MAX_MARKERS = 5
"""Lesions numbered on the lesion maps, per bone (largest first); the table lists all."""

MARGIN_MM = 6.0
"""Margin around the labelled anatomy (or one bone, or one plate) kept in every view."""

THICKNESS_VIEW = {"femoral_cartilage": "axial", "tibial_cartilage": "axial", "patellar_cartilage": "coronal"}
"""Projection direction of each plate's thickness map: along S-I for femur and tibia, along A-P for the patella."""

_AXIS_NAME = ("x", "y", "z")


@dataclass(frozen=True)
class Marker:
    """A text label at a fractional (row, column) position of a panel."""

    text: str
    row: float
    col: float


@dataclass(frozen=True)
class Panel:
    """One embedded image with its physical size and orientation."""

    title: str
    subtitle: str
    uri: str
    width_px: int
    height_px: int
    width_mm: float
    height_mm: float
    letters: tuple[str, str, str, str]
    markers: tuple[Marker, ...] = ()

    @property
    def scale_bar_percent(self) -> float:
        """Width of a 10 mm scale bar as a percentage of the panel width."""
        return min(100.0, 1000.0 / self.width_mm)


@dataclass(frozen=True)
class SliceSpec:
    """A key slice to show: a view through a world point, matched across visits via ``reference``."""

    title: str
    view: str
    point_mm: tuple[float, float, float]
    reference: str  # structure whose centroid anchors the position in another visit


class Scene:
    """A run's label map (and image) prepared for rendering: per-label boxes (one pass over the map),
    crop box, grey window, and masks cut to their structures' boxes (cached)."""

    def __init__(self, labels: Volume, image: Volume | None, schema: LabelSchema) -> None:
        self.labels, self.image, self.schema = labels, image, schema
        self._objects = label_boxes(labels.array)  # box of label value v at index v - 1
        self.box = _grow(self.box_of([v + 1 for v in range(len(self._objects))])
                         or tuple(slice(0, n) for n in labels.shape), labels)
        self.window = _window(image.array[self.box]) if image is not None else None
        self._centroids: dict[str, np.ndarray | None] = {}
        self._masks: dict[tuple[int, ...], tuple[tuple[slice, slice, slice], np.ndarray] | None] = {}

    def box_of(self, ids: tuple[int, ...] | list[int]) -> tuple[slice, slice, slice] | None:
        """Smallest index box holding every voxel labelled one of ``ids``; None when none is."""
        boxes = [self._objects[i - 1] for i in ids if 0 < i <= len(self._objects) and self._objects[i - 1]]
        if not boxes:
            return None
        return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes))  # type: ignore[return-value]
                     for a in range(3))

    def mask(self, ids: tuple[int, ...] | list[int]) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """(box, mask within the box) of the voxels labelled one of ``ids``; the box is the labels' box
        grown by :data:`MARGIN_MM`. None when no voxel has those labels. Cached: do not modify."""
        key = tuple(sorted(ids))
        if key not in self._masks:
            box = self.box_of(key)
            box = _grow(box, self.labels) if box is not None else None
            self._masks[key] = (box, label_mask(self.labels.array[box], key)) if box is not None else None
        return self._masks[key]

    @property
    def background(self) -> str:
        return "image" if self.image is not None else "labels"

    def centroid(self, structure: str) -> np.ndarray | None:
        """World centroid (mm) of a structure (a bone's full extent), None when absent."""
        if structure not in self._centroids:
            s = self.schema.by_name(structure)
            ids = self.schema.bone_ids(structure) if s.kind == "bone" else (s.id,)
            found = self.mask(ids)
            self._centroids[structure] = None if found is None else _centroid(*found, self.labels)
        return self._centroids[structure]

    def render_slice(self, spec: SliceSpec, point_mm: np.ndarray) -> Panel | None:
        """The ``spec`` view through ``point_mm``: image (or label rendering) with outlines; None when
        the point lies outside the volume along the view's normal."""
        box = window_box(self.labels.affine, self.labels.shape, spec.view, point_mm, SLICE_WINDOW_MM)
        g = view_geometry(self.labels.affine, self.labels.shape, spec.view, box)
        n = self.labels.shape[g.normal_axis]
        if not -1.0 <= _normal_coordinate(g, self.labels.affine, point_mm) <= n:
            return None
        index = slice_index(g, self.labels.affine, point_mm, n)
        lab = extract_slice(self.labels.array, g, index, order=0)
        if self.image is not None and self.window is not None:
            grey = render.window(extract_slice(self.image.array, g, index, order=1), *self.window)
        else:
            grey = render.label_rendering(lab, self.schema)
        rgb = render.draw_outlines(render.grey_to_rgb(grey), lab, self.schema)
        world = _slice_world(g, self.labels, index)
        subtitle = f"{spec.view} slice {index + 1}/{self.labels.shape[g.normal_axis]}, {world}"
        return _panel(spec.title, subtitle, rgb, g)


def lesion_specs(scene: Scene, lesions: dict[str, list[Lesion]]) -> list[SliceSpec]:
    """Sagittal and coronal slices through the largest lesion of each bone."""
    specs = []
    for bone, items in lesions.items():
        largest = next((lesion for lesion in items if lesion.centroid_mm is not None), None)
        if largest is None:
            continue
        volume = f", {largest.volume_cm3:.3f} cm³" if largest.volume_cm3 is not None else ""
        plate = scene.schema.cartilage_of(bone)
        reference = plate.name if plate is not None and scene.centroid(plate.name) is not None else bone
        for view in ("sagittal", "coronal"):
            specs.append(SliceSpec(f"{bone.capitalize()}: largest BML (#1{volume})", view, largest.centroid_mm,
                                   reference))
    return specs


def compartment_specs(scene: Scene, side: str | None) -> list[SliceSpec]:
    """Sagittal slices through the medial and lateral tibiofemoral compartments, and one coronal slice
    through the joint. Compartments are the two halves (in x) of the tibial cartilage (femoral if
    absent); without a known side they are named by patient direction only."""
    schema, labels = scene.schema, scene.labels
    plate = next((p for p in ("tibial_cartilage", "femoral_cartilage")
                  if p in {s.name for s in schema.structures} and scene.centroid(p) is not None), None)
    if plate is None:
        return []
    box, mask = scene.mask([schema.by_name(plate).id])  # type: ignore[misc]
    points = labels.world_coords(np.argwhere(mask) + [s.start for s in box])
    split = 0.5 * (points[:, 0].min() + points[:, 0].max())
    halves = {"patient-left": points[points[:, 0] < split], "patient-right": points[points[:, 0] >= split]}
    medial = {"right": "patient-left", "left": "patient-right"}.get(side or "")
    specs = []
    for half in ("patient-right", "patient-left"):
        if len(halves[half]) == 0:
            continue
        name = ("Medial" if half == medial else "Lateral") + " compartment" if medial else \
            f"Compartment on the patient's {half.split('-')[1]} (side unknown)"
        specs.append(SliceSpec(name, "sagittal", tuple(halves[half].mean(axis=0)), plate))  # type: ignore[arg-type]
    specs.append(SliceSpec("Tibiofemoral joint", "coronal", tuple(points.mean(axis=0)), plate))  # type: ignore[arg-type]
    return specs


def matched_point(spec: SliceSpec, current: Scene, prior: Scene,
                  transforms: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, str] | None:
    """Where ``spec``'s point lies in the prior visit, and a note saying how it was matched.

    With a rigid alignment of the reference structure's bone (``transforms``: bone -> 4x4 matrix
    mapping prior RAS mm to current RAS mm, as in ``change.json``), the point is mapped through its
    inverse; otherwise it keeps its offset from the reference structure's centroid.
    """
    structure = current.schema.by_name(spec.reference)
    bone = structure.name if structure.kind == "bone" else structure.bone
    matrix = (transforms or {}).get(bone or "")
    if matrix is not None:
        point = np.linalg.solve(matrix[:3, :3], np.asarray(spec.point_mm) - matrix[:3, 3])
        return point, f"matched through the {bone} alignment of change.json"
    here, there = current.centroid(spec.reference), prior.centroid(spec.reference)
    if here is None or there is None:
        return None
    return there + (np.asarray(spec.point_mm) - here), f"matched to the {spec.reference.replace('_', ' ')} centroid"


def lesion_maps(scene: Scene, lesions: dict[str, list[Lesion]]) -> list[tuple[str, list[Panel]]]:
    """Per bone with lesions: sagittal and coronal maximum-intensity projections of its lesions over
    the bone's silhouette, lesions numbered as in the lesion table."""
    schema, labels = scene.schema, scene.labels
    out = []
    for bone, items in lesions.items():
        lesion = schema.lesion_of(bone)
        if not items or lesion is None:
            continue
        found = scene.mask(schema.bone_ids(bone))
        if found is None:
            continue
        box, full = found
        lesion_mask = labels.array[box] == lesion.id
        panels = []
        for view in ("sagittal", "coronal"):
            g = view_geometry(labels.affine, labels.shape, view, box, max_pixels=320)
            silhouette = extract_projection(full, g, cropped=True)
            lesion_mip = extract_projection(lesion_mask, g, cropped=True)
            rgb = np.empty(silhouette.shape + (3,), np.uint8)
            rgb[:] = render.BACKGROUND
            rgb = render.fill(rgb, silhouette, (150, 150, 150), 0.6)
            rgb = render.fill(rgb, render.outline(silhouette, 1), render.PALETTE["bone"], 0.8)
            rgb = render.fill(rgb, lesion_mip, render.PALETTE["lesion"], 0.9)
            markers = tuple(Marker(str(les.rank), *display_position(g, labels.affine, np.asarray(les.centroid_mm)))
                            for les in items[:MAX_MARKERS] if les.centroid_mm is not None)
            panels.append(_panel(f"{bone.capitalize()} {view}", "projection of all lesions", rgb, g, markers))
        out.append((bone, panels))
    return out


def thickness_vmax(runs: list[RunData]) -> float:
    """Upper end (mm) of the common thickness colour scale: the largest 95th percentile of thickness
    over all plates and visits (from ``measurements.json``, else from the maps), rounded up to 0.5 mm
    and at least 1 mm. Thicker points show in the top colour."""
    tops = []
    for run in runs:
        cartilage = run.measurements.get("cartilage")
        for plate, volume in run.thickness.items():
            entry = cartilage.get(plate) if isinstance(cartilage, dict) else None
            stats = entry.get("thickness_mm") if isinstance(entry, dict) else None
            p95 = number(stats.get("p95")) if isinstance(stats, dict) else None
            if p95 is None:
                values = volume.array[::2, ::2, ::2]
                values = values[values > 0]
                p95 = float(np.percentile(values, 95)) if values.size else None
            if p95 is not None:
                tops.append(p95)
    return max(1.0, float(np.ceil(max(tops, default=1.0) * 2) / 2))


def thickness_map(run: RunData, plate: str, vmax: float, scene: Scene | None = None) -> Panel | None:
    """Projection of the plate's thickness map (maximum along the plate's normal direction) over its
    bone's silhouette, coloured 0..``vmax`` mm; None when the run has no map for the plate.

    ``scene`` (the run's labels, on the map's grid) gives the plate's box without scanning the map."""
    volume = run.thickness.get(plate)
    if volume is None:
        return None
    on_grid = scene is not None and scene.labels.same_grid(volume)
    found = scene.mask([scene.schema.by_name(plate).id]) if on_grid and scene is not None else None
    box = found[0] if found is not None else bounding_box(volume.array > 0)
    if box is None:
        return None
    box = box if found is not None else _grow(box, volume)
    g = view_geometry(volume.affine, volume.shape, THICKNESS_VIEW.get(plate, "axial"), box, max_pixels=360)
    thick = extract_projection(volume.array, g, order=0)
    rgb = np.empty(thick.shape + (3,), np.uint8)
    rgb[:] = render.BACKGROUND
    bone = run.schema.by_name(plate).bone
    if on_grid and scene is not None and bone:
        inside = label_mask(scene.labels.array[box], run.schema.bone_ids(bone))
        rgb = render.fill(rgb, extract_projection(inside, g, cropped=True), (120, 120, 120), 0.5)
    covered = thick > 0
    rgb[covered] = render.colormap(thick[covered], vmax)
    direction = "S–I" if g.view == "axial" else "A–P"
    return _panel(plate.replace("_", " ").capitalize(), f"thickest point along {direction}", rgb, g)


def colour_bar_uri() -> str:
    """The thickness colour scale (viridis), 256 x 12 pixels."""
    strip = render.colormap(np.tile(np.linspace(0, 1, 256), (12, 1)), 1.0)
    return render.png_data_uri(strip)


def label_boxes(array: np.ndarray) -> list[tuple[slice, slice, slice] | None]:
    """Index box of every label value 1..max of a non-negative integer array (None when absent), like
    ``scipy.ndimage.find_objects`` but in a few vectorized passes when the values fit in 31 bits of
    flags (far faster on large maps)."""
    top = int(array.max()) if array.size else 0
    if top > 31:
        from scipy import ndimage

        return list(ndimage.find_objects(array))
    kind = np.uint16 if top < 16 else np.uint32
    flags = np.left_shift(kind(1), array.astype(kind, copy=False))
    ij = np.bitwise_or.reduce(flags, axis=2)
    jk = np.bitwise_or.reduce(flags, axis=0)
    per_axis = [np.bitwise_or.reduce(ij, axis=1), np.bitwise_or.reduce(ij, axis=0), np.bitwise_or.reduce(jk, axis=0)]
    boxes: list[tuple[slice, slice, slice] | None] = []
    for value in range(1, top + 1):
        hits = [np.flatnonzero(p & kind(1 << value)) for p in per_axis]
        boxes.append(None if hits[0].size == 0 else
                     tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hits))  # type: ignore[arg-type]
    return boxes


def label_mask(array: np.ndarray, ids: tuple[int, ...] | list[int]) -> np.ndarray:
    """Boolean mask of ``array`` (non-negative integer labels) taking one of the values ``ids``."""
    lut = np.zeros(max(int(array.max()), *ids) + 1, dtype=bool)
    lut[list(ids)] = True
    return lut[array]


def _panel(title: str, subtitle: str, rgb: np.ndarray, g: ViewGeometry, markers: tuple[Marker, ...] = ()) -> Panel:
    height_mm, width_mm = g.size_mm
    return Panel(title, subtitle, render.png_data_uri(rgb), int(rgb.shape[1]), int(rgb.shape[0]),
                 width_mm, height_mm, g.letters, markers)


def _normal_coordinate(g: ViewGeometry, affine: np.ndarray, point_mm: np.ndarray) -> float:
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return float((inv[:3, :3] @ np.asarray(point_mm, dtype=np.float64) + inv[:3, 3])[g.normal_axis])


def _slice_world(g: ViewGeometry, volume: Volume, index: int) -> str:
    """``x = 12.3 mm``: the world coordinate of the slice along the view's normal direction."""
    centre = np.array([(s.start + s.stop - 1) / 2 for s in g.box], dtype=np.float64)
    centre[g.normal_axis] = index
    normal_world = {"sagittal": 0, "coronal": 1, "axial": 2}[g.view]
    return f"{_AXIS_NAME[normal_world]} = {volume.world_coords(centre)[normal_world]:.1f} mm"


def _grow(box: tuple[slice, slice, slice], volume: Volume) -> tuple[slice, slice, slice]:
    """``box`` grown by :data:`MARGIN_MM` on every side, in voxels of each axis, clipped to the grid."""
    margin = [int(np.ceil(MARGIN_MM / s)) for s in volume.spacing]
    return tuple(slice(max(0, s.start - m), min(n, s.stop + m))  # type: ignore[return-value]
                 for s, m, n in zip(box, margin, volume.shape))


def _window(values: np.ndarray) -> tuple[float, float]:
    """Grey window (0.5th to 99.5th percentile) of an image region, from at most ~1 M samples."""
    step = max(1, round((values.size / 1e6) ** (1 / 3)))
    sample = values[::step, ::step, ::step].astype(np.float32)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _centroid(box: tuple[slice, slice, slice], mask: np.ndarray, volume: Volume) -> np.ndarray | None:
    """World centroid of ``mask``, a boolean array covering the index ``box`` of ``volume``."""
    total = int(np.count_nonzero(mask))
    if total == 0:
        return None
    ijk = []
    for axis in range(3):
        counts = np.count_nonzero(mask, axis=tuple(a for a in range(3) if a != axis))
        ijk.append(float(np.dot(counts, np.arange(counts.size))) / total + box[axis].start)
    return volume.world_coords(np.array(ijk))
