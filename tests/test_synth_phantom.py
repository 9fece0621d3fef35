"""The analytic knee phantom: its truth is right, and its hard labels reproduce it."""

from __future__ import annotations

import numpy as np
import pytest

from bml_pipeline.labels import load_schema
from bml_pipeline.synth import anatomy as A
from bml_pipeline.synth.phantom import (
    KneeSpec,
    Lesion,
    Pose,
    integrate_volume_mm3,
    make_phantom,
    phantom_grid,
)
from bml_pipeline.synth.raster import rasterize, rasterize_sparse
from bml_pipeline.synth.sdf import Blob, rotation_matrix

SCHEMA = load_schema("oai_zib")
OBLIQUE = Pose((4.0, -7.0, 3.0), (1.5, 2.0, -3.0))


@pytest.fixture(scope="module", params=[(0.365, 0.365, 0.7), (0.3125, 0.3125, 1.5)], ids=["0.7mm", "1.5mm"])
def phantom(request):
    return make_phantom(KneeSpec(pose=OBLIQUE), spacing=request.param)


def test_hard_label_volumes_match_reference_volumes(phantom):
    assert phantom.labels.spacing == pytest.approx(phantom.truth.spacing_mm)
    vox = phantom.labels.voxel_volume_mm3 / 1000
    checked = 0
    for name, entry in phantom.truth.structures.items():
        counted = np.count_nonzero(phantom.labels.array == SCHEMA.by_name(name).id) * vox
        assert counted == pytest.approx(entry["rasterized_cm3"], abs=1e-9)
        if entry["reference_cm3"] >= 0.5:
            assert counted == pytest.approx(entry["reference_cm3"], rel=0.005), name
            checked += 1
    assert checked == 8  # 3 bones, 3 plates, 2 lesions


def test_labels_follow_the_schema_and_lesions_sit_in_their_bones(phantom):
    arr = phantom.labels.array
    SCHEMA.check_values(arr)
    assert set(np.unique(arr)) == {0, 1, 2, 3, 4, 5, 6, 7, 8}
    from scipy import ndimage

    for bone in ("femur", "tibia"):
        lesion = arr == SCHEMA.lesion_of(bone).id
        ring = ndimage.binary_dilation(lesion) & ~lesion
        assert set(np.unique(arr[ring])) <= {SCHEMA.by_name(bone).id}, bone


def test_reference_volumes_have_closed_forms_or_converge():
    for lesion in KneeSpec().lesions:
        blob = lesion.blob()
        assert blob.volume_mm3() == pytest.approx(lesion.volume_cm3 * 1000, rel=1e-12)
    ellipsoid = Blob((0, 0, 0), (3.0, 4.0, 5.0), tuple(map(tuple, np.eye(3))))
    assert ellipsoid.volume_mm3() == pytest.approx(4 / 3 * np.pi * 60, rel=1e-12)
    lo, hi = A.LOCAL_BOXES["patella"]
    assert integrate_volume_mm3(A.patella_sdf, lo, hi, 0.3, 3) == pytest.approx(A.BONE_VOLUME_MM3["patella"], rel=3e-4)
    lo, hi = A.LOCAL_BOXES["tibia"]
    assert integrate_volume_mm3(A.tibia_sdf, lo, hi, 0.5, 3) == pytest.approx(A.BONE_VOLUME_MM3["tibia"], rel=1e-3)


def test_femur_reference_volume_rederived():
    lo, hi = A.LOCAL_BOXES["femur"]
    assert integrate_volume_mm3(A.femur_sdf, lo, hi, 0.3, 3) == pytest.approx(A.BONE_VOLUME_MM3["femur"], rel=2e-4)


@pytest.mark.parametrize("plate", sorted(A.PLATES.values()))
def test_cartilage_volume_formula_agrees_with_numerical_integration(plate):
    shells = A.plates(A.Thickness())[plate]
    numeric = 0.0
    for shell in shells:
        numeric += integrate_volume_mm3(shell.sdf, *shell.local_box(), 0.3, 3)
    exact = sum(s.truth()["volume_mm3"] for s in shells)
    assert numeric == pytest.approx(exact, rel=2e-3)


@pytest.mark.parametrize("plate", sorted(A.PLATES.values()))
def test_plates_sit_exactly_on_the_bone_surface(plate):
    """Bone surface under each plate is the base surface (no blend reaches it), so the analytic
    thickness is the distance from the bone along the normal."""
    bone = next(b for b, p in A.PLATES.items() if p == plate)
    rng = np.random.default_rng(0)
    lo, hi = A.LOCAL_BOXES[bone]
    pts = rng.uniform(lo, hi, (400_000, 3))
    for shell in A.plates(A.Thickness())[plate]:
        u, v, height = shell._params(pts)
        t = shell.thickness(u, v)
        inside = (height >= 0) & (height < t)
        assert inside.sum() > 500
        # Inside the plate the bone SDF is the height over the base surface: the bone surface is the base.
        assert np.allclose(A.BONE_SDFS[bone](pts[inside]), height[inside], atol=1e-9)


def test_sparse_rasterization_equals_dense():
    blob = KneeSpec().lesions[0].blob()
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix((10.0, 20.0, 30.0)) @ np.diag([0.4, 0.4, 0.9])
    affine[:3, 3] = np.asarray(blob.centre) - affine[:3, :3] @ np.array([25.0, 25.0, 12.0])
    dense = rasterize(blob.sdf, (50, 50, 24), affine, 3)
    sparse = rasterize_sparse(blob.sdf, (50, 50, 24), affine, 3, block=(4, 4, 2))
    np.testing.assert_array_equal(dense, sparse)


def test_left_knee_is_the_mirror_image():
    right = make_phantom(KneeSpec(side="right"), spacing=(1.2, 1.2, 1.2))
    left = make_phantom(KneeSpec(side="left"), spacing=(1.2, 1.2, 1.2))
    assert left.labels.meta.laterality == "left"
    assert left.labels.shape == right.labels.shape
    assert np.mean(left.labels.array != right.labels.array[::-1]) < 1e-4  # ties may break differently
    for truth, sign in ((right.truth, -1), (left.truth, 1)):
        femoral = next(x for x in truth.lesions if x["bone"] == "femur")
        assert np.sign(femoral["centre_ras_mm"][0]) == sign  # medial condyle: towards the body's midline


def test_thickness_truth_scales_exactly():
    base = A.plates(A.Thickness())["femoral_cartilage"]
    grown = A.plates(A.Thickness(), {"femoral_cartilage": 1.024})["femoral_cartilage"]
    mean = lambda shells: sum(s.truth()["mean_thickness_mm"] * s.truth()["area_mm2"] for s in shells) / sum(
        s.truth()["area_mm2"] for s in shells)
    assert mean(grown) / mean(base) == pytest.approx(1.024, rel=1e-9)
    const = A.plates(A.Thickness(variation=0.0))["patellar_cartilage"][0]
    assert const.truth()["max_thickness_mm"] == pytest.approx(3.0, rel=1e-4)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="inside"):
        make_phantom(KneeSpec(lesions=(Lesion("femur", (-21.0, -8.0, 1.0), (5, 5, 5), 1.0),)), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        shape, affine = phantom_grid(KneeSpec(), (1.0, 1.0, 1.0))
        make_phantom(KneeSpec(), (shape[0] - 20, shape[1], shape[2]), affine)
    with pytest.raises(ValueError, match="side"):
        KneeSpec(side="middle")
