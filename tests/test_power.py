"""Trial planning: sample sizes against published values, SDC from repeat pairs and limits of agreement,
and the ``cohort-stats`` trial-planning table."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from bml_pipeline.cli import main
from bml_pipeline.longitudinal.power import (
    NotComputable,
    error_from_loa,
    error_from_repeats,
    power_row,
    power_t,
    power_table,
    resolve_measure,
    sample_size_normal,
    sample_size_t,
    sdc_group,
)

BML = "bml_femur_delta_cm3"
THICK = "cartilage_femoral_cartilage_common_region_delta_percent"


def test_textbook_example_to_the_knee():
    """Difference 5, SD 10 (d = 0.5), alpha 0.05 two-sided, power 80 %.

    Normal approximation (Chow, Shao & Wang, Sample Size Calculations in Clinical Research, 2nd ed. 2008,
    ch. 3.2, two-sample parallel design, test for equality): 2 (1.95996 + 0.84162)^2 * 10^2 / 5^2 = 62.79
    -> 63 per group. Two-sample t test, exact noncentral-t power (Julious, "Sample sizes for clinical trials
    with Normal data", Stat Med 2004;23:1921-1986; G*Power 3, Faul et al., Behav Res Methods
    2007;39:175-191, "t tests - means: difference between two independent means", d = 0.5: 64 per group,
    actual power 0.8015; Cohen 1988, Table 2.4.1, d = .50: 64). Checked here with scipy before asserting:
    noncentral-t power 0.7952 at 63 and 0.8015 at 64 per group.
    """
    assert sample_size_normal(5.0, 10.0, alpha=0.05, power=0.8) == 63
    assert sample_size_t(5.0, 10.0, alpha=0.05, power=0.8) == 64
    assert power_t(63, 5.0, 10.0) == pytest.approx(0.7952, abs=1e-4)
    assert power_t(64, 5.0, 10.0) == pytest.approx(0.8015, abs=1e-4)
    assert sample_size_t(-5.0, 10.0) == 64  # the sign of the effect does not matter (two-sided)


@pytest.mark.parametrize("d, power, n_normal, n_t", [
    (0.5, 0.9, 85, 86),    # G*Power: 86 per group
    (0.8, 0.8, 25, 26),    # G*Power: 26
    (0.2, 0.8, 393, 394),  # G*Power: 394
])
def test_more_published_sample_sizes(d, power, n_normal, n_t):
    """Further G*Power 3 values for the two-sided two-sample t test at alpha 0.05 (Faul et al. 2007),
    checked with scipy's noncentral t; normal-approximation values from 2 (z_.975 + z_power)^2 / d^2."""
    assert sample_size_normal(d, 1.0, power=power) == n_normal
    assert sample_size_t(d, 1.0, power=power) == n_t
    assert power_t(n_t, d, 1.0) >= power > power_t(n_t - 1, d, 1.0)


def test_sample_size_not_computable_says_why():
    with pytest.raises(NotComputable, match="SD of change is 0"):
        sample_size_normal(1.0, 0.0)
    with pytest.raises(NotComputable, match="not a finite number"):
        sample_size_t(1.0, float("nan"))
    with pytest.raises(NotComputable, match="fewer than 2"):
        sample_size_normal(1.0, None)
    with pytest.raises(NotComputable, match="effect is 0"):
        sample_size_t(0.0, 1.0)


def test_sdc_from_repeat_pairs_with_exact_sd():
    """Repeat differences -0.1, 0, 0.1 have SD exactly 0.1: SEM = 0.1 / sqrt(2), SDC = 1.96 * 0.1."""
    e = error_from_repeats([-0.1, 0.0, 0.1, np.nan])
    assert e.n_pairs == 3 and e.source == "repeat pairs"
    assert e.sd_diff == pytest.approx(0.1)
    assert e.sem == pytest.approx(0.1 / math.sqrt(2))
    assert e.sdc == pytest.approx(1.96 * math.sqrt(2) * e.sem) and e.sdc == pytest.approx(0.196)
    assert sdc_group(e.sdc, 4) == pytest.approx(0.098)
    assert error_from_repeats([0.3]) is None


def test_sdc_from_limits_of_agreement():
    """LoA -0.249 to +0.226 pp (BENCHMARKS, femoral thickness change error): half-width 0.2375 = 1.96 SD."""
    e = error_from_loa(-0.249, 0.226)
    assert e.sdc == pytest.approx(0.2375)
    assert e.sd_diff == pytest.approx(0.2375 / 1.96)
    assert e.sem == pytest.approx(0.2375 / 1.96 / math.sqrt(2))
    sym = error_from_loa(-0.196, 0.196)
    assert (sym.sd_diff, sym.sdc) == pytest.approx((0.1, 0.196))
    with pytest.raises(ValueError):
        error_from_loa(0.2, -0.2)


