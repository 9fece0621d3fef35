"""Known-truth change between two visits: BML volume change, cartilage thickness change, repositioning.

Two routes:

- Analytic phantoms (:func:`phantom_followup`): the follow-up is a new :class:`KneeSpec` whose lesions
  are rescaled to the requested volume (exact, the lesions' volumes are analytic), whose plate
  thickness fields are multiplied by ``1 + percent / 100`` (the mean thickness changes by exactly that
  percentage) and whose pose is a new rigid placement; it is then re-rasterized in the new pose.
- Real label maps (:func:`inject_change`): lesions grow or shrink voxel by voxel inside their bone,
  in the order of a smooth field (distance to the lesion or to a seed, perturbed by smooth noise), until
  the exact voxel count is reached; a cartilage plate thickens or thins on its articular side only,
  voxels being added or removed in order of their relative depth across the plate, until the plate's
  volume has changed by the requested percentage; the truth reports what was achieved. The knee is
  repositioned by changing the affine by a rigid transform and keeping the array: that is an exact
  rigid motion of the anatomy in world space (volumes and shapes unchanged to the voxel), whereas
  resampling a label map would add interpolation error to the truth (about 0.5 to 1 % of a cartilage
  plate's volume with nearest neighbour). The phantom route, re-rasterized in a new pose, covers the
  case where the voxel grid cuts the anatomy differently at the two visits.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema, load_schema
from bml_pipeline.synth import anatomy as A
from bml_pipeline.synth.fields import smooth_noise
from bml_pipeline.synth.phantom import DEFAULT_LESIONS, KneeSpec, Lesion, Pose
from bml_pipeline.volume import Volume, bounding_box

log = logging.getLogger(__name__)

# Where a lesion appears in a bone that had none (local frame of a right knee, subchondral).
SEED_LESIONS = {
    "femur": DEFAULT_LESIONS[0],
    "tibia": DEFAULT_LESIONS[1],
    "patella": Lesion("patella", (0.0, A.PATELLA_C[1] - A.PATELLA_R + 7.0, A.PATELLA_C[2]), (6.0, 3.5, 6.0), 0.3,
                      seed=3),
}


def rigid_to_dict(matrix: np.ndarray) -> dict[str, Any]:
    """JSON-ready description of a rigid 4x4 transform: total rotation angle (degrees), rotation as
    x-then-y-then-z angles (degrees), translation (mm) and the matrix."""
    rot = matrix[:3, :3]
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))))
    # rot = Rz Ry Rx: recover the three angles.
    ay = float(np.degrees(np.arcsin(-np.clip(rot[2, 0], -1, 1))))
    ax = float(np.degrees(np.arctan2(rot[2, 1], rot[2, 2])))
    az = float(np.degrees(np.arctan2(rot[1, 0], rot[0, 0])))
    return {"rotation_deg": angle, "rotation_xyz_deg": [ax, ay, az],
            "translation_mm": matrix[:3, 3].round(9).tolist(), "matrix": np.round(matrix, 12).tolist()}


def phantom_followup(spec: KneeSpec, *, bml_change_cm3: dict[str, float] | None = None,
                     thickness_change_percent: dict[str, float] | None = None,
                     pose: Pose | None = None) -> KneeSpec:
    """The follow-up visit of a phantom knee.

    Args:
        spec: the baseline knee.
        bml_change_cm3: per bone, the change of its total lesion volume (cm3, negative shrinks). The
            bone's lesions are rescaled by a common factor; a bone without lesions grows one at its
            subchondral seed (:data:`SEED_LESIONS`).
        thickness_change_percent: per plate, the change of its thickness field (percent).
        pose: the follow-up pose (default: the baseline's).

    Raises:
        ValueError: shrinking a bone's lesions by more than they hold, unknown bones or plates, or a
            grown lesion that would leave its bone.
    """
    lesions = list(spec.lesions)
    for bone, delta in (bml_change_cm3 or {}).items():
        if bone not in A.BONES:
            raise ValueError(f"unknown bone {bone!r} (expected one of {', '.join(A.BONES)})")
        mine = [x for x in lesions if x.bone == bone]
        total = sum(x.volume_cm3 for x in mine)
        target = total + delta
        if target < -1e-12:
            raise ValueError(f"cannot shrink the {bone}'s lesions by {-delta:.4g} cm3: they hold only {total:.4g} cm3")
        others = [x for x in lesions if x.bone != bone]
        if target <= 1e-12:
            lesions = others
        elif mine:
            lesions = others + [replace(x, volume_cm3=x.volume_cm3 * target / total) for x in mine]
        else:
            lesions = others + [replace(SEED_LESIONS[bone], volume_cm3=target)]
    scale = dict(spec.thickness_scale)
    for plate, percent in (thickness_change_percent or {}).items():
        if plate not in A.PLATES.values():
            raise ValueError(f"unknown cartilage plate {plate!r}")
        if percent <= -100:
            raise ValueError(f"a thickness change of {percent} % would remove the plate")
        scale[plate] = scale.get(plate, 1.0) * (1 + percent / 100.0)
    return replace(spec, lesions=tuple(lesions), thickness_scale=tuple(sorted(scale.items())),
                   pose=pose or spec.pose)


def cut_field_of_view(volume: Volume, axis_world: int, top_mm: float, bottom_mm: float) -> Volume:
    """``volume`` with ``top_mm``/``bottom_mm`` removed at the ends of the array axis closest to world
    axis ``axis_world`` (0 R, 1 A, 2 S; "top" is the positive end): a smaller field of view, as a
    follow-up scan positioned differently has."""
    axis = int(np.argmax(np.abs(volume.direction[axis_world])))
    step = volume.spacing[axis]
    n = volume.shape[axis]
    lo, hi = round(bottom_mm / step), n - round(top_mm / step)
    if volume.direction[axis_world, axis] < 0:
        lo, hi = n - hi, n - lo
    box = [slice(None)] * 3
    box[axis] = slice(lo, hi)
    return volume.crop(tuple(box))


def visit_transform(baseline: KneeSpec, followup: KneeSpec) -> np.ndarray:
    """Rigid 4x4 world transform taking the baseline knee onto the follow-up knee."""
    return followup.world_from_local() @ np.linalg.inv(baseline.world_from_local())


# ---- real label maps ------------------------------------------------------------------------------

def inject_change(labels: Volume, schema: LabelSchema | None = None, *,
                  bml_change_cm3: dict[str, float] | None = None,
                  thickness_change_percent: dict[str, float] | None = None,
                  reposition: np.ndarray | None = None, seed: int = 0,
                  seed_points_ras: dict[str, tuple[float, float, float]] | None = None) -> tuple[Volume, dict[str, Any]]:
    """A follow-up label map with known change, from any label map.

    Args:
        labels: baseline label map.
        schema: its label schema (default ``oai_zib``).
        bml_change_cm3: per bone, the lesion volume change (cm3); achieved to the nearest voxel.
        thickness_change_percent: per plate, the thickness change (percent) on the articular side.
        reposition: 4x4 rigid world transform applied to the knee (the affine changes, the array not).
        seed: seed of the smooth fields that shape growth and shrinkage.
        seed_points_ras: per bone, a world point (RAS mm) where a lesion grows in a bone without one
            (default: 4 mm under the centre of the bone's cartilage plate).

    Returns:
        The follow-up label map and the truth: per bone the lesion volume at both visits, per plate
        the volume at both visits and the achieved change, and the applied rigid transform.

    Raises:
        InputError: shrinking more lesion than exists, no room to grow, unknown bones or plates.
    """
    schema = schema or load_schema("oai_zib")
    rng = np.random.default_rng(seed)
    source = labels.meta.source
    arr = np.array(labels.array, copy=True)
    vox_cm3 = labels.voxel_volume_mm3 / 1000.0
    truth: dict[str, Any] = {"bml": {}, "cartilage": {}, "voxel_volume_mm3": labels.voxel_volume_mm3}
    for bone, delta in sorted((bml_change_cm3 or {}).items()):
        lesion = schema.lesion_of(bone) if bone in {b.name for b in schema.bones} else None
        if lesion is None:
            raise InputError(source, f"no bone with a lesion label named {bone!r} in schema {schema.name!r}")
        before = int(np.count_nonzero(arr == lesion.id))
        count = round(delta / vox_cm3)
        point = (seed_points_ras or {}).get(bone)
        _change_lesion(arr, labels, schema, bone, count, rng, point)
        after = int(np.count_nonzero(arr == lesion.id))
        truth["bml"][bone] = {"baseline_cm3": before * vox_cm3, "followup_cm3": after * vox_cm3,
                              "delta_cm3": (after - before) * vox_cm3, "requested_delta_cm3": delta}
    for plate, percent in sorted((thickness_change_percent or {}).items()):
        struct = next((s for s in schema.of_kind("cartilage") if s.name == plate), None)
        if struct is None:
            raise InputError(source, f"no cartilage plate named {plate!r} in schema {schema.name!r}")
        before = int(np.count_nonzero(arr == struct.id))
        _change_plate(arr, labels.spacing, schema, struct.id, struct.bone, percent, source)
        after = int(np.count_nonzero(arr == struct.id))
        truth["cartilage"][plate] = {
            "baseline_cm3": before * vox_cm3, "followup_cm3": after * vox_cm3,
            "requested_thickness_change_percent": percent,
            "achieved_thickness_change_percent": 100.0 * (after - before) / before,
            "definition": "mean thickness = plate volume / area of its bone interface; only the articular "
                          "side moves, so the interface and its area are unchanged and the thickness change "
                          "equals the volume change"}
    motion = np.eye(4) if reposition is None else np.asarray(reposition, float)
    _check_rigid(motion, source)
    truth["transform"] = rigid_to_dict(motion)
    followup = Volume(arr, motion @ labels.affine, replace(labels.meta, source=None))
    return followup, truth


def _check_rigid(matrix: np.ndarray, source: Any) -> None:
    rot = matrix[:3, :3]
    if matrix.shape != (4, 4) or not np.allclose(rot @ rot.T, np.eye(3), atol=1e-9) or np.linalg.det(rot) < 0:
        raise InputError(source, "the repositioning must be a rigid transform (rotation and translation)")


def _change_lesion(arr: np.ndarray, labels: Volume, schema: LabelSchema, bone: str, count: int,
                   rng: np.random.Generator, seed_point: tuple[float, float, float] | None) -> None:
    """Grow (count > 0) or shrink (count < 0) the bone's lesion by exactly ``|count|`` voxels, in place."""
    from scipy import ndimage

    source = labels.meta.source
    bone_id, lesion_id = schema.by_name(bone).id, schema.lesion_of(bone).id
    whole = (arr == bone_id) | (arr == lesion_id)
    box = bounding_box(whole, margin=2)
    if box is None:
        raise InputError(source, f"the label map has no {bone}")
    sub = arr[box]
    spacing = labels.spacing
    noise = smooth_noise(sub.shape, spacing, 4.0, rng) * np.float32(1.5)  # mm of irregularity
    lesion = sub == lesion_id
    have = int(lesion.sum())
    if count < 0:
        if -count > have:
            raise InputError(source, f"cannot shrink the {bone} lesions by {-count * labels.voxel_volume_mm3 / 1000:.4g} "
                             f"cm3: they hold only {have * labels.voxel_volume_mm3 / 1000:.4g} cm3")
        depth = ndimage.distance_transform_edt(lesion, sampling=spacing) + noise
        order = _ranked(np.flatnonzero(lesion), depth)
        sub[np.unravel_index(order[:-count], sub.shape)] = bone_id
        return
    if count == 0:
        return
    if have:
        start = lesion
    else:
        start = np.zeros_like(lesion)
        start[_seed_voxel(arr, labels, schema, bone, box, seed_point)] = True
    reach = ndimage.distance_transform_edt(~start, sampling=spacing) + noise
    # Only the bone proper (the largest 26-connected piece of bone and lesion): a stray bone speck of a
    # hand-drawn map, turned into lesion, would be a lesion that does not touch its bone (bad input).
    pieces, n = ndimage.label(whole[box], ndimage.generate_binary_structure(3, 3))
    proper = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1) if n > 1 else pieces > 0
    candidates = np.flatnonzero((sub == bone_id) & proper)
    if count > len(candidates):
        raise InputError(source, f"the {bone} has room for only {len(candidates)} more lesion voxels")
    sub[np.unravel_index(_ranked(candidates, reach)[:count], sub.shape)] = lesion_id


def _ranked(flat_indices: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """``flat_indices`` sorted by ``priority`` (ascending; ties by index, so deterministic)."""
    keys = priority.ravel()[flat_indices]
    return flat_indices[np.lexsort((flat_indices, keys))]


def _seed_voxel(arr: np.ndarray, labels: Volume, schema: LabelSchema, bone: str,
                box: tuple[slice, slice, slice], point: tuple[float, float, float] | None) -> tuple[int, int, int]:
    """Index (within ``box``) of the voxel where a new lesion starts: the bone voxel nearest to
    ``point`` (RAS mm), or by default the bone voxel 3 to 5 mm under the cartilage plate that is
    nearest to the plate's centre."""
    from scipy import ndimage

    source = labels.meta.source
    sub = arr[box]
    bone_mask = sub == schema.by_name(bone).id
    offset = np.array([s.start for s in box])
    idx = np.argwhere(bone_mask)
    if point is None:
        plate = schema.cartilage_of(bone)
        cart = sub == plate.id if plate else np.zeros_like(bone_mask)
        if not cart.any():
            raise InputError(source, f"the {bone} has no lesion and no cartilage to place one under; give a seed point")
        depth = ndimage.distance_transform_edt(~cart, sampling=labels.spacing)[bone_mask]
        idx = idx[(depth >= 3.0) & (depth <= 5.0)] if np.any((depth >= 3.0) & (depth <= 5.0)) else idx
        target = labels.world_coords(np.argwhere(cart).mean(axis=0) + offset)
    else:
        target = np.asarray(point, float)
    if len(idx) == 0:
        raise InputError(source, f"the label map has no {bone} voxels to grow a lesion in")
    dist = np.linalg.norm(labels.world_coords(idx + offset) - target, axis=1)
    return tuple(int(v) for v in idx[int(np.argmin(dist))])


def _change_plate(arr: np.ndarray, spacing: tuple[float, float, float], schema: LabelSchema, plate_id: int,
                  bone: str, percent: float, source: Any) -> None:
    """Thicken or thin a plate on its articular side so that its voxel count changes by ``percent``."""
    from scipy import ndimage

    plate = arr == plate_id
    box = bounding_box(plate, margin=int(np.ceil(4.0 / min(spacing))))
    if box is None:
        raise InputError(source, f"the label map has no voxels of plate {schema.by_id(plate_id).name!r}")
    sub = arr[box]
    plate = sub == plate_id
    bone_mask = np.isin(sub, schema.bone_ids(bone))
    have = int(plate.sum())
    target = round(have * (1 + percent / 100.0))
    if target < 0:
        raise InputError(source, f"a thickness change of {percent} % would remove the plate")
    d_bone = ndimage.distance_transform_edt(~bone_mask, sampling=spacing)
    d_out, nearest = ndimage.distance_transform_edt(~plate, sampling=spacing, return_indices=True)
    d_in = ndimage.distance_transform_edt(plate | bone_mask, sampling=spacing)  # depth under the articular side
    thickness = np.where(plate, d_bone + d_in, 0.0)
    if target < have:
        rel = np.where(plate, d_bone / np.maximum(thickness, 1e-6), np.inf)
        order = _ranked(np.flatnonzero(plate), -rel)  # largest relative height (articular side) first
        sub[np.unravel_index(order[:have - target], sub.shape)] = 0
        return
    # Candidates: background voxels farther from the bone than their nearest cartilage voxel (outside the
    # articular surface, not beside the plate's rim on bare bone); relative height 1 + gap / thickness.
    near_t = thickness[tuple(nearest)]
    near_bone = d_bone[tuple(nearest)]
    free = (sub == 0) & (d_out < 3.0) & (d_bone > near_bone)
    rel = 1.0 + d_out / np.maximum(near_t, 1e-6)
    candidates = np.flatnonzero(free)
    if target - have > len(candidates):
        raise InputError(source, f"no room to thicken plate {schema.by_id(plate_id).name!r} by {percent} %")
    sub[np.unravel_index(_ranked(candidates, rel)[:target - have], sub.shape)] = plate_id
