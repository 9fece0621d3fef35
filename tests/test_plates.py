"""Plate and lesion phantoms: the labels hold the analytic volumes they claim (truth by construction)."""

from __future__ import annotations

import numpy as np
import pytest

from bml_pipeline.synth.plates import (
    BONE,
    CARTILAGE,
    LESION,
    cylinder_plate,
    flat_plate,
    lesion_block,
    rotation_matrix,
    sphere_plate,
)


def test_rotation_matrix_is_a_proper_rotation() -> None:
    r = rotation_matrix((33.0, -71.0, 12.5))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(rotation_matrix((0, 0, 90)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


@pytest.mark.parametrize("spacing", [(0.365, 0.365, 0.7), (0.3125, 0.3125, 1.5)])
def test_flat_plate_cartilage_volume_matches_the_analytic_volume(spacing) -> None:
    ph = flat_plate(2.0, spacing, angles_deg=(20, 35, 10), size_mm=16, supersample=3)
    voxel = ph.labels.voxel_volume_mm3
    cartilage = np.count_nonzero(ph.labels.array == CARTILAGE) * voxel
    # The plate is t x L x L; a 0.5 threshold of partial volumes of flat surfaces is unbiased, so
    # the error is the quantisation of its edges (a few % of one voxel layer along the perimeter).
    assert cartilage == pytest.approx(2.0 * 16.0 ** 2, rel=0.03)
    assert ph.mean_thickness_mm == 2.0 and ph.interface_area_mm2 == pytest.approx(256.0)
    assert set(np.unique(ph.labels.array)) == {0, BONE, CARTILAGE}


def test_variable_and_curved_plates_report_their_exact_truth() -> None:
    ph = flat_plate(2.0, (0.5, 0.5, 0.5), amplitude_mm=0.6, size_mm=12, supersample=2)
    assert ph.mean_thickness_mm == 2.0  # one full sine period across the plate averages out
    cyl = cylinder_plate(1.5, 20.0, (0.5, 0.5, 0.5), arc_deg=60, length_mm=10, supersample=2)
    assert cyl.interface_area_mm2 == pytest.approx(20.0 * np.radians(60) * 10.0)
    sph = sphere_plate(1.5, 20.0, (0.6, 0.6, 0.6), cap_deg=30, supersample=2)
    assert sph.interface_area_mm2 == pytest.approx(2 * np.pi * 400 * (1 - np.cos(np.radians(30))))
    vol = np.count_nonzero(sph.labels.array == CARTILAGE) * sph.labels.voxel_volume_mm3
    shell = 2 * np.pi / 3 * ((21.5 ** 3) - 20 ** 3) * (1 - np.cos(np.radians(30)))
    assert vol == pytest.approx(shell, rel=0.05)


def test_lesion_block_volumes_are_preserved_per_lesion() -> None:
    ph = lesion_block([((-4, 2, 1), (4, 3, 2.5)), ((6, -5, -3), (2.5, 2.5, 2))], (0.5, 0.5, 1.0),
                      angles_deg=(10, 20, 30), block_mm=24, supersample=3)
    voxel = ph.labels.voxel_volume_mm3
    total = np.count_nonzero(ph.labels.array == LESION) * voxel
    assert total == pytest.approx(sum(ph.volumes_mm3), rel=0.01)
    assert ph.diameters_mm == (8.0, 5.0)


@pytest.mark.parametrize("bad", [{"thickness_mm": 0.0}, {"thickness_mm": 1.0, "amplitude_mm": 1.0}])
def test_impossible_plates_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        flat_plate(spacing=(1, 1, 1), **bad)
