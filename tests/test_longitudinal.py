"""Longitudinal stage on small analytic knees whose pose change is known by construction.

The phantom: femur (two condyles, trochlea, shaft), tibia (plateau, tuberosity, shaft), patella, each
with a cartilage shell on its joint side, and spherical femoral lesions. The follow-up is the same
analytic shape moved by a known rigid transform, sampled on a different grid (other axis order, other
field of view: the shafts are cut at other heights), so alignment error is measured against the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bml_pipeline.labels import load_schema
from bml_pipeline.longitudinal.align import AlignConfig, align_bone
from bml_pipeline.longitudinal.lesions import match_lesions, summarize_groups
from bml_pipeline.longitudinal.transform import RigidTransform, pull_to_grid, rotation_difference_deg
from bml_pipeline.volume import Volume

SCHEMA = load_schema("oai_zib")
SPACING = (0.8, 0.5, 0.5)  # mm along x (sagittal slices), y, z


def _sphere(p, c, r):
    return np.linalg.norm(p - np.asarray(c, float), axis=1) - r


def _cylinder_z(p, c, r, z0, z1):
    radial = np.hypot(p[:, 0] - c[0], p[:, 1] - c[1]) - r
    height = np.maximum(z0 - p[:, 2], p[:, 2] - z1)
    return np.maximum(radial, height)


def _ellipsoid(p, c, radii):
    q = (p - np.asarray(c, float)) / np.asarray(radii, float)
    return (np.linalg.norm(q, axis=1) - 1.0) * min(radii)


def knee_labels(points: np.ndarray, lesions: list[tuple[tuple[float, float, float], float]]) -> np.ndarray:
    """oai_zib label values at world points (N, 3) of a right-knee-like phantom (mm, RAS)."""
    femur = np.minimum.reduce([_sphere(points, (-11, 0, 0), 12), _sphere(points, (12, 2, 1), 10.5),
                               _sphere(points, (1, 9, 10), 9), _cylinder_z(points, (2, 3), 10, 0, 90)])
    tibia = np.minimum.reduce([_cylinder_z(points, (-9, -1), 13, -45, -17), _cylinder_z(points, (10, -4), 11, -45, -17),
                               _sphere(points, (5, 10, -27), 7)])
    tibia = np.minimum(tibia, _cylinder_z(points, (1, -2), 12, -95, -40))
    patella = _ellipsoid(points, (3, 26, 14), (13, 5, 15))
    out = np.zeros(len(points), dtype=np.uint16)
    out[(femur >= 0) & (femur < 2.5) & (points[:, 2] < 6)] = 2
    out[(tibia >= 0) & (tibia < 2.0) & (points[:, 2] > -17.5)] = 4
    out[(patella >= 0) & (patella < 2.5) & (points[:, 1] < 25)] = 6
    out[femur < 0] = 1
    out[tibia < 0] = 3
    out[patella < 0] = 5
    for centre, radius in lesions:
        out[(_sphere(points, centre, radius) < 0) & (femur < 0)] = 7
    return out


def grid_affine(spacing, origin, order=(0, 1, 2)) -> np.ndarray:
    """Affine whose array axis a runs along world axis ``order[a]`` with ``spacing[a]`` mm."""
    affine = np.zeros((4, 4))
    for axis, world in enumerate(order):
        affine[world, axis] = spacing[axis]
    affine[:3, 3] = origin
    affine[3, 3] = 1.0
    return affine


def render(shape, affine, lesions=(), pose: RigidTransform | None = None) -> Volume:
    """The phantom on a grid; with ``pose`` (baseline world -> this scan's world) the knee is moved."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    if pose is not None:
        world = pose.inverse().apply(world)
    return Volume(knee_labels(world, list(lesions)).reshape(shape), affine)


BASE_SHAPE = (88, 124, 200)
BASE_AFFINE = grid_affine(SPACING, (-35.0, -28.0, -55.0))
# Follow-up: axes stored in another order (z, x, y), a field of view 4 mm higher.
FOLLOW_SHAPE = (200, 88, 124)
FOLLOW_AFFINE = grid_affine((0.5, 0.8, 0.5), (-35.0, -28.0, -51.0), order=(2, 0, 1))
POSE = RigidTransform.from_rotation(
    Rotation.from_rotvec(np.radians(6.0) * np.array([0.6, -0.48, 0.64])).as_matrix(), np.array([2.5, -3.0, 1.5]))


@pytest.fixture(scope="module")
def pair() -> tuple[Volume, Volume]:
    baseline = render(BASE_SHAPE, BASE_AFFINE, [((-10, -3, -4), 4.0), ((12, 0, -2), 3.0)])
    followup = render(FOLLOW_SHAPE, FOLLOW_AFFINE, [((-10, -3, -4), 3.0), ((0, 4, 8), 2.5)], pose=POSE)
    return baseline, followup


def test_transform_round_trip_and_angle():
    rot = Rotation.from_euler("xyz", [10, -20, 5], degrees=True).as_matrix()
    t = RigidTransform.from_rotation(rot, np.array([1.0, 2.0, 3.0]))
    pts = np.array([[0.0, 0, 0], [10, -5, 3]])
    np.testing.assert_allclose(t.inverse().apply(t.apply(pts)), pts, atol=1e-12)
    assert t.rotation_deg == pytest.approx(np.degrees(Rotation.from_matrix(rot).magnitude()), abs=1e-9)
    np.testing.assert_allclose(t.displacement_at(pts[1]), t.apply(pts[1]) - pts[1])


def test_pull_to_grid_moves_a_cube_exactly():
    affine = grid_affine((1.0, 0.5, 2.0), (0.0, 0.0, 0.0))
    src = np.zeros((20, 40, 10), dtype=np.uint8)
    src[5:10, 10:20, 2:5] = 1
    source = Volume(src, affine)
    shift = RigidTransform.from_rotation(np.eye(3), np.array([3.0, -2.0, 4.0]))  # whole voxels on this grid
    out = pull_to_grid(source, shift, source)
    expected = np.zeros_like(src)
    expected[8:13, 6:16, 4:7] = 1
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bone", ["femur", "tibia"])
def test_alignment_recovers_known_pose(pair, bone):
    baseline, followup = pair
    result = align_bone(baseline, followup, SCHEMA, bone)
    centre = result.centre_mm
    rotation_error = rotation_difference_deg(result.transform, POSE)
    translation_error = np.linalg.norm(result.transform.apply(centre) - POSE.apply(centre))
    assert rotation_error < 0.5, rotation_error
    assert translation_error < 0.5, translation_error
    assert result.rotation_deg == pytest.approx(6.0, abs=0.5)
    assert result.residual_mm < 0.35
    assert result.coverage > 0.9


def test_alignment_of_a_mirrored_knee_leaves_a_large_residual(pair):
    baseline, _ = pair
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0]) @ BASE_AFFINE  # world x flipped: a left knee
    mirrored = Volume(baseline.array, mirror)
    result = align_bone(baseline, mirrored, SCHEMA, "femur", config=AlignConfig())
    assert result.residual_mm > AlignConfig().max_residual_mm


