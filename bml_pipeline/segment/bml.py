"""Bone marrow lesion post-processing on a predicted label map.

1. :func:`constrain_lesions`: lesions live inside bone. Each lesion voxel takes the lesion label of the
   nearest bone (bone or lesion voxels of that bone, Euclidean distance in mm); lesion components that
   touch no bone voxel are removed (set to background).
2. :func:`refine_lesions` (optional, off by default): the classical rule of the semi-automated
   literature (e.g. Nielsen et al. 2014, fluid-sensitive fat-suppressed images): a marrow voxel is
   lesion when it is brighter than that bone's normal-marrow mean by ``k_sd`` standard deviations. It is
   only valid where oedema-like marrow is bright (DESS, fat-suppressed PD/T2, STIR); on T1-like contrast
   lesions are dark, so it refuses to run there.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema
from bml_pipeline.segment.config import BmlRefineConfig
from bml_pipeline.volume import Volume, bounding_box

log = logging.getLogger(__name__)

FLUID_SENSITIVE = ("dess", "pd_fs", "t2", "stir")
"""Contrasts on which marrow oedema is bright and the refinement is allowed."""


def constrain_lesions(labels: Volume, schema: LabelSchema) -> Volume:
    """Relabel lesion voxels to the lesion label of their nearest bone; drop lesions touching no bone."""
    arr = np.asarray(labels.array)
    bones = schema.bones
    lesion_ids = [schema.lesion_of(b.name).id for b in bones if schema.lesion_of(b.name)]  # type: ignore[union-attr]
    lesion = np.isin(arr, lesion_ids)
    box = bounding_box(lesion, margin=3)
    if box is None:
        return labels
    sub = arr[box]
    sub_lesion = lesion[box]
    bone_of = np.zeros(sub.shape, dtype=np.int16)  # index+1 of the bone owning each voxel, 0 none
    for n, bone in enumerate(bones, start=1):
        bone_of[sub == bone.id] = n
    out = arr.copy()
    if not np.any(bone_of):
        out[box][sub_lesion] = schema.background
        return labels.with_array(out)
    comps, _ = ndimage.label(sub_lesion, structure=np.ones((3, 3, 3), bool))
    touching = np.unique(comps[ndimage.binary_dilation(bone_of > 0, np.ones((3, 3, 3), bool)) & sub_lesion])
    keep = np.isin(comps, touching[touching > 0])
    _, idx = ndimage.distance_transform_edt(bone_of == 0, sampling=labels.spacing, return_indices=True)
    nearest = bone_of[tuple(idx)]
    new = sub.copy()
    new[sub_lesion & ~keep] = schema.background
    for n, bone in enumerate(bones, start=1):
        les = schema.lesion_of(bone.name)
        if les is not None:
            new[keep & (nearest == n)] = les.id
    dropped = int(np.count_nonzero(sub_lesion & ~keep))
    if dropped:
        log.info("removed %d lesion voxels outside bone", dropped)
    out[box] = new
    return labels.with_array(out)


def refine_lesions(image: Volume, labels: Volume, schema: LabelSchema, config: BmlRefineConfig,
                   contrast: str) -> Volume:
    """Add marrow voxels brighter than their bone's normal-marrow mean + ``k_sd`` SD to its lesion label.

    Normal marrow = the bone label eroded by ``config.erode_mm`` (predicted lesions excluded); candidate
    voxels must lie in the eroded full bone (bone + lesion); new components smaller than
    ``config.min_component_mm3`` are discarded. ``image`` and ``labels`` must share a grid.

    Raises:
        InputError: when ``contrast`` is not fluid-sensitive (see :data:`FLUID_SENSITIVE`).
    """
    if contrast not in FLUID_SENSITIVE:
        raise InputError(image.meta.source, f"BML refinement needs a fluid-sensitive contrast "
                                            f"{FLUID_SENSITIVE}, got {contrast!r}")
    labels.require_same_grid(image, "image and labels")
    arr = np.asarray(labels.array).copy()
    img = np.asarray(image.array, dtype=np.float32)
    voxel_mm3 = labels.voxel_volume_mm3
    for bone in schema.bones:
        les = schema.lesion_of(bone.name)
        if les is None:
            continue
        full = np.isin(arr, schema.bone_ids(bone.name))
        box = bounding_box(full, margin=1)
        if box is None:
            continue
        radius = [max(round(config.erode_mm / s), 0) for s in labels.spacing]
        struct = np.ones([2 * r + 1 for r in radius], bool)
        core = ndimage.binary_erosion(full[box], struct)
        normal = core & (arr[box] == bone.id)
        if np.count_nonzero(normal) < 100:
            continue
        values = img[box][normal]
        threshold = float(values.mean() + config.k_sd * values.std())
        candidate = core & (img[box] > threshold)
        comps, n = ndimage.label(candidate, structure=np.ones((3, 3, 3), bool))
        if n:
            sizes = np.bincount(comps.ravel())[1:] * voxel_mm3
            candidate = np.isin(comps, np.flatnonzero(sizes >= config.min_component_mm3) + 1)
        region = arr[box]
        region[candidate] = les.id
        arr[box] = region
        log.info("%s: marrow threshold %.4g, %d voxels marked lesion", bone.name, threshold,
                 int(np.count_nonzero(candidate)))
    return labels.with_array(arr)