def _table(bml=(-4.2, 0.0, 4.2), thick=(-4.8, 0.0, 4.8), repeats=(-0.1, 0.0, 0.1)) -> pd.DataFrame:
    """Changes with SD exactly 4.2 cm3 and 4.8 pp (so -2.1 cm3 and +2.4 pp are d = 0.5), and repeat pairs
    (follow-up visit ``00m_rep``) whose BML differences have SD exactly 0.1 cm3 (no thickness value)."""
    rows = [{"subject": f"s{i}", "baseline_visit": "00m", "followup_visit": "24m", BML: b, THICK: t,
             "alignment_femur_residual": 0.4} for i, (b, t) in enumerate(zip(bml, thick))]
    rows += [{"subject": f"r{i}", "baseline_visit": "00m", "followup_visit": "00m_rep", BML: d, THICK: None,
              "alignment_femur_residual": 0.4} for i, d in enumerate(repeats)]
    return pd.DataFrame(rows)


def test_power_table_on_a_constructed_table():
    rows = {r.measure: r for r in power_table(_table(), {BML: -2.1, THICK: 2.4}, {THICK: (-0.249, 0.226)})}
    assert list(rows) == [BML, THICK]
    b, t = rows[BML], rows[THICK]
    assert b.n_knees == 3 and b.sd_change == pytest.approx(4.2) and t.sd_change == pytest.approx(4.8)
    assert b.error_source == "repeat pairs" and b.n_repeat == 3
    assert b.sdc_individual == pytest.approx(0.196) and b.sem == pytest.approx(0.1 / math.sqrt(2))
    assert t.error_source == "limits of agreement" and t.sdc_individual == pytest.approx(0.2375)
    for r in (b, t):
        assert (r.n_per_arm_normal, r.n_per_arm_t) == (63, 64)
        assert r.sdc_group_n == 64 and r.sdc_group == pytest.approx(r.sdc_individual / 8)
        assert r.power_at_n_per_arm_t == pytest.approx(0.8015, abs=1e-4)


def test_repeat_pairs_win_over_loa_and_zero_sd_is_explained():
    r = power_row(BML, [1.0, 1.0, 1.0], [-0.1, 0.0, 0.1], effect=-2.1, loa=(-1.0, 1.0))
    assert r.error_source == "repeat pairs" and r.sdc_individual == pytest.approx(0.196)
    assert r.n_per_arm_normal is None and r.n_per_arm_t is None
    assert "--loa not used" in r.note and "SD of change is 0" in r.note
    one = power_row(BML, [1.0, np.nan], [], effect=-2.1)
    assert one.sd_change is None and "fewer than 2 knees" in one.note and "no repeat pairs" in one.note


def test_short_names():
    columns = [BML, THICK, "subject"]
    assert resolve_measure("femoral_bml", columns) == BML
    assert resolve_measure("femoral_cartilage_thickness_pct", columns) == THICK
    assert resolve_measure(BML, columns) == BML
    for name in ("tibial_bml", "subject", "nonsense"):
        with pytest.raises(KeyError):
            resolve_measure(name, columns)


def test_cli_prints_sdc_and_knees_per_arm(tmp_path, capsys):
    path = tmp_path / "changes.csv"
    _table().to_csv(path, index=False)
    out = tmp_path / "out"
    assert main(["cohort-stats", str(path), "--out", str(out),
                 "--loa", "femoral_cartilage_thickness_pct=-0.249,0.226"]) == 0
    printed = capsys.readouterr().out
    assert "Knees per arm" in printed and "power 0.8, alpha 0.05 two-sided" in printed
    line = {ln.split()[0]: ln.split() for ln in printed.splitlines() if "repeats(" in ln or " LoA " in ln}
    assert line[BML][1:] == ["cm3", "3", "4.2", "repeats(3)", "0.07071", "0.196", "0.0245", "64", "-2.1", "63",
                             "64"]
    assert line[THICK][1:] == ["pp", "3", "4.8", "LoA", "0.08568", "0.2375", "0.02969", "64", "2.4", "63", "64"]
    assert "np." not in printed and "float64" not in printed
    # the existing outputs are still written, unchanged in form; the trial numbers go to new files
    assert (out / "cohort_stats.csv").read_text().startswith("measure,n,mean,sd,ci95_low,ci95_high,srm,")
    result = json.loads((out / "power.json").read_text())
    assert result["settings"]["power"] == 0.8 and result["settings"]["alpha"] == 0.05
    assert result["settings"]["effects"] == {BML: -2.1, THICK: 2.4}
    by_measure = {m["measure"]: m for m in result["measures"]}
    assert by_measure[BML]["n_per_arm_normal"] == 63 and by_measure[BML]["n_per_arm_t"] == 64
    assert by_measure[THICK]["sdc_individual"] == pytest.approx(0.2375)
    csv_text = (out / "power.csv").read_text().splitlines()
    assert csv_text[0].startswith("measure,unit,n_knees,sd_change,error_source,n_repeat,sd_error_diff,sem,"
                                  "sdc_individual,sdc_group,sdc_group_n,effect,n_per_arm_normal,n_per_arm_t")
    assert csv_text[1].startswith(f"{BML},cm3,3,4.2,repeat pairs,3,0.1,")