def test_lesion_matching_persisting_new_resolved(pair):
    baseline, followup = pair
    groups = match_lesions(baseline, followup, 7, POSE)
    summary = summarize_groups(groups)
    assert [g.status for g in groups] == ["persisting", "new", "resolved"]
    voxel_cm3 = np.prod(SPACING) / 1000.0
    # Volumes by construction: voxel counts of the rendered spheres (about 4/3 pi r^3).
    assert groups[0].baseline_cm3 == pytest.approx(np.sum(baseline.array == 7) * voxel_cm3 - groups[2].baseline_cm3)
    assert groups[0].baseline_cm3 == pytest.approx(4 / 3 * np.pi * 4.0**3 / 1000, rel=0.05)
    assert groups[0].followup_cm3 == pytest.approx(4 / 3 * np.pi * 3.0**3 / 1000, rel=0.05)
    assert groups[1].followup_cm3 == pytest.approx(4 / 3 * np.pi * 2.5**3 / 1000, rel=0.08)
    assert groups[2].baseline_cm3 == pytest.approx(4 / 3 * np.pi * 3.0**3 / 1000, rel=0.05)
    np.testing.assert_allclose(groups[1].centroid_mm, (0, 4, 8), atol=0.3)
    assert summary["new"]["count"] == 1 and summary["resolved"]["count"] == 1

