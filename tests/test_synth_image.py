"""Image synthesis from label maps: deterministic, grid-preserving, with each preset's contrast."""

from __future__ import annotations

import numpy as np
import pytest

from bml_pipeline.io import read_labels
from bml_pipeline.labels import load_schema
from bml_pipeline.synth.fields import smooth_noise
from bml_pipeline.synth.image import PRESET_NAMES, synthesize, synthesize_patch
from bml_pipeline.synth.phantom import KneeSpec, make_phantom

SCHEMA = load_schema("oai_zib")
ID = {s.name: s.id for s in SCHEMA.structures}


@pytest.fixture(scope="module")
def labels():
    return make_phantom(KneeSpec(), spacing=(1.2, 1.0, 1.0)).labels


def _means(image, labels):
    return {name: float(image.array[labels.array == i].mean()) for name, i in ID.items() if np.any(labels.array == i)}


def test_same_seed_same_image_other_seed_other_image(labels):
    a = synthesize(labels, SCHEMA, "dess", seed=3).image.array
    b = synthesize(labels, SCHEMA, "dess", seed=3).image.array
    c = synthesize(labels, SCHEMA, "dess", seed=4).image.array
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.abs(a - c)) > 1.0


def test_keeps_the_input_grid(labels):
    result = synthesize(labels, SCHEMA, "t1", seed=0)
    assert result.image.shape == labels.shape
    np.testing.assert_array_equal(result.image.affine, labels.affine)
    np.testing.assert_array_equal(result.labels.array, labels.array)


def test_resamples_to_a_thick_slice_grid_over_the_same_field_of_view(labels):
    result = synthesize(labels, SCHEMA, "pd_fs", seed=0, target_spacing=(2.0, 1.0, 1.0))
    assert result.image.spacing == pytest.approx((2.0, 1.0, 1.0))
    assert result.image.shape == (round(labels.shape[0] * 1.2 / 2.0), labels.shape[1], labels.shape[2])
    assert result.labels.shape == result.image.shape
    np.testing.assert_allclose(result.image.affine, result.labels.affine)
    # The field of view's outer corner stays put: voxel -0.5 maps to the same world point.
    np.testing.assert_allclose(result.image.world_coords([-0.5, -0.5, -0.5]), labels.world_coords([-0.5, -0.5, -0.5]),
                               atol=1e-9)
    # Labels on the new grid are the nearest input labels: lesion volume roughly kept.
    vox_old, vox_new = labels.voxel_volume_mm3, result.labels.voxel_volume_mm3
    old = np.count_nonzero(labels.array == ID["femoral_bml"]) * vox_old
    new = np.count_nonzero(result.labels.array == ID["femoral_bml"]) * vox_new
    assert new == pytest.approx(old, rel=0.05)


# Contrast ordering per preset, as label-wise means (bone means include the dark cortical rim).
ORDER = {
    "dess": [("femoral_cartilage", "femoral_bml"), ("femoral_bml", "femur"), ("tibial_cartilage", "tibia")],
    "pd_fs": [("femoral_bml", "femoral_cartilage"), ("femoral_cartilage", "femur"), ("tibial_bml", "tibia")],
    "t2": [("femoral_bml", "femur"), ("femur", "femoral_cartilage"), ("tibial_bml", "tibia")],
    "t1": [("femur", "femoral_cartilage"), ("femoral_cartilage", "femoral_bml"), ("tibia", "tibial_bml")],
}


@pytest.mark.parametrize("preset", sorted(ORDER))
@pytest.mark.parametrize("seed", [0, 1])
def test_preset_contrast_ordering(labels, preset, seed):
    means = _means(synthesize(labels, SCHEMA, preset, seed=seed, snr=20.0).image, labels)
    for brighter, darker in ORDER[preset]:
        assert means[brighter] > 1.15 * means[darker], (preset, brighter, darker, means)


def test_random_preset_varies_contrast_between_seeds(labels):
    first = _means(synthesize(labels, SCHEMA, "random", seed=0, snr=None, bias=0.0).image, labels)
    second = _means(synthesize(labels, SCHEMA, "random", seed=1, snr=None, bias=0.0).image, labels)
    ratio = [first[k] / second[k] for k in ("femur", "femoral_cartilage", "femoral_bml")]
    assert max(ratio) / min(ratio) > 1.2
    assert set(PRESET_NAMES) == {"dess", "pd_fs", "t2", "t1", "random"}


