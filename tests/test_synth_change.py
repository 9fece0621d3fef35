"""Injected change has the requested size, exactly, on phantoms and on real label maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bml_pipeline.errors import InputError
from bml_pipeline.io import read_labels
from bml_pipeline.labels import load_schema
from bml_pipeline.synth.change import (
    cut_field_of_view,
    inject_change,
    phantom_followup,
    rigid_to_dict,
    visit_transform,
)
from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom
from bml_pipeline.synth.sdf import rotation_matrix
from bml_pipeline.volume import Volume

SCHEMA = load_schema("oai_zib")
ID = {s.name: s.id for s in SCHEMA.structures}
SPACING = (0.7, 0.5, 0.5)


@pytest.fixture(scope="module")
def visits():
    base = KneeSpec(pose=Pose((2.0, -3.0, 1.0), (0.0, 0.0, 0.0)))
    follow = phantom_followup(base, bml_change_cm3={"femur": -2.1, "tibia": 0.35},
                              thickness_change_percent={"femoral_cartilage": 2.4, "tibial_cartilage": -1.5},
                              pose=Pose((-4.0, 5.0, 3.0), (3.0, -2.0, 1.5)))
    return base, follow, make_phantom(base, spacing=SPACING), make_phantom(follow, spacing=SPACING)


def test_phantom_bml_change_is_exact(visits):
    _, _, p0, p1 = visits
    for bone, delta in (("femur", -2.1), ("tibia", 0.35)):
        assert p1.truth.bml[bone] - p0.truth.bml[bone] == pytest.approx(delta, abs=1e-9)
        label = SCHEMA.lesion_of(bone).name
        hard = p1.truth.structures[label]["rasterized_cm3"] - p0.truth.structures[label]["rasterized_cm3"]
        assert hard == pytest.approx(delta, abs=0.01)


def test_phantom_thickness_change_is_exact(visits):
    _, _, p0, p1 = visits
    for plate, percent in (("femoral_cartilage", 2.4), ("tibial_cartilage", -1.5), ("patellar_cartilage", 0.0)):
        before = p0.truth.cartilage[plate]["mean_thickness_mm"]
        after = p1.truth.cartilage[plate]["mean_thickness_mm"]
        assert 100 * (after / before - 1) == pytest.approx(percent, abs=0.1)
        assert 100 * (after / before - 1) == pytest.approx(percent, abs=1e-9)
        # The rasterized plate follows the analytic volume at both visits.
        for p in (p0, p1):
            entry = p.truth.structures[plate]
            assert entry["rasterized_cm3"] == pytest.approx(entry["reference_cm3"], rel=0.005)


def test_phantom_repositioning_is_reported(visits):
    base, follow, _, p1 = visits
    motion = visit_transform(base, follow)
    lesion_before = np.asarray(next(x for x in make_phantom(base, spacing=(1.5, 1.5, 1.5)).truth.lesions
                                    if x["bone"] == "tibia")["centre_ras_mm"])
    lesion_after = np.asarray(next(x for x in p1.truth.lesions if x["bone"] == "tibia")["centre_ras_mm"])
    np.testing.assert_allclose(motion[:3, :3] @ lesion_before + motion[:3, 3], lesion_after, atol=1e-6)
    info = rigid_to_dict(motion)
    assert 3.0 < info["rotation_deg"] < 15.0


def test_phantom_lesions_cannot_shrink_below_zero_and_grow_from_a_seed():
    base = KneeSpec()
    with pytest.raises(ValueError, match="hold only"):
        phantom_followup(base, bml_change_cm3={"femur": -3.5})
    grown = phantom_followup(base, bml_change_cm3={"patella": 0.4})
    p = make_phantom(grown, spacing=(1.0, 1.0, 1.0))
    assert p.truth.bml["patella"] == pytest.approx(0.4, abs=1e-12)
    assert p.truth.structures["patellar_bml"]["rasterized_cm3"] == pytest.approx(0.4, abs=0.01)
    gone = phantom_followup(base, bml_change_cm3={"femur": -3.0})
    assert all(x.bone != "femur" for x in gone.lesions)


def test_rigid_to_dict_recovers_angles():
    m = np.eye(4)
    m[:3, :3] = rotation_matrix((3.0, -7.0, 11.0))
    m[:3, 3] = (1.0, 2.0, -3.0)
    info = rigid_to_dict(m)
    assert info["rotation_xyz_deg"] == pytest.approx([3.0, -7.0, 11.0])
    assert info["translation_mm"] == pytest.approx([1.0, 2.0, -3.0])


@pytest.fixture(scope="module")
def real_crop(oai_labels_dir):
    labels = read_labels(oai_labels_dir / "zib_9002817_labels.nii.gz", SCHEMA)
    return labels.crop((slice(20, 140), slice(100, 320), slice(120, 300)))


@pytest.mark.parametrize("bone,delta", [("femur", -0.12), ("tibia", 0.6), ("patella", 0.25)])
def test_real_map_bml_change_is_voxel_exact_and_stays_in_bone(real_crop, bone, delta):
    follow, truth = inject_change(real_crop, SCHEMA, bml_change_cm3={bone: delta}, seed=1)
    assert truth["bml"][bone]["delta_cm3"] == pytest.approx(delta, abs=0.01)
    assert abs(truth["bml"][bone]["delta_cm3"] - delta) <= real_crop.voxel_volume_mm3 / 1000
    vox = real_crop.voxel_volume_mm3 / 1000
    lesion_id = ID[SCHEMA.lesion_of(bone).name]
    measured = (np.count_nonzero(follow.array == lesion_id) - np.count_nonzero(real_crop.array == lesion_id)) * vox
    assert measured == pytest.approx(truth["bml"][bone]["delta_cm3"], abs=1e-12)
    # Every follow-up lesion voxel was part of the bone (bone or lesion label) at baseline.
    assert set(np.unique(real_crop.array[follow.array == lesion_id])) <= {ID[bone], lesion_id}
    changed = follow.array != real_crop.array
    assert set(np.unique(real_crop.array[changed])) | set(np.unique(follow.array[changed])) <= {ID[bone], lesion_id}
    assert ndimage.label(follow.array == lesion_id)[1] <= max(1, ndimage.label(real_crop.array == lesion_id)[1]) + 2


def test_real_map_shrinking_more_than_exists_fails(real_crop):
    with pytest.raises(InputError, match="hold only"):
        inject_change(real_crop, SCHEMA, bml_change_cm3={"femur": -2.1})


@pytest.mark.parametrize("percent", [2.4, -3.0])
def test_real_map_thickness_change_moves_the_articular_side_only(real_crop, percent):
    plate = "femoral_cartilage"
    follow, truth = inject_change(real_crop, SCHEMA, thickness_change_percent={plate: percent})
    achieved = truth["cartilage"][plate]["achieved_thickness_change_percent"]
    assert achieved == pytest.approx(percent, abs=0.1)
    before, after = real_crop.array == ID[plate], follow.array == ID[plate]
    assert 100 * (after.sum() / before.sum() - 1) == pytest.approx(achieved, abs=1e-9)
    bone = np.isin(real_crop.array, SCHEMA.bone_ids("femur"))
    touching = ndimage.binary_dilation(bone)
    np.testing.assert_array_equal(before & touching, after & touching)  # bone interface unchanged
    changed = before != after
    assert set(np.unique(real_crop.array[changed])) | set(np.unique(follow.array[changed])) <= {0, ID[plate]}


def test_real_map_repositioning_changes_only_the_affine(real_crop):
    motion = np.eye(4)
    motion[:3, :3] = rotation_matrix((4.0, -2.0, 6.0))
    motion[:3, 3] = (3.0, 1.0, -2.0)
    follow, truth = inject_change(real_crop, SCHEMA, reposition=motion)
    np.testing.assert_array_equal(follow.array, real_crop.array)
    np.testing.assert_allclose(follow.affine, motion @ real_crop.affine)
    assert truth["transform"]["rotation_xyz_deg"] == pytest.approx([4.0, -2.0, 6.0])
    with pytest.raises(InputError, match="rigid"):
        inject_change(real_crop, SCHEMA, reposition=np.diag([1.0, 1.0, -1.0, 1.0]))


def test_growth_from_nothing_needs_somewhere_to_start():
    empty = Volume(np.zeros((10, 10, 10), np.uint16), np.eye(4))
    with pytest.raises(InputError, match="no femur"):
        inject_change(empty, SCHEMA, bml_change_cm3={"femur": 0.001})


def test_growth_leaves_stray_bone_voxels_alone():
    """A hand-drawn map may hold stray bone specks apart from the bone. A lesion grown next to one must not
    take it: it would become a lesion that does not touch its bone, which the measure stage refuses."""
    from bml_pipeline.measure.lesions import find_lesions

    arr = np.zeros((30, 30, 30), np.uint16)
    arr[5:25, 5:25, 5:20] = ID["femur"]
    arr[15, 15, 22:24] = ID["femur"]  # a 2-voxel speck 2 voxels above the bone's top face, beside the seed
    labels = Volume(arr, np.diag([0.7, 0.5, 0.5, 1.0]))
    seed = tuple(labels.world_coords(np.array([15.0, 15.0, 19.0])))
    grown, truth = inject_change(labels, SCHEMA, bml_change_cm3={"femur": 0.15}, seed_points_ras={"femur": seed},
                                 seed=1)
    assert truth["bml"]["femur"]["delta_cm3"] == pytest.approx(0.15, abs=labels.voxel_volume_mm3 / 1000)
    assert np.all(grown.array[15, 15, 22:24] == ID["femur"])
    lesions = find_lesions(grown, ID["femoral_bml"], ID["femur"], min_volume_mm3=0.0)
    assert lesions.volume_mm3 == pytest.approx(truth["bml"]["femur"]["delta_cm3"] * 1000)


def test_cut_field_of_view_removes_millimetres_at_the_named_ends():
    """A 10-voxel S axis at 0.5 mm, stored inferior-first or superior-first: 1 mm off the top and 1.5 mm
    off the bottom leave the same 5 world positions either way."""
    for flip in (1.0, -1.0):
        affine = np.diag([1.0, 1.0, 0.5 * flip, 1.0])
        volume = Volume(np.zeros((3, 3, 10), dtype=np.uint8), affine)
        cut = cut_field_of_view(volume, 2, top_mm=1.0, bottom_mm=1.5)
        s = np.sort(cut.world_coords(np.array([[0, 0, k] for k in range(cut.shape[2])], float))[:, 2])
        full = np.sort(volume.world_coords(np.array([[0, 0, k] for k in range(10)], float))[:, 2])
        np.testing.assert_allclose(s, full[3:8])
