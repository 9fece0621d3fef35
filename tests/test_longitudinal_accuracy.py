"""The longitudinal stage's accuracy targets on analytic phantom pairs at OAI spacing (slow: about a minute).

Each pair is the phantom knee at two random poses (baseline up to +-5 deg / +-3 mm, follow-up up to
+-10 deg / +-5 mm) on 0.7 x 0.365 x 0.365 mm grids, with -2.1 cm3 of femoral BML and +2.4 % femoral
cartilage thickness injected at follow-up, and the fields of view cut differently. The targets are the
issue's: BML within 0.05 cm3, thickness within 0.3 percentage points, rotation within 0.5 deg and
translation within 0.5 mm. The two pairs are the first two of ``scripts/validate_longitudinal.py --seed
2026`` (thickness errors +0.031 and -0.068 pp; both have a visit whose condyle axis lies within 0.5 deg of
a grid plane, the hardest poses). That script runs the same check on many pairs: 95 of 99 within 0.3 pp
over seeds 7, 11, 23, 31 and 41, error SD 0.12 pp (BENCHMARKS.md, "Longitudinal").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bml_pipeline.labels import load_schema
from bml_pipeline.longitudinal.change import compare_visits
from bml_pipeline.longitudinal.transform import RigidTransform, rotation_difference_deg
from bml_pipeline.synth.change import cut_field_of_view, phantom_followup, visit_transform
from bml_pipeline.synth.phantom import DEFAULT_LESIONS, KneeSpec, Pose, make_phantom

pytestmark = pytest.mark.slow

SCHEMA = load_schema("oai_zib")
OAI = (0.7, 0.3646, 0.3646)
BML_CHANGE_CM3 = -2.1
THICKNESS_CHANGE_PERCENT = 2.4


@pytest.fixture(scope="module", params=[0, 1], ids=["pair0", "pair1"])
def measured_pair(request):
    rng = np.random.default_rng(2026)
    for _ in range(request.param + 1):
        femoral, tibial = DEFAULT_LESIONS
        base = KneeSpec(pose=Pose.random(rng, 5.0, 3.0), lesions=(replace(femoral, volume_cm3=3.0), tibial))
        follow = phantom_followup(base, bml_change_cm3={"femur": BML_CHANGE_CM3},
                                  thickness_change_percent={"femoral_cartilage": THICKNESS_CHANGE_PERCENT},
                                  pose=Pose.random(rng, 10.0, 5.0))
    baseline = cut_field_of_view(make_phantom(base, spacing=OAI).labels, 2, 0.0, 8.0)
    followup = cut_field_of_view(make_phantom(follow, spacing=OAI).labels, 2, 12.0, 0.0)
    change = compare_visits(baseline, followup, SCHEMA)
    return change, RigidTransform(visit_transform(base, follow))


def test_femoral_bml_change_within_target(measured_pair):
    change, _ = measured_pair
    assert change.to_dict()["bml"]["femur"]["delta_cm3"] == pytest.approx(BML_CHANGE_CM3, abs=0.05)


def test_femoral_thickness_change_within_target(measured_pair):
    change, _ = measured_pair
    femoral = change.to_dict()["cartilage"]["femoral_cartilage"]
    assert femoral["delta_percent"] == pytest.approx(THICKNESS_CHANGE_PERCENT, abs=0.3)
    # The unchanged tibial plate: RMS 0.26 %, worst 0.90 % over the 80 pairs of seeds 31 and 41.
    assert change.to_dict()["cartilage"]["tibial_cartilage"]["delta_percent"] == pytest.approx(0.0, abs=1.0)


@pytest.mark.parametrize("bone", ["femur", "tibia"])
def test_alignment_within_target(measured_pair, bone):
    change, truth = measured_pair
    alignment = change.alignment[bone]
    assert rotation_difference_deg(alignment.transform, truth) < 0.5
    centre = alignment.centre_mm
    assert np.linalg.norm(alignment.transform.apply(centre) - truth.apply(centre)) < 0.5