def test_rician_noise_level_follows_snr(labels):
    clean = synthesize(labels, SCHEMA, "dess", seed=5, snr=None).image.array
    noisy = synthesize(labels, SCHEMA, "dess", seed=5, snr=10.0)
    sigma = noisy.params["noise_sigma"]
    bright = clean > 20 * sigma  # where Rician noise is nearly Gaussian
    assert np.std(noisy.image.array[bright] - clean[bright]) == pytest.approx(sigma, rel=0.05)


def test_background_is_structured_soft_tissue(labels):
    image = synthesize(labels, SCHEMA, "t1", seed=2, snr=None, bias=0.0, texture=0.0).image.array
    background = image[labels.array == 0]
    levels = np.histogram(background, bins=20)[0]
    assert np.count_nonzero(levels > 0.03 * background.size) >= 2  # muscle and fat at least


def test_patch_synthesis_matches_the_label_crop(labels):
    centre = tuple(n // 2 for n in labels.shape)
    patch = synthesize_patch(labels, centre, (32, 48, 40), SCHEMA, seed=1)
    assert patch.image.shape == (32, 48, 40)
    start = [c - p // 2 for c, p in zip(centre, (32, 48, 40))]
    np.testing.assert_array_equal(patch.labels.array, labels.array[start[0]:start[0] + 32, start[1]:start[1] + 48,
                                                                   start[2]:start[2] + 40])
    np.testing.assert_allclose(patch.image.world_coords([0, 0, 0]), labels.world_coords(start))
    with pytest.raises(ValueError, match="does not fit"):
        synthesize_patch(labels, (0, 0, 0), (32, 48, 40), SCHEMA)


def test_smooth_noise_is_smooth_and_unit_scale():
    rng = np.random.default_rng(0)
    field = smooth_noise((60, 70, 80), (0.5, 0.5, 1.0), 5.0, rng)
    assert 0.6 < field.std() < 1.5
    step = np.abs(np.diff(field, axis=0)).mean()
    assert step < 0.25 * field.std()


def test_bad_options_are_refused(labels):
    with pytest.raises(ValueError, match="preset"):
        synthesize(labels, SCHEMA, "ct")
    with pytest.raises(ValueError, match="snr"):
        synthesize(labels, SCHEMA, "dess", snr=0.0)


def test_real_label_map(oai_labels_dir):
    labels = read_labels(oai_labels_dir / "zib_9002817_labels.nii.gz", SCHEMA)
    crop = labels.crop((slice(40, 120), slice(110, 290), slice(130, 280)))
    result = synthesize(crop, SCHEMA, "pd_fs", seed=0)
    means = _means(result.image, crop)
    assert means["femoral_bml"] > 1.5 * means["femur"]
    assert means["femoral_cartilage"] > 1.5 * means["femur"]


def test_random_rigid_repositioning_moves_labels_and_image_together(labels):
    moved = synthesize(labels, SCHEMA, "dess", seed=7, rotation_deg=8.0, translation_mm=4.0)
    assert moved.image.shape == labels.shape and moved.labels.shape == labels.shape
    motion = np.asarray(moved.params["reposition_world_mm"])
    assert np.allclose(motion[:3, :3] @ motion[:3, :3].T, np.eye(3)) and not np.allclose(motion, np.eye(4))
    assert not np.array_equal(moved.labels.array, labels.array)
    # Nearest-neighbour motion keeps each structure's volume within a few percent.
    for name in ("femur", "femoral_cartilage", "femoral_bml"):
        before = np.count_nonzero(labels.array == ID[name])
        assert np.count_nonzero(moved.labels.array == ID[name]) == pytest.approx(before, rel=0.05)
    # The femoral lesion's centroid moved as the transform says.
    centroid = lambda vol: vol.world_coords(np.argwhere(vol.array == ID["femoral_bml"]).mean(axis=0))
    expected = motion[:3, :3] @ centroid(labels) + motion[:3, 3]
    assert np.linalg.norm(centroid(moved.labels) - expected) < 1.0
    means = _means(moved.image, moved.labels)
    assert means["femoral_cartilage"] > 1.15 * means["femur"]
