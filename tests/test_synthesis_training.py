"""On-the-fly training samples (segment.synthesis) and the training loss and schedule, on phantoms whose
answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from bml_pipeline.volume import Volume

torch = pytest.importorskip("torch")


def _knee_like(spacing: tuple[float, float, float] = (0.7, 0.4, 0.4)) -> Volume:
    """A femur ball over a tibia ball, each with a cartilage cap, on an anisotropic grid."""
    shape = (70, 120, 120)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.array(spacing) * (np.array(shape) - 1) / 2
    world = Volume(np.zeros(shape, np.uint8), affine).world_coords(np.indices(shape).reshape(3, -1).T)
    lab = np.zeros(len(world), np.uint8)
    femur_c, tibia_c = np.array([0.0, 0.0, 11.0]), np.array([0.0, 0.0, -11.0])
    d_f = np.linalg.norm(world - femur_c, axis=1)
    d_t = np.linalg.norm(world - tibia_c, axis=1)
    lab[(d_f < 10.0) & (world[:, 2] < femur_c[2])] = 2
    lab[d_f < 8.0] = 1
    lab[(d_t < 10.0) & (world[:, 2] > tibia_c[2])] = 4
    lab[d_t < 8.0] = 3
    return Volume(lab.reshape(shape), affine)


def test_generation_map_keeps_structures_and_fills_background() -> None:
    from bml_pipeline.segment.synthesis import (
        CORTEX_FEMUR,
        CORTEX_TIBIA,
        MUSCLE,
        N_GENERATION,
        generation_map,
    )

    labels = _knee_like()
    gen = generation_map(labels, 0.75)
    arr = np.asarray(gen.array)
    assert arr.max() < N_GENERATION and np.count_nonzero(arr == 0) == 0
    assert {1, 2, 3, 4, CORTEX_FEMUR, CORTEX_TIBIA, MUSCLE} <= set(np.unique(arr).tolist())
    # Femur = marrow + its cortex: the volume of a ball of radius 8 mm, within the grid's staircase.
    femur_mm3 = np.count_nonzero(np.isin(arr, (1, CORTEX_FEMUR))) * gen.voxel_volume_mm3
    assert femur_mm3 == pytest.approx(4 / 3 * np.pi * 8.0**3, rel=0.05)


def test_sample_without_pose_keeps_anatomy_in_place_and_is_deterministic() -> None:
    from bml_pipeline.segment.synthesis import (
        COARSE_CLASSES,
        SampleGenerator,
        SamplingOptions,
        generation_map,
    )

    gen_map = generation_map(_knee_like(), 0.75)
    opts = SamplingOptions(spacing_mm=1.5, shape=(32, 32, 40), rotation_deg=0.0, scale=(1.0, 1.0), shift_mm=0.0,
                           elastic_mm=0.0, fov_cut=0.0)
    sampler = SampleGenerator([gen_map], COARSE_CLASSES, opts)
    g = torch.Generator()
    g.manual_seed(3)
    image, target = sampler.sample(g)
    g.manual_seed(3)
    image2, target2 = sampler.sample(g)
    assert torch.equal(image, image2) and torch.equal(target, target2)
    assert image.shape == (1, 32, 32, 40) and target.shape == (7, 32, 32, 40)
    assert torch.allclose(target.sum(0), torch.ones(()))
    assert float(image.min()) >= -0.5 and float(image.max()) <= 1.5
    labels = target.argmax(0).numpy()
    # The output grid is centred on the map's centre: the femur centre (0, 0, 11) mm lies 11 / 1.5 voxels
    # above the grid centre along z (a mirror along x leaves it in place).
    centre = (np.array(labels.shape) - 1) / 2
    femur = np.argwhere(np.isin(labels, (1, 2))).mean(axis=0)
    tibia = np.argwhere(np.isin(labels, (3, 4))).mean(axis=0)
    np.testing.assert_allclose(femur[:2], centre[:2], atol=0.5)
    assert femur[2] - centre[2] == pytest.approx(11.0 / 1.5 - 1.0 / 1.5, abs=0.8)  # cap shifts it down
    assert tibia[2] - centre[2] == pytest.approx(-(11.0 / 1.5 - 1.0 / 1.5), abs=0.8)
    femur_cm3 = np.count_nonzero(labels == 1) * 1.5**3 / 1000
    assert femur_cm3 == pytest.approx(4 / 3 * np.pi * 0.8**3, rel=0.12)


def test_loss_is_near_zero_for_a_perfect_prediction_with_absent_classes() -> None:
    from bml_pipeline.segment.training import soft_dice_ce

    target = torch.zeros((1, 7, 8, 8, 8))
    target[:, 0] = 1
    target[:, 0, :4] = 0
    target[:, 1, :4] = 1  # only background and class 1 present
    logits = (target * 40 - 20).clone()
    assert float(soft_dice_ce(logits, target)) < 0.01
    wrong = logits.flip(2)
    assert float(soft_dice_ce(wrong, target)) > 1.0


def test_learning_rate_warms_up_then_decays() -> None:
    from bml_pipeline.segment.config import ModelConfig, TrainConfig, TrainingConfig
    from bml_pipeline.segment.training import learning_rate

    cfg = TrainConfig(ModelConfig(name="x"), TrainingConfig(learning_rate=1e-3, min_learning_rate=1e-5,
                                                            warmup_steps=100, max_steps=1000))
    assert learning_rate(0, cfg) == pytest.approx(1e-3 / 100, rel=0.01)
    assert learning_rate(99, cfg) == pytest.approx(1e-3 * (1 + np.cos(np.pi * 0.099)) / 2, rel=0.02)
    assert learning_rate(1000, cfg) == pytest.approx(1e-5)
    # A resume from committed weights warms up again from its step.
    assert learning_rate(500, cfg, warmup_from=500) < learning_rate(599, cfg, warmup_from=500)


def test_fine_samples_centre_on_surfaces_carry_a_prior_and_can_hold_painted_lesions() -> None:
    from bml_pipeline.segment.synthesis import FULL_CLASSES, SampleGenerator, SamplingOptions, generation_map

    gen_map = generation_map(_knee_like(), 0.0)  # the map's own anisotropic grid
    assert gen_map.shape == _knee_like().shape
    opts = SamplingOptions(spacing_mm=0.7, shape=(24, 24, 24), focus="surface", shift_mm=2.0, rotation_deg=0.0,
                           elastic_mm=0.0, fov_cut=0.0, synthetic_lesions=1.0, prior_classes=7)
    sampler = SampleGenerator([gen_map], FULL_CLASSES, opts)
    g = torch.Generator()
    lesion_seen = False
    for seed in range(4):
        g.manual_seed(seed)
        image, target = sampler.sample(g)
        assert image.shape == (8, 24, 24, 24) and target.shape == (10, 24, 24, 24)
        prior = image[1:]
        assert torch.allclose(prior.sum(0), torch.ones(()), atol=1e-4) and float(prior.min()) >= 0
        labels = target.argmax(0)
        # Centred within 2 mm (+ a voxel) of cartilage or cortex: a 24-voxel crop holds bone or cartilage.
        assert bool(((labels > 0) & (labels < 7)).any())
        # The prior follows the target: where the target is femur, the prior's femur channel leads.
        femur = (labels == 1)
        if bool(femur.any()):
            assert float(prior[1][femur].mean()) > 0.5
        lesion_seen |= bool((labels >= 7).any())
    assert lesion_seen


def test_sample_workers_yield_the_same_samples_in_step_order() -> None:
    """Resumable and deterministic with or without sample-making processes: step n's sample is seeded by n."""
    from bml_pipeline.segment.synthesis import (
        COARSE_CLASSES,
        SampleGenerator,
        SamplingOptions,
        generation_map,
    )
    from bml_pipeline.segment.training import _sample_stream

    sampler = SampleGenerator([generation_map(_knee_like(), 1.0)], COARSE_CLASSES,
                              SamplingOptions(spacing_mm=2.0, shape=(16, 16, 16)))
    here = [image for image, _ in _sample_stream(sampler, 3, 5, 9, 0)]
    workers = [image for image, _ in _sample_stream(sampler, 3, 5, 9, 2)]
    assert len(here) == len(workers) == 4
    assert all(torch.equal(a, b) for a, b in zip(here, workers))
