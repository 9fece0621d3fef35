"""Segmentation stage: predictor geometry, determinism, weights errors, resampling and BML rules.

Uses a tiny random-weight network (seconds on a CPU); trained quality is validated by
``scripts/validate_segmentation.py``, not here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from bml_pipeline.cli import main
from bml_pipeline.errors import InputError
from bml_pipeline.io import read_volume, write_nifti
from bml_pipeline.labels import load_schema
from bml_pipeline.segment.bml import constrain_lesions, refine_lesions
from bml_pipeline.segment.config import BmlRefineConfig, InferenceConfig, ModelConfig, NetworkConfig
from bml_pipeline.segment.predictor import Predictor
from bml_pipeline.segment.resample import image_to_working_grid, probabilities_to_labels, working_grid
from bml_pipeline.segment.weights import load_weights, save_weights
from bml_pipeline.volume import Volume

TINY = ModelConfig(name="tiny_test", working_spacing_mm=2.0,
                   network=NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=0),
                   inference=InferenceConfig(roi_size=(16, 16, 16), overlap=0.25, slab_voxels=2000))


def _oblique_affine(spacing: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing)
    aff[:3, 3] = (-12.0, 7.5, 30.0)
    return aff


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from bml_pipeline.segment.network import build_network

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_weights(path, build_network(TINY), TINY)
    return path


def _knee_like_image(shape: tuple[int, int, int], affine: np.ndarray) -> Volume:
    rng = np.random.default_rng(3)
    i, j, k = np.indices(shape)
    ball = (i - shape[0] / 2) ** 2 + (j - shape[1] / 2) ** 2 + (k - shape[2] / 3) ** 2 < (min(shape) / 3) ** 2
    arr = 100.0 + 400.0 * ball + rng.normal(0, 10, shape)
    return Volume(arr.astype(np.float32), affine)


@pytest.mark.parametrize("affine", [np.diag([0.7, 0.4, 0.4, 1.0]), _oblique_affine((0.5, 0.9, 1.3), 25.0)],
                         ids=["axis-aligned-anisotropic", "oblique"])
def test_labels_on_input_grid_with_input_affine(tiny_weights: Path, affine: np.ndarray) -> None:
    image = _knee_like_image((30, 26, 22), affine)
    predictor = Predictor.load(tiny_weights, device="cpu")
    labels = predictor.segment(image)
    assert labels.shape == image.shape
    np.testing.assert_array_equal(labels.affine, image.affine)
    assert labels.array.dtype == np.uint8
    assert set(np.unique(labels.array)) <= load_schema("oai_zib").ids
    flipped = predictor.segment(image, tta=True)
    assert flipped.shape == image.shape


def test_same_input_same_labels(tiny_weights: Path) -> None:
    image = _knee_like_image((24, 28, 20), _oblique_affine((0.8, 0.8, 1.1), -10.0))
    first = Predictor.load(tiny_weights, device="cpu").segment(image).array
    second = Predictor.load(tiny_weights, device="cpu").segment(image).array
    np.testing.assert_array_equal(first, second)
    assert len(np.unique(first)) > 1, "a random network should still give several classes here"


def _bad_files(tiny_weights: Path, tmp: Path) -> dict[str, Path]:
    data = tiny_weights.read_bytes()
    files = {"corrupt": tmp / "corrupt.safetensors", "truncated": tmp / "truncated.safetensors",
             "wrong-architecture": tmp / "wrong.safetensors", "missing": tmp / "missing.safetensors"}
    files["corrupt"].write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    files["truncated"].write_bytes(data[: len(data) // 2])
    from bml_pipeline.segment.network import build_network

    other = dataclasses.replace(TINY, network=NetworkConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0))
    save_weights(files["wrong-architecture"], build_network(other), TINY)  # config says TINY, tensors differ
    return files


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "wrong-architecture", "missing"])
def test_bad_weights_one_line_error_naming_file(tiny_weights: Path, tmp_path: Path, kind: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = _bad_files(tiny_weights, tmp_path)[kind]
    with pytest.raises(InputError) as err:
        load_weights(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    image = tmp_path / "image.nii.gz"
    write_nifti(_knee_like_image((12, 12, 12), np.eye(4)), image)
    out = tmp_path / "out"
    code = main(["segment", str(image), "--out", str(out), "--model", str(path), "--device", "cpu"])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and len(stderr.splitlines()) == 1 and str(path) in stderr
    assert not out.exists()


def test_segment_command_writes_labels_and_provenance(tiny_weights: Path, tmp_path: Path) -> None:
    import json

    affine = _oblique_affine((0.6, 0.6, 1.2), 15.0)
    image_path = tmp_path / "image.nii.gz"
    write_nifti(_knee_like_image((20, 22, 18), affine), image_path)
    out = tmp_path / "out"
    assert main(["segment", str(image_path), "--out", str(out), "--model", str(tiny_weights), "--device", "cpu"]) == 0
    labels = read_volume(out / "labels.nii.gz")
    image = read_volume(image_path)
    assert labels.same_grid(image)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model_id"] == "tiny_test" and len(prov["weights_sha256"]) == 64 and prov["device"] == "cpu"
    assert prov["seconds"]["total"] > 0


def test_probabilities_back_to_oblique_grid_keep_a_ball() -> None:
    """A ball of radius 9 mm given as probabilities on a 1.5 mm grid comes back on a fine oblique grid
    with the right volume and centre (argmax of trilinearly resampled probabilities)."""
    import torch

    spacing, radius, centre = 1.5, 9.0, np.array([3.0, -4.0, 5.0])
    work_affine = np.eye(4)
    work_affine[:3, :3] *= spacing
    work_affine[:3, 3] = centre - spacing * 15
    idx = np.indices((31, 31, 31)).reshape(3, -1).T
    world = idx * spacing + work_affine[:3, 3]
    # smooth probability: logistic in signed distance
    p = 1.0 / (1.0 + np.exp(np.linalg.norm(world - centre, axis=1) - radius))
    probs = torch.from_numpy(np.stack([1 - p, p]).reshape(2, 31, 31, 31).astype(np.float32))
    fine_affine = _oblique_affine((0.4, 0.45, 0.5), 30.0)
    fine_affine[:3, 3] = centre - fine_affine[:3, :3] @ np.array([40, 40, 40])
    image = Volume(np.zeros((81, 81, 81), np.float32), fine_affine)
    labels = probabilities_to_labels(probs, work_affine, image, slab_voxels=100_000)
    volume = labels.sum() * image.voxel_volume_mm3
    assert volume == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.02)
    got_centre = image.world_coords(np.argwhere(labels == 1)).mean(axis=0)
    np.testing.assert_allclose(got_centre, centre, atol=0.1)


def test_image_to_working_grid_is_exact_for_a_linear_ramp() -> None:
    affine = _oblique_affine((0.5, 0.7, 1.1), 20.0)
    shape = (40, 36, 30)
    world = Volume(np.zeros(shape, np.float32), affine).world_coords(np.indices(shape).reshape(3, -1).T)
    ramp = (2.0 * world[:, 0] - world[:, 2]).reshape(shape).astype(np.float32)
    image = Volume(ramp, affine)
    wshape, waff = working_grid(image, 1.0)
    work = image_to_working_grid(image, wshape, waff)
    wworld = Volume(work, waff).world_coords(np.indices(wshape).reshape(3, -1).T)
    inside = np.all((Volume(work, waff).voxel_coords(wworld) >= 0), axis=1)
    src = image.voxel_coords(wworld)
    interior = np.all((src > 3) & (src < np.array(shape) - 4), axis=1) & inside
    expected = 2.0 * wworld[:, 0] - wworld[:, 2]
    np.testing.assert_allclose(work.ravel()[interior], expected[interior], atol=1e-2)


def test_lesions_take_the_nearest_bone_and_stay_in_bone() -> None:
    schema = load_schema("oai_zib")
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[:, :, :8] = 3  # tibia
    arr[:, :, 12:] = 1  # femur
    arr[5:8, 5:8, 6:8] = 7  # predicted femoral lesion inside the tibia -> tibial lesion
    arr[12:15, 12:15, 12:14] = 8  # tibial lesion in the femur -> femoral lesion
    arr[2:4, 2:4, 9:11] = 9  # floating lesion between bones, touching neither -> background
    vol = Volume(arr, np.diag([0.5, 0.5, 0.7, 1.0]))
    out = constrain_lesions(vol, schema).array
    assert np.all(out[5:8, 5:8, 6:8] == 8)
    assert np.all(out[12:15, 12:15, 12:14] == 7)
    assert np.all(out[2:4, 2:4, 9:11] == 0)
    assert np.count_nonzero(out == 9) == 0


def test_refinement_finds_bright_marrow_and_refuses_t1() -> None:
    schema = load_schema("oai_zib")
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[4:36, 4:36, 4:36] = 3
    image = rng.normal(100, 5, labels.shape).astype(np.float32)
    image[15:22, 15:22, 15:22] += 60  # oedema-like, 7^3 voxels of 1 mm3
    lab_vol, img_vol = Volume(labels, np.eye(4)), Volume(image, np.eye(4))
    cfg = BmlRefineConfig(enabled=True, k_sd=3.0, erode_mm=1.5, min_component_mm3=20.0)
    out = refine_lesions(img_vol, lab_vol, schema, cfg, "dess").array
    found = out == 8
    assert found[15:22, 15:22, 15:22].mean() > 0.95 and found.sum() < 7**3 * 1.1
    with pytest.raises(InputError, match="fluid-sensitive"):
        refine_lesions(img_vol, lab_vol, schema, cfg, "t1")


def test_unknown_config_key_rejected(tmp_path: Path) -> None:
    from bml_pipeline.segment.config import load_train_config

    path = tmp_path / "m.yaml"
    path.write_text("model:\n  name: x\n  netwrk: {}\ntraining: {}\n")
    with pytest.raises(InputError, match="netwrk"):
        load_train_config(path)


def test_training_pose_resampling_keeps_world_position() -> None:
    """Without a random pose, labels on the working grid sit where they were in the world."""
    from bml_pipeline.segment.resample import labels_to_working_grid

    affine = _oblique_affine((0.7, 0.36, 0.36), 5.0)
    shape = (40, 80, 80)
    centre = np.array([0.0, 20.0, 45.0])
    world = Volume(np.zeros(shape, np.uint8), affine).world_coords(np.indices(shape).reshape(3, -1).T)
    ball = (np.linalg.norm(world - centre, axis=1) < 6.0).reshape(shape).astype(np.uint8) * 3
    work = labels_to_working_grid(Volume(ball, affine), 0.7)
    got = work.world_coords(np.argwhere(work.array == 3)).mean(axis=0)
    np.testing.assert_allclose(got, centre, atol=0.2)
    assert np.count_nonzero(work.array == 3) * work.voxel_volume_mm3 == pytest.approx(4 / 3 * np.pi * 216, rel=0.05)


def test_shipped_model_loads_and_is_small() -> None:
    from bml_pipeline.segment.weights import MODELS_DIR

    predictor = Predictor.load("knee_synth_v1", device="cpu")
    assert predictor.model_id == "knee_synth_v1" and len(predictor.weights_sha256) == 64
    assert (MODELS_DIR / "knee_synth_v1.safetensors").stat().st_size <= 20 * 2**20
    with pytest.raises(InputError, match="no shipped model"):
        Predictor.load("no_such_model", device="cpu")


def test_dice_per_label_with_labels_not_asked_for():
    from bml_pipeline.segment.metrics import dice_per_label

    truth = np.array([0, 1, 1, 9, 9, 3])
    pred = np.array([0, 1, 3, 9, 1, 3])
    dice = dice_per_label(pred, truth, [1, 3])
    assert dice[1] == pytest.approx(2 * 1 / (2 + 2))
    assert dice[3] == pytest.approx(2 * 1 / (1 + 2))


@pytest.mark.parametrize("change, problem", [
    ({"network": {"channels": [100000, 200000, 400000], "strides": [2, 2]}}, "network.channels = 100000"),
    ({"inference": {"roi_size": [4096, 4096, 4096]}}, "inference.roi_size = 4096"),
    ({"network": {"channels": "abc"}}, "network.channels must be numbers"),
    ({"num_classes": 2.5}, "num_classes must be whole numbers"),
    ({"network": {"channels": [8, 16], "strides": [2, 2, 2]}}, "one stride fewer"),
    ({"network": {"norm": "layer"}}, "network.norm must be one of"),
])
def test_hostile_embedded_config_refused_before_building(tmp_path: Path, change: dict, problem: str) -> None:
    """A weights file's embedded config is validated against bounds before any network is built."""
    import json

    import torch
    from safetensors.torch import save_file

    from bml_pipeline.segment.weights import FORMAT

    config = {"name": "evil", "num_classes": 3, **change}
    path = tmp_path / "evil.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "config": json.dumps(config)})
    with pytest.raises(InputError) as err:
        load_weights(path)
    assert str(path) in str(err.value) and problem in str(err.value) and "\n" not in str(err.value)


