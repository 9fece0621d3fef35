"""No silent wrong numbers at the command line: stale outputs, moved inputs, side conflicts, a prior of
another knee, bad destinations (docs/reliability.md lists each case and its test). Fixtures are phantom
knees made at test time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bml_pipeline.cli import main
from bml_pipeline.io import write_nifti
from bml_pipeline.synth.phantom import KneeSpec, make_phantom
from bml_pipeline.volume import Volume


@pytest.fixture(scope="module")
def knee_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A right phantom knee (label map) at 0.8 mm."""
    path = tmp_path_factory.mktemp("knee") / "knee.nii.gz"
    write_nifti(make_phantom(KneeSpec(side="right"), spacing=(0.8, 0.8, 0.8)).labels, path)
    return path


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_existing_run_folder_is_refused_then_replaced_whole_with_force(knee_file: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["-q", "measure", str(knee_file), "--out", str(out)]) == 0
    stale = out / "labels.nii.gz"  # as if an earlier `run` had segmented into this folder
    stale.write_bytes(b"old automatic labels")
    (out / "report.html").write_text("old report")
    before = (out / "measurements.json").read_text()
    capsys.readouterr()
    assert main(["-q", "measure", str(knee_file), "--out", str(out)]) == 2
    assert "already holds a run; pass --force" in _one_line(capsys)
    assert stale.exists() and (out / "measurements.json").read_text() == before
    assert main(["-q", "measure", str(knee_file), "--out", str(out), "--force"]) == 0
    assert not stale.exists() and not (out / "report.html").exists()  # nothing stale survives
    assert not list(tmp_path.glob(".run.partial-*"))


def test_foreign_folder_and_file_destinations_refused_before_work(knee_file: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    for extra in ([], ["--force"]):
        assert main(["-q", "measure", str(knee_file), "--out", str(foreign), *extra]) == 2
        assert "not empty and is not a bml-pipeline run" in _one_line(capsys)
    assert sorted(p.name for p in foreign.iterdir()) == ["chapter1.tex"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for command in (["measure", str(knee_file)], ["run", "--labels", str(knee_file)]):
        assert main(["-q", *command, "--out", str(a_file)]) == 2
        assert f"{a_file}: output path is a file" in _one_line(capsys)


def test_relative_input_is_reloaded_from_where_it_was_and_must_be_unchanged(knee_file: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from bml_pipeline.report.rundir import load_run

    first = tmp_path / "first"
    first.mkdir()
    (first / "labels.nii.gz").write_bytes(knee_file.read_bytes())
    monkeypatch.chdir(first)
    assert main(["-q", "measure", "labels.nii.gz", "--out", str(tmp_path / "run")]) == 0
    recorded = json.loads((tmp_path / "run" / "provenance.json").read_text())["inputs"]["labels"]["path"]
    assert recorded == str(first / "labels.nii.gz")
    # From another folder holding a different file of the same relative name, the run still loads its own.
    other = tmp_path / "other"
    other.mkdir()
    arr = np.asarray(load_run(tmp_path / "run").labels.array).copy()
    monkeypatch.chdir(other)
    write_nifti(Volume(np.zeros_like(arr), load_run(tmp_path / "run").labels.affine), other / "labels.nii.gz")
    assert np.array_equal(load_run(tmp_path / "run").labels.array, arr)
    # The measured file itself changed: refused, naming it.
    arr[arr == 7] = 1
    write_nifti(Volume(arr, load_run(tmp_path / "run").labels.affine), first / "labels.nii.gz")
    capsys.readouterr()
    code = main(["longitudinal", "--baseline", str(tmp_path / "run"), "--followup", str(tmp_path / "run"),
                 "--out", str(tmp_path / "change")])
    assert code == 2
    assert "labels.nii.gz: file changed since the run measured it" in _one_line(capsys)
    assert not (tmp_path / "change").exists()


def test_side_given_against_confident_anatomy_is_flagged(oai_labels_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A real right knee (the phantom is symmetric: its anatomy cannot tell) measured as a left one."""
    knee = oai_labels_dir / "akoa_9031930_00m_labels.nii.gz"
    out = tmp_path / "run"
    assert main(["-q", "run", "--labels", str(knee), "--side", "left", "--out", str(out)]) == 0
    line = _one_line(capsys)
    assert line.startswith(f"warning: {knee}: QC warn:") and "says left but the anatomy says right" in line
    m = json.loads((out / "measurements.json").read_text())
    assert m["side"] == "left" and "anatomy says right" in m["side_conflict"]
    assert m["qc"]["status"] == "warn"
    assert "says left but the anatomy says right" in (out / "report.html").read_text()
    row = (out / "measurements.csv").read_text().splitlines()
    assert dict(zip(row[0].split(","), row[1].split(",")))["qc_status"] == "warn"


def test_report_refuses_a_prior_of_the_other_knee_and_a_foreign_change_file(knee_file: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    right, left = tmp_path / "right", tmp_path / "left"
    assert main(["-q", "measure", str(knee_file), "--side", "right", "--out", str(right)]) == 0
    mirrored = tmp_path / "mirrored.nii.gz"
    write_nifti(make_phantom(KneeSpec(side="left"), spacing=(0.8, 0.8, 0.8)).labels, mirrored)
    assert main(["-q", "measure", str(mirrored), "--side", "left", "--out", str(left)]) == 0
    capsys.readouterr()
    assert main(["report", str(right), "--prior", str(left)]) == 2
    assert "prior visit is not the same knee: its side is 'left', this run's is 'right'" in _one_line(capsys)
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"hello": "world"}))
    assert main(["report", str(right), "--change", str(bogus)]) == 2
    assert "not a change.json of `bml-pipeline longitudinal`" in _one_line(capsys)
    assert main(["report", str(right), "--change", str(tmp_path / "absent.json")]) == 2
    assert _one_line(capsys).endswith("absent.json: change file not found")


def test_unknown_device_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "image.nii.gz"
    write_nifti(Volume(np.ones((8, 8, 8), np.float32), np.eye(4)), image)
    assert main(["run", str(image), "--out", str(tmp_path / "o"), "--device", "tpu"]) == 2
    assert "unknown device 'tpu' (auto, cpu, cuda or cuda:N)" in _one_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: permissions cannot be tested as root")
def test_unwritable_destination_refused_before_work(knee_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    assert main(["-q", "measure", str(knee_file), "--out", str(locked / "run")]) == 2
    assert "cannot be written" in _one_line(capsys)
