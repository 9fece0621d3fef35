"""The per-scan job and the ``batch`` command on small crops of real label maps."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bml_pipeline.errors import InputError
from bml_pipeline.io import read_labels, write_nifti
from bml_pipeline.pipeline import NO_MODEL, process_scan
from bml_pipeline.volume import Volume, bounding_box

MAPS = ("akoa_9031930_00m", "zib_9002430")


def small_map(source: Path, target: Path) -> Path:
    """The knee region of a real label map (cartilage and lesions + 6 voxels) at half resolution."""
    labels = read_labels(source)
    crop = labels.crop(bounding_box(np.isin(labels.array, [2, 4, 6, 7, 8, 9]), margin=6))
    affine = crop.affine.copy()
    affine[:3, :3] *= 2
    write_nifti(Volume(np.ascontiguousarray(crop.array[::2, ::2, ::2]), affine), target)
    return target


@pytest.fixture(scope="module")
def small_maps(oai_labels_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("small_maps")
    return {name: small_map(oai_labels_dir / f"{name}_labels.nii.gz", folder / f"{name}.nii.gz") for name in MAPS}


def test_process_scan_writes_run_dir(small_maps: dict[str, Path], tmp_path: Path) -> None:
    labels_path = small_maps["zib_9002430"]
    result = process_scan(tmp_path / "run", labels=labels_path, side="right", report=False,
                          extra_provenance={"batch": {"subject": "x"}})
    assert not result.segmented and result.run_dir == tmp_path / "run"
    measurements = json.loads((tmp_path / "run" / "measurements.json").read_text())
    assert measurements["side"] == "right" and result.row["side"] == "right"
    assert result.row["bml.total_volume_cm3"] == measurements["bml"]["total_volume_cm3"]
    femur_voxels = int(np.sum(np.isin(read_labels(labels_path).array, (1, 7))))
    assert measurements["structures"]["femur"]["volume_cm3"] == pytest.approx(
        femur_voxels * abs(np.linalg.det(read_labels(labels_path).affine[:3, :3])) / 1000, rel=1e-6)
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["inputs"]["labels"]["path"] == str(labels_path)
    assert provenance["batch"] == {"subject": "x"} and provenance["model"] is None
    assert not (tmp_path / "run" / "labels.nii.gz").exists()


def test_no_labels_and_no_model_fails_clearly(small_maps: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match=NO_MODEL):
        process_scan(tmp_path / "run", image=small_maps["zib_9002430"], model="no_such_model", report=False)
    with pytest.raises(InputError, match="neither an image nor a label map"):
        process_scan(tmp_path / "run")


def test_batch_command_end_to_end(small_maps: dict[str, Path], tmp_path: Path) -> None:
    """Two good single-visit knees, one corrupt file: exit 3, both measured, the failure recorded."""
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti file")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject,visit,labels,side\n"
                        f"9031930,00m,{small_maps['akoa_9031930_00m']},right\n"
                        f"9002430,00m,{small_maps['zib_9002430']},\n"
                        "bad,00m,corrupt.nii.gz,left\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bml_pipeline", "batch", str(manifest), "--out", str(out),
                           "--workers", "1", "--no-progress"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 3, proc.stderr
    with (out / "errors.csv").open(newline="") as fh:
        errors = list(csv.DictReader(fh))
    assert [(e["subject"], e["visit"], e["stage"]) for e in errors] == [("bad", "00m", "scan")]
    assert errors[0]["error"].startswith(f"{corrupt}: ")
    with (out / "cohort.csv").open(newline="") as fh:
        cohort = list(csv.DictReader(fh))
    assert [(r["subject"], r["visit"]) for r in cohort] == [("9002430", "00m"), ("9031930", "00m")]
    measured = json.loads((out / "9031930" / "00m" / "measurements.json").read_text())
    assert float(cohort[1]["bml.total_volume_cm3"]) == measured["bml"]["total_volume_cm3"]
    for name in ("cohort.parquet", "changes.csv", "cohort_report.html", "9031930/00m/report.html",
                 "9031930/00m/scan.log", "bad/00m/scan.log"):
        assert (out / name).exists(), name
    assert "failed bml-pipeline" not in proc.stderr


def test_bad_manifest_cannot_start(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,visit,labels,extra\na,00m,missing.nii.gz,1\n")
    proc = subprocess.run([sys.executable, "-m", "bml_pipeline", "batch", str(manifest), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"bml-pipeline: error: {manifest}: unknown columns ['extra'] "
                                                    "(known: ['subject', 'visit', 'image', 'labels', 'side', "
                                                    "'model', 'series', 'date'])")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_batch_command_kill9_and_resume(oai_labels_dir: Path, tmp_path: Path) -> None:
    """The real command, killed with SIGKILL after its first scan and resumed, ends with the tables of an
    uninterrupted run; finished scans keep their outputs untouched."""
    import os
    import signal
    import time

    names = sorted(p.name for p in oai_labels_dir.glob("zib_*_labels.nii.gz"))[:4]
    lines = ["subject,visit,labels"]
    for name in names:
        small_map(oai_labels_dir / name, tmp_path / name)
        lines.append(f"{name.split('_')[1]},00m,{name}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")

    def batch(out: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "bml_pipeline", "batch", str(manifest), "--out", str(out),
                                 "--workers", "1", "--no-progress", "--no-report", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    assert batch(tmp_path / "straight").wait(timeout=600) == 0
    out = tmp_path / "killed"
    proc = batch(out)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/*/done.json")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/*/done.json")}
    assert 1 <= len(finished) < len(names)
    resumed = batch(out, "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert f"scans {len(names) - len(finished)} done, {len(finished)} already finished" in stderr
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())
    for name in ("cohort.csv", "cohort.parquet", "changes.csv", "errors.csv"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