def test_cascade_fine_model_runs_on_the_coarse_box_and_returns_input_grid_labels(tmp_path: Path) -> None:
    """A fine model (image + coarse probabilities) after its coarse model: labels on the input grid with
    its affine (oblique), deterministic, and nothing outside the fine box."""
    import torch

    from bml_pipeline.segment.network import build_network

    torch.manual_seed(2)
    coarse_cfg = dataclasses.replace(TINY, name="tiny_coarse", num_classes=7, working_spacing_mm=3.0)
    coarse_path = tmp_path / "coarse.safetensors"
    coarse_net = build_network(coarse_cfg)
    with torch.no_grad():  # a coarse model that calls everything femur: the box is then the whole image
        coarse_net.model[-1].conv.bias[:] = torch.tensor([0.0, 5.0, 0, 0, 0, 0, 0])
    save_weights(coarse_path, coarse_net, coarse_cfg)
    fine_cfg = dataclasses.replace(TINY, name="tiny_fine", prior_classes=7, coarse_model=str(coarse_path),
                                   working_spacing_mm=1.5, crop_margin_mm=3.0)
    fine_path = tmp_path / "fine.safetensors"
    save_weights(fine_path, build_network(fine_cfg), fine_cfg)
    predictor = Predictor.load(fine_path, device="cpu")
    assert predictor.coarse is not None and predictor.coarse.config.num_classes == 7
    image = _knee_like_image((20, 24, 22), _oblique_affine((1.1, 0.9, 1.3), 20.0))
    first = predictor.segment(image)
    second = predictor.segment(image)
    assert first.shape == image.shape and np.array_equal(first.affine, image.affine)
    assert np.array_equal(first.array, second.array)
    assert set(np.unique(first.array)) <= set(range(10))
    assert "coarse" in predictor.timings and predictor.provenance["coarse"]["model_id"] == "tiny_coarse"


