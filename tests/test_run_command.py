"""``bml-pipeline run``: one scan end to end on the sample phantom, checked against its truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bml_pipeline.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "phantom01" / "00m"


def test_run_with_labels_measures_the_sample_knee(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["-q", "run", "--labels", str(SAMPLE / "labels.nii.gz"), str(SAMPLE / "image.nii.gz"),
                 "--side", "right", "--out", str(out), "--no-report"]) == 0
    truth = json.loads((SAMPLE / "truth.json").read_text())
    measured = json.loads((out / "measurements.json").read_text())
    assert measured["side"] == "right"
    for bone in ("femur", "tibia"):
        assert measured["bml"][bone]["volume_cm3"] == pytest.approx(truth["bml"][bone], abs=0.01)
    assert "BML total (cm3)" in capsys.readouterr().out
    assert not (out / "labels.nii.gz").exists()  # given labels are not copied


def test_run_without_inputs_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["run", "--out", str(tmp_path / "x")]) == 2
    assert "give an IMAGE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