def test_cli_options_effect_power_alpha_group_n(tmp_path, capsys):
    path = tmp_path / "changes.csv"
    _table().to_csv(path, index=False)
    # d = 4.2 / 4.2 = 1 at 90 % power, alpha 0.01: normal 2 (2.5758 + 1.2816)^2 = 29.76 -> 30
    assert main(["cohort-stats", str(path), "--out", str(tmp_path / "o"), "--effect", "femoral_bml=4.2",
                 "--power", "0.9", "--alpha", "0.01", "--group-n", "100"]) == 0
    rows = {m["measure"]: m for m in json.loads((tmp_path / "o" / "power.json").read_text())["measures"]}
    assert rows[BML]["n_per_arm_normal"] == 30
    assert rows[BML]["n_per_arm_t"] == 32
    assert rows[BML]["sdc_group"] == pytest.approx(0.0196) and rows[BML]["sdc_group_n"] == 100
    assert rows[THICK]["effect"] is None and rows[THICK]["n_per_arm_t"] is None  # --effect replaced defaults


def test_cli_repeat_file_visits_and_notes(tmp_path, capsys):
    table = _table(repeats=())
    extra = pd.DataFrame({"subject": ["s0"], "baseline_visit": ["00m"], "followup_visit": ["12m"],
                          BML: [100.0], THICK: [100.0]})
    pd.concat([table, extra]).to_csv(tmp_path / "changes.csv", index=False)
    pd.DataFrame({"subject": ["a", "b", "c"], BML: [-0.1, 0.0, 0.1]}).to_csv(tmp_path / "rep.csv", index=False)
    args = ["cohort-stats", str(tmp_path / "changes.csv"), "--repeat", str(tmp_path / "rep.csv")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "several visit pairs for 1 knee(s)" in printed and "--visits" in printed
    assert main(args + ["--visits", "00m:24m", "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "several visit pairs" not in printed
    rows = {m["measure"]: m for m in json.loads((tmp_path / "o" / "power.json").read_text())["measures"]}
    assert rows[BML]["sd_change"] == pytest.approx(4.2) and rows[BML]["n_per_arm_t"] == 64
    assert rows[BML]["error_source"] == "repeat pairs" and rows[BML]["sdc_individual"] == pytest.approx(0.196)
    stats = json.loads((tmp_path / "o" / "cohort_stats.json").read_text())["measures"]
    assert stats[0]["n"] == 3 and stats[0]["sdc"] == pytest.approx(0.196)


def test_cli_default_effect_for_an_absent_measure_is_skipped(tmp_path, capsys):
    path = tmp_path / "changes.csv"
    _table().drop(columns=[THICK]).to_csv(path, index=False)
    assert main(["cohort-stats", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"default effect {THICK}=2.4 not used" in printed


def test_cli_sd_zero_says_why(tmp_path, capsys):
    path = tmp_path / "changes.csv"
    _table(bml=(1.0, 1.0, 1.0)).to_csv(path, index=False)
    assert main(["cohort-stats", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"note: {BML}: knees per arm not computable: SD of change is 0" in printed


@pytest.mark.parametrize("extra, in_message, names_file", [
    (["--effect", "tibial_bml=-1"], "--effect tibial_bml: measure tibial_bml (bml_tibia_delta_cm3) is not in the table",
     True),
    (["--loa", "bml_patella_delta_cm3=-1,1"], "bml_patella_delta_cm3", True),
    (["--effect", "femoral_bml"], "expected MEASURE=VALUE", False),
    (["--effect", "femoral_bml=abc"], "is not a finite number", False),
    (["--loa", "femoral_bml=0.1,-0.1"], "low limit must be below", False),
    (["--loa", "femoral_bml=0.1"], "expected LOW,HIGH", False),
    (["--power", "1.5"], "--power must lie between 0 and 1", False),
    (["--alpha", "0"], "--alpha must lie between 0 and 1", False),
    (["--visits", "00m:12m"], "no rows with baseline_visit 00m and followup_visit 12m", True),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, extra, in_message, names_file):
    path = tmp_path / "changes.csv"
    _table().to_csv(path, index=False)
    out = tmp_path / "out"
    assert main(["cohort-stats", str(path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and in_message in err
    assert (str(path) in err) == names_file
    assert not out.exists()  # nothing written


def test_cli_missing_repeat_file_exits_2(tmp_path, capsys):
    path = tmp_path / "changes.csv"
    _table().to_csv(path, index=False)
    assert main(["cohort-stats", str(path), "--repeat", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv: file not found" in capsys.readouterr().err
