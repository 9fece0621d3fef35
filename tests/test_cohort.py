"""Cohort statistics against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from bml_pipeline.cli import main
from bml_pipeline.longitudinal.cohort import cohort_stats, measure_stats, repeat_mask

CHANGES = [-0.2, 0.4, 1.0, 1.6, 2.2]        # mean 1.0, sd 0.6 * sqrt(2.5)
REPEAT_DIFFS = [0.1, -0.1, 0.3, -0.3]       # sd sqrt(0.2 / 3)


def test_measure_stats_by_hand():
    s = measure_stats(np.array(CHANGES + [np.nan]), np.array(REPEAT_DIFFS), "bml_femur_delta_cm3")
    sd = 0.6 * math.sqrt(2.5)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    assert s.n == 5 and s.n_repeat == 4
    assert s.mean == pytest.approx(1.0)
    assert s.sd == pytest.approx(sd)
    assert (s.ci95_low, s.ci95_high) == pytest.approx((1.0 - half, 1.0 + half))
    assert s.srm == pytest.approx(1.0 / sd)
    sd_d = math.sqrt(0.2 / 3)
    assert s.sem == pytest.approx(sd_d / math.sqrt(2))
    assert s.sdc == pytest.approx(1.96 * sd_d)
    assert s.n_beyond_sdc == 3  # 1.0, 1.6, 2.2 exceed 0.506


def test_too_few_values_give_none_not_nan():
    s = measure_stats(np.array([0.5]), np.array([0.1]), "x_delta_mm")
    assert s.n == 1 and s.mean == 0.5
    assert s.sd is None and s.ci95_low is None and s.srm is None and s.sem is None and s.sdc is None


def test_repeat_rows_by_column_or_visit_suffix():
    by_column = pd.DataFrame({"repeat": ["true", "0", "yes", ""], "a_delta_mm": [1, 2, 3, 4]})
    np.testing.assert_array_equal(repeat_mask(by_column), [True, False, True, False])
    by_visit = pd.DataFrame({"baseline_visit": ["00m", "00m", "12m"], "followup_visit": ["00m_rep", "24m", "12m_rep"]})
    np.testing.assert_array_equal(repeat_mask(by_visit), [True, False, True])


def _table() -> pd.DataFrame:
    rows = [{"subject": f"s{i}", "baseline_visit": "00m", "followup_visit": "24m", "bml_femur_delta_cm3": v,
             "alignment_femur_residual": 0.4} for i, v in enumerate(CHANGES)]
    rows += [{"subject": f"r{i}", "baseline_visit": "00m", "followup_visit": "00m_rep", "bml_femur_delta_cm3": d,
              "alignment_femur_residual": 0.4} for i, d in enumerate(REPEAT_DIFFS)]
    return pd.DataFrame(rows)


def test_cohort_stats_uses_only_change_columns_and_separates_repeats():
    stats = cohort_stats(_table())
    assert [s.measure for s in stats] == ["bml_femur_delta_cm3"]
    assert stats[0].n == 5 and stats[0].mean == pytest.approx(1.0)
    assert stats[0].sdc == pytest.approx(1.96 * math.sqrt(0.2 / 3))


def test_cli_prints_and_writes(tmp_path, capsys):
    path = tmp_path / "changes.csv"
    _table().to_csv(path, index=False)
    assert main(["cohort-stats", str(path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "bml_femur_delta_cm3" in printed and "SDC" in printed
    result = json.loads((tmp_path / "out" / "cohort_stats.json").read_text())
    assert result["measures"][0]["mean"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "cohort_stats.csv").read_text().startswith("measure,n,mean,sd,ci95_low,ci95_high,srm,")


def test_cli_refuses_a_table_without_change_columns(tmp_path, capsys):
    path = tmp_path / "changes.csv"
    path.write_text("subject,volume\na,1\n")
    assert main(["cohort-stats", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "no change columns" in err
