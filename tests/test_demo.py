"""``bml-pipeline demo``: the whole job on the embedded sample knee recovers its injected change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bml_pipeline.cli import main


def test_demo_recovers_the_injected_change(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "change 00m -> 12m" in printed and "OUT OF TOLERANCE" not in printed and "-0.000" not in printed
    change = json.loads((out / "phantom01" / "changes" / "00m_to_12m" / "change.json").read_text())
    truth = json.loads(Path(__file__).resolve().parents[1].joinpath(
        "sample_data", "phantom01", "12m", "truth.json").read_text())["change"]
    assert change["bml"]["femur"]["delta_cm3"] == pytest.approx(truth["bml"]["femur"]["delta_cm3"], abs=0.05)
    assert change["cartilage"]["femoral_cartilage"]["delta_percent"] == pytest.approx(
        truth["cartilage"]["femoral_cartilage"]["delta_percent"], abs=0.3)
    for name in ("cohort.csv", "changes.csv", "errors.csv", "cohort_report.html"):
        assert (out / name).is_file()
    assert (out / "phantom01" / "12m" / "report.html").is_file()


def test_demo_lines_compare_like_with_like_with_units_and_tolerances() -> None:
    from bml_pipeline.commands.demo import _row, _signed

    assert _signed(-0.0001) == "+0.000" and _signed(-0.0123) == "-0.012"
    line = _row("femoral cartilage thickness change", 2.532, 2.4, "%", 0.3, error_unit="pp")
    assert "error +0.132 pp" in line and "tolerance +-0.3 pp: ok" in line
    assert "OUT OF TOLERANCE" in _row("BML femur change", -2.0, -2.1, "cm3", 0.05)
