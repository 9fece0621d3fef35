"""Change over time: the interval between acquisition dates and changes per year; percent change of a
near-zero BML baseline is withheld, not reported as a number."""

from __future__ import annotations

from pathlib import Path

import pytest

from bml_pipeline.cli import main
from bml_pipeline.longitudinal.runs import with_rates


def test_rates_per_year_from_the_interval() -> None:
    change = {"bml": {"femur": {"delta_cm3": -2.1}}, "cartilage": {"femoral_cartilage": {"delta_mm": 0.1,
                                                                                        "delta_percent": 2.4}}}
    out = with_rates(change, "2020-01-01", "2022-01-01")
    assert out["interval_days"] == 731
    assert out["bml"]["femur"]["delta_cm3_per_year"] == pytest.approx(-2.1 / (731 / 365.25), abs=1e-6)
    assert out["cartilage"]["femoral_cartilage"]["delta_percent_per_year"] == pytest.approx(2.4 * 365.25 / 731,
                                                                                          abs=1e-6)
    unknown = with_rates(change, None, "2022-01-01")
    assert unknown["interval_days"] is None and unknown["bml"]["femur"]["delta_cm3_per_year"] is None


def test_percent_of_a_near_zero_baseline_is_withheld() -> None:
    from bml_pipeline.longitudinal.change import Change, ChangeConfig

    change = Change(side="right", bml={"tibia": (0.05, 0.2), "femur": (3.0, 0.9)}, bml_subregions={}, lesions={},
                    cartilage={}, alignment={}, forced=False, mismatch=None, config=ChangeConfig(), sources={})
    d = change.to_dict()
    assert d["bml"]["tibia"]["delta_cm3"] == pytest.approx(0.15) and d["bml"]["tibia"]["delta_percent"] is None
    assert "below 0.5 cm3" in d["bml"]["tibia"]["percent_withheld"]
    assert d["bml"]["femur"]["delta_percent"] == pytest.approx(-70.0)


def test_cli_records_dates_and_refuses_a_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    labels = Path(__file__).resolve().parents[1] / "sample_data" / "phantom01" / "00m" / "labels.nii.gz"
    assert main(["-q", "run", "--labels", str(labels), "--side", "right", "--date", "20200105", "--no-report",
                 "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "provenance.json").read_text())["acquisition_date"] == "2020-01-05"
    capsys.readouterr()
    assert main(["run", "--labels", str(labels), "--date", "5 Jan", "--out", str(tmp_path / "b")]) == 2
    assert "acquisition date '5 Jan' is not YYYY-MM-DD" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
