"""Quality control of label maps: a plausible knee passes in any pose; a patella moved into the thigh,
a missing bone and swapped bones fail with a message naming the structure (maps built at test time)."""

from __future__ import annotations

import numpy as np
import pytest

from bml_pipeline.labels import load_schema
from bml_pipeline.measure.volumes import check_label_values, structure_volumes
from bml_pipeline.qc import check_labels
from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom
from bml_pipeline.volume import Volume

SCHEMA = load_schema("oai_zib")


@pytest.fixture(scope="module")
def knee() -> Volume:
    return make_phantom(KneeSpec(), spacing=(0.7, 0.7, 0.7)).labels


def _qc(labels: Volume):
    return check_labels(labels, SCHEMA, structure_volumes(labels, SCHEMA, check_label_values(labels, SCHEMA)))


def test_phantom_knee_passes(knee: Volume) -> None:
    qc = _qc(knee)
    assert qc.status == "pass", qc.summary()
    assert qc.unreliable == ()
    assert qc.metrics["patella_anterior_mm"] > 20


@pytest.mark.parametrize("side", ["left", "right"])
def test_rotated_knee_on_an_anisotropic_grid_passes(side: str) -> None:
    spec = KneeSpec(side=side, pose=Pose(rotation_deg=(25.0, -10.0, 30.0)))
    labels = make_phantom(spec, spacing=(1.2, 0.6, 0.6)).labels
    qc = _qc(labels)
    assert qc.status == "pass", qc.summary()


def _patella_in_the_thigh(knee: Volume) -> Volume:
    pad = 90  # room around the knee (the phantom's grid is tight)
    arr = np.pad(np.asarray(knee.array), ((0, 0), (pad, pad), (pad, pad)))
    affine = knee.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([0, pad, pad])
    patella = np.isin(arr, (5, 6, 9))
    moved = np.zeros_like(arr)
    # 50 mm superior and 60 mm posterior (world = array axes here, 0.7 mm voxels, RAS).
    shift = (0, -int(60 / 0.7), int(50 / 0.7))
    src = np.argwhere(patella)
    dst = src + np.array(shift)
    ok = np.all((dst >= 0) & (dst < np.array(arr.shape)), axis=1)
    moved[tuple(dst[ok].T)] = arr[tuple(src[ok].T)]
    arr[patella] = 0
    arr[moved > 0] = moved[moved > 0]
    return Volume(arr, affine)


def test_patella_moved_into_the_thigh_fails(knee: Volume) -> None:
    qc = _qc(_patella_in_the_thigh(knee))
    assert qc.status == "fail"
    assert qc.unreliable == ("patella",)
    assert "the patella is not in front of the femoral condyles" in qc.summary()


def test_missing_bone_fails(knee: Volume) -> None:
    arr = np.asarray(knee.array).copy()
    arr[np.isin(arr, (3, 4, 8))] = 0
    qc = _qc(knee.with_array(arr))
    assert qc.status == "fail"
    assert "tibia is missing" in qc.summary()
    assert {"tibia", "tibial_cartilage"} <= set(qc.unreliable)


def test_swapped_bones_fail(knee: Volume) -> None:
    arr = np.asarray(knee.array)
    swap = np.arange(10, dtype=arr.dtype)
    swap[[1, 2, 3, 4, 7, 8]] = [3, 4, 1, 2, 8, 7]
    qc = _qc(knee.with_array(swap[arr]))
    assert qc.status == "fail"
    assert "the femur is not above the tibia" in qc.summary()


def test_bone_in_pieces_and_cut_near_the_joint_fail(knee: Volume) -> None:
    arr = np.asarray(knee.array).copy()
    femur_rows = np.flatnonzero(np.isin(arr, (1, 7)).any(axis=(0, 1)))
    cut = femur_rows[len(femur_rows) // 2]
    arr[:, :, cut - 10:cut + 10][np.isin(arr[:, :, cut - 10:cut + 10], (1, 7))] = 0  # femur in two pieces
    qc = _qc(knee.with_array(arr))
    assert "femur is in 2 pieces" in qc.summary()
    tibia_cols = np.flatnonzero(np.isin(knee.array, (3, 8)).any(axis=(1, 2)))
    cropped = knee.crop((slice(int(tibia_cols.mean()), None), slice(None), slice(None)))
    qc = _qc(cropped)
    assert "the tibia is cut by the field of view at its left border" in qc.summary()


def test_frame_ignores_a_patella_in_the_thigh(knee: Volume) -> None:
    from bml_pipeline.measure.frame import knee_axes

    good = knee_axes(knee, SCHEMA)
    moved = knee_axes(_patella_in_the_thigh(knee), SCHEMA)
    assert good is not None and moved is not None
    assert good.anterior_source == "patella" and moved.anterior_source != "patella"
    assert float(np.dot(moved.anterior, [0.0, 1.0, 0.0])) > 0.9  # still anterior, from the femoral shaft


def test_structures_the_model_cannot_label_are_not_measured(knee: Volume) -> None:
    """A bones-and-cartilage model has no lesion classes: BML is null (not 0) and marked unreliable."""
    from bml_pipeline.measure import measure_labels

    lesions = ["femoral_bml", "tibial_bml", "patellar_bml"]
    m = measure_labels(knee, SCHEMA, side="right", segmentation_quality={"not_segmented": lesions})
    assert all(m.bml[bone] is None for bone in ("femur", "tibia", "patella"))
    assert m.qc is not None and m.qc.status == "warn" and set(lesions) <= set(m.qc.unreliable)
    assert "does not label femoral_bml, tibial_bml, patellar_bml: not measured" in m.qc.summary()
    assert m.to_dict()["bml"]["total_volume_cm3"] is None
