"""Bone marrow lesions: connected components with volume, centroid and largest diameter in physical space.

Rule for valid input: a lesion label belongs to one bone (``schema.lesion_of``). Every connected lesion
(26-connected) must touch its bone, i.e. hold at least one voxel whose 26-neighbourhood contains a
voxel of the bone's own label; a lesion floating in soft tissue or inside another bone is bad input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bml_pipeline.errors import InputError
from bml_pipeline.measure.volumes import label_box
from bml_pipeline.volume import Volume


@dataclass(frozen=True)
class Lesion:
    """One connected lesion. Volume in mm3; centroid in world RAS mm; diameter in mm."""

    volume_mm3: float
    centroid_mm: tuple[float, float, float]
    diameter_mm: float
    voxel_count: int


@dataclass(frozen=True)
class LesionSet:
    """Connected lesions of one bone, largest first, plus the voxels left out as noise.

    Attributes:
        lesions: kept lesions (volume >= ``min_volume_mm3``), sorted by decreasing volume.
        mask: boolean mask (label grid) of the kept lesion voxels.
        ignored_volume_mm3: total volume of the components smaller than ``min_volume_mm3``.
        box: index box of the label grid outside which ``mask`` is false (None: not known).
    """

    lesions: tuple[Lesion, ...]
    mask: np.ndarray
    ignored_volume_mm3: float
    box: tuple[slice, slice, slice] | None = None

    def mask_indices(self) -> tuple[np.ndarray, ...]:
        """``np.nonzero(mask)``, from the voxels of ``box`` only when it is known (same indices, same
        order: C order within a box is C order of the grid)."""
        if self.box is None:
            return np.nonzero(self.mask)
        found = np.nonzero(self.mask[self.box])
        return tuple(i + s.start for i, s in zip(found, self.box))

    @property
    def volume_mm3(self) -> float:
        return float(sum(lesion.volume_mm3 for lesion in self.lesions))


def find_lesions(labels: Volume, lesion_id: int, bone_id: int, *, min_volume_mm3: float,
                 connectivity: int = 3, name: str = "lesion") -> LesionSet:
    """Connected lesions of label ``lesion_id`` inside the bone labelled ``bone_id``.

    Args:
        labels: label map.
        lesion_id, bone_id: label values of the lesion and of its bone.
        min_volume_mm3: components below this volume are dropped (counted in ``ignored_volume_mm3``).
        connectivity: 1, 2 or 3 (faces / + edges / + corners) for grouping voxels.
        name: structure name used in error messages.

    Raises:
        InputError: a lesion component does not touch its bone (see module docstring).
    """
    array = labels.array
    full_mask = np.zeros(array.shape, dtype=bool)
    box = label_box(array, lesion_id, margin=1)
    if box is None:
        return LesionSet((), full_mask, 0.0, (slice(0, 0),) * 3)
    sub = array[box]
    lesion = sub == lesion_id
    components, n = ndimage.label(lesion, structure=ndimage.generate_binary_structure(3, connectivity))
    index = np.arange(1, n + 1)
    near_bone = ndimage.binary_dilation(sub == bone_id, structure=np.ones((3, 3, 3), bool))
    touches = ndimage.maximum(near_bone, components, index) if n else np.zeros(0)
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    voxel_mm3 = labels.voxel_volume_mm3
    origin = np.array([s.start for s in box], dtype=np.float64)
    if n and not np.all(touches):
        bad = int(np.flatnonzero(~np.asarray(touches, bool))[0]) + 1
        centre = labels.world_coords(np.argwhere(components == bad).mean(axis=0) + origin)
        raise InputError(labels.meta.source,
                         f"{name} (label {lesion_id}) has {int(np.sum(~np.asarray(touches, bool)))} connected "
                         f"lesion(s) that do not touch their bone (label {bone_id}), e.g. "
                         f"{counts[bad - 1]} voxels around ({', '.join(f'{c:.1f}' for c in centre)}) mm RAS")
    keep = counts * voxel_mm3 >= min_volume_mm3
    ignored = float(counts[~keep].sum() * voxel_mm3)
    slices = ndimage.find_objects(components)
    lesions = []
    for label_index in np.flatnonzero(keep) + 1:
        sl = slices[label_index - 1]
        comp = components[sl] == label_index
        offset = origin + [s.start for s in sl]
        ijk = np.argwhere(comp).astype(np.float64) + offset
        lesions.append(Lesion(
            volume_mm3=float(counts[label_index - 1] * voxel_mm3),
            centroid_mm=tuple(float(c) for c in labels.world_coords(ijk.mean(axis=0))),  # type: ignore[arg-type]
            diameter_mm=largest_diameter_mm(comp, labels.affine, offset),
            voxel_count=int(counts[label_index - 1]),
        ))
    kept_labels = np.zeros(n + 1, dtype=bool)
    kept_labels[1:] = keep
    full_mask[box] = kept_labels[components]
    lesions.sort(key=lambda les: (-les.volume_mm3, les.centroid_mm))
    return LesionSet(tuple(lesions), full_mask, ignored, box)


def largest_diameter_mm(mask: np.ndarray, affine: np.ndarray, offset: np.ndarray | None = None) -> float:
    """Largest extent (mm) of a voxel object: the largest distance between two of its voxel centres in
    world space, plus one voxel's extent along that direction (so a single voxel measures its own
    size along its longest diagonal and a rasterized segment its length).

    Args:
        mask: boolean voxel mask of one object (any sub-box of the grid).
        affine: 4x4 voxel-to-world affine of the full grid.
        offset: index of ``mask[0, 0, 0]`` in the full grid.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    surface = mask & ~ndimage.binary_erosion(mask)
    pts = np.argwhere(surface).astype(np.float64) @ linear.T
    if offset is not None:
        pts += np.asarray(offset, dtype=np.float64) @ linear.T
    if len(pts) > 4:
        from scipy.spatial import ConvexHull

        # "QJ" joggles the input so flat (coplanar) objects get a hull too; vertices are input points.
        pts = pts[ConvexHull(pts, qhull_options="QJ").vertices]
    if len(pts) == 1:
        corners = np.array([[sx, sy, sz] for sx in (-.5, .5) for sy in (-.5, .5) for sz in (-.5, .5)]) @ linear.T
        return float(np.max(np.linalg.norm(corners[:, None] - corners[None], axis=-1)))
    diff = pts[:, None, :] - pts[None, :, :]
    dist2 = np.einsum("ijk,ijk->ij", diff, diff)
    i, j = np.unravel_index(int(np.argmax(dist2)), dist2.shape)
    length = float(np.sqrt(dist2[i, j]))
    direction = diff[i, j] / length
    return length + 0.5 * float(np.sum(np.abs(direction @ linear)))
