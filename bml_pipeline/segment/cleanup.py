"""Anatomical clean-up of a predicted label map: one connected piece per bone, cartilage on its bone.

A network's raw argmax can leave isolated false positives (a "bone" blob in a muscle, a fleck of
cartilage with no bone under it). Each knee bone is one connected solid, and a cartilage plate lies on
its bone, so: every bone keeps only one 26-connected component (bone and lesion labels together), the
one carrying most of its cartilage (the articular end), else the largest; every cartilage component that does not touch its (cleaned) bone is removed. Removed voxels
become background. Lesions are handled afterwards by :func:`bml_pipeline.segment.bml.constrain_lesions`.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume, bounding_box

log = logging.getLogger(__name__)

_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def clean_anatomy(labels: Volume, schema: LabelSchema) -> Volume:
    """``labels`` with stray bone pieces and cartilage off its bone set to background (same grid)."""
    arr = np.array(labels.array, copy=True)
    removed: dict[str, int] = {}
    for bone in schema.bones:
        ids = schema.bone_ids(bone.name)
        box = bounding_box(np.isin(arr, ids))
        if box is None:
            continue
        sub = arr[box]
        pieces, n = ndimage.label(np.isin(sub, ids), _CONNECTIVITY)
        if n > 1:
            stray = (pieces > 0) & (pieces != _articular_piece(pieces, n, sub, schema, bone.name))
            removed[bone.name] = int(stray.sum())
            sub[stray] = schema.background
    for plate in schema.of_kind("cartilage"):
        mask = arr == plate.id
        box = bounding_box(mask, margin=1)
        if box is None:
            continue
        sub = arr[box]
        pieces, n = ndimage.label(sub == plate.id, _CONNECTIVITY)
        bone_near = ndimage.binary_dilation(np.isin(sub, schema.bone_ids(plate.bone)), _CONNECTIVITY) \
            if plate.bone else np.zeros(sub.shape, bool)
        touching = np.unique(pieces[bone_near & (pieces > 0)])
        off_bone = (pieces > 0) & ~np.isin(pieces, touching)
        if off_bone.any():
            removed[plate.name] = int(off_bone.sum())
            sub[off_bone] = schema.background
    if removed:
        log.info("clean-up removed voxels: %s", ", ".join(f"{k} {v}" for k, v in sorted(removed.items())))
    return labels.with_array(arr)


def _articular_piece(pieces: np.ndarray, n: int, sub: np.ndarray, schema: LabelSchema, bone: str) -> int:
    """Label of the bone piece that carries the most of the bone's cartilage (contact voxels), the
    largest piece breaking ties and standing in when the bone has no cartilage label nearby."""
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    sizes[0] = 0
    contact = np.zeros(n + 1, dtype=np.int64)
    plate = schema.cartilage_of(bone)
    if plate is not None:
        near_cartilage = ndimage.binary_dilation(sub == plate.id, _CONNECTIVITY)
        contact = np.bincount(pieces[near_cartilage].ravel(), minlength=n + 1)
        contact[0] = 0
    return int(np.lexsort((sizes, contact))[-1])