def test_fine_model_without_its_coarse_model_is_refused(tmp_path: Path) -> None:
    import torch

    from bml_pipeline.segment.network import build_network

    torch.manual_seed(2)
    fine_cfg = dataclasses.replace(TINY, name="tiny_fine", prior_classes=7, coarse_model="no_such_model")
    path = tmp_path / "fine.safetensors"
    save_weights(path, build_network(fine_cfg), fine_cfg)
    with pytest.raises(InputError, match="no_such_model: no shipped model of this name"):
        Predictor.load(path, device="cpu")


def test_cropped_resampling_gives_the_same_labels_as_the_full_grid() -> None:
    """Only the box of the working grid's foreground is interpolated; the labels do not change."""
    import torch

    rng = np.random.default_rng(4)
    work_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    work_affine[:3, 3] = (-20.0, -15.0, -10.0)
    logits = torch.from_numpy(rng.normal(0, 1, (4, 20, 22, 18)).astype(np.float32))
    logits[0] += 4.0
    logits[0, 5:12, 6:15, 4:10] -= 8.0  # foreground in one block
    probs = torch.softmax(logits, dim=0)
    image = Volume(np.zeros((40, 31, 37), np.float32), _oblique_affine((0.7, 0.9, 0.8), 20.0))
    image = Volume(image.array, image.affine @ np.array([[1, 0, 0, -20], [0, 1, 0, -15], [0, 0, 1, -20], [0, 0, 0, 1.0]]))
    full = probabilities_to_labels(probs, work_affine, image, slab_voxels=5000, crop=False)
    cropped = probabilities_to_labels(probs, work_affine, image, slab_voxels=5000, crop=True)
    assert full.any() and np.array_equal(full, cropped)
