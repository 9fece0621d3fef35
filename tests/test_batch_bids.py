"""The batch's BIDS-derivatives-like layout: sub-<id>/ses-<visit>/ run folders, changes beside them,
dataset_description.json, and labels BIDS can hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bml_pipeline.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_bids_layout_on_the_sample_knee(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject,visit,labels,side\n"
                        f"phantom01,00m,{SAMPLE}/phantom01/00m/labels.nii.gz,right\n"
                        f"phantom01,12m,{SAMPLE}/phantom01/12m/labels.nii.gz,right\n")
    out = tmp_path / "out"
    assert main(["-q", "batch", str(manifest), "--out", str(out), "--workers", "0", "--layout", "bids",
                 "--no-progress"]) == 0
    assert (out / "sub-phantom01" / "ses-00m" / "measurements.json").is_file()
    change = json.loads((out / "sub-phantom01" / "changes" / "ses-00m_to_ses-12m" / "change.json").read_text())
    assert change["bml"]["femur"]["delta_cm3"] == pytest.approx(-2.1, abs=0.05)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "bml-pipeline"
    assert 'href="sub-phantom01/ses-12m/report.html"' in (out / "cohort_report.html").read_text()


def test_bids_layout_refuses_labels_it_cannot_hold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"subject,visit,labels\nknee_1,00m,{SAMPLE}/phantom01/00m/labels.nii.gz\n")
    assert main(["batch", str(manifest), "--out", str(tmp_path / "out"), "--layout", "bids"]) == 2
    assert "letters and digits only; not 'knee_1'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
