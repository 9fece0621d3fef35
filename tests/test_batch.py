"""Batch machinery: failure isolation, resume after SIGKILL, executors, cohort tables.

The per-scan job here is a small test-only stand-in (label voxel volumes in mm3) so these tests exercise
the batch machinery quickly and independently of the measurement stage.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bml_pipeline.batch import (
    BatchSettings,
    BatchSummary,
    DaskExecutor,
    LocalExecutor,
    ScanSpec,
    load_manifest,
    run_batch,
)
from bml_pipeline.batch.changes import visit_pairs
from bml_pipeline.batch.executors import WORKER_DIED
from bml_pipeline.batch.store import MARKER_NAME
from bml_pipeline.batch.worker import ScanTask, run_task
from bml_pipeline.errors import InputError
from bml_pipeline.io import read_labels, write_nifti, write_text_atomic
from bml_pipeline.volume import Volume

AFFINE = np.diag([0.7, 0.3646, 0.3646, 1.0])
NO_REPORT = BatchSettings(report=False)


def volume_scan(spec: ScanSpec, run_dir: Path, settings: BatchSettings, provenance: dict[str, Any]) -> dict:
    """Test stand-in for the pipeline: label volumes in mm3; a map without femur is 'no bone found'."""
    delay = float(os.environ.get("BML_TEST_SCAN_DELAY", "0"))
    time.sleep(delay)
    labels = read_labels(spec.labels)
    counts = np.bincount(labels.array.ravel(), minlength=10)
    if counts[1] == 0:
        raise InputError(spec.labels, "no bone found (femur label 1 is empty)")
    row = {f"label{i}_mm3": round(float(counts[i] * labels.voxel_volume_mm3), 6) for i in range(1, 10)}
    write_text_atomic(run_dir / "measurements.json", json.dumps({"provenance": provenance, "row": row}))
    return row


def volume_change(baseline: ScanSpec, baseline_dir: Path, followup: ScanSpec, followup_dir: Path,
                  settings: BatchSettings) -> dict:
    """Test stand-in for the change job: change of the label-7 volume (as BML total, in cm3)."""
    if followup.key == ("s2", "36m"):
        raise InputError(followup.labels, "not the same knee")
    volumes = [json.loads((d / MARKER_NAME).read_text())["row"]["label7_mm3"] / 1000
               for d in (baseline_dir, followup_dir)]
    return {"side": baseline.side, "bml": {"total": {"baseline_cm3": volumes[0], "followup_cm3": volumes[1],
                                                     "delta_cm3": round(volumes[1] - volumes[0], 6)}}}


FAKE: dict[str, Any] = {"scan_fn": volume_scan, "pair_fn": volume_change, "settings": NO_REPORT}


def _phantom(path: Path, seed: int, femur: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 10, size=(12, 16, 16)).astype(np.uint16)
    if not femur:
        array[array == 1] = 0
    write_nifti(Volume(array, AFFINE), path)
    return path


def _cohort(tmp_path: Path, n_subjects: int = 3) -> Path:
    """Labels for n subjects x 2 visits and a manifest; returns the manifest path."""
    data = tmp_path / "data"
    data.mkdir()
    lines = ["subject,visit,labels,side"]
    for s in range(n_subjects):
        for v, visit in enumerate(("00m", "36m")):
            _phantom(data / f"s{s}_{visit}.nii.gz", seed=10 * s + v)
            lines.append(f"s{s},{visit},data/s{s}_{visit}.nii.gz,{'left' if s % 2 else 'right'}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "manifest.csv"


def test_failure_isolation(tmp_path: Path) -> None:
    manifest = _cohort(tmp_path)
    data = tmp_path / "data"
    (data / "s0_36m.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")          # corrupt file
    _phantom(data / "s1_00m.nii.gz", seed=99, femur=False)                   # no bone found
    summary = run_batch(load_manifest(manifest), tmp_path / "out", LocalExecutor(2), **FAKE)

    assert (summary.done, summary.skipped, summary.pairs_done, summary.failed, summary.exit_code) == (4, 0, 0, 3, 3)
    with (tmp_path / "out" / "errors.csv").open(newline="") as fh:
        errors = list(csv.reader(fh))
    assert errors[0] == ["subject", "visit", "stage", "error"]
    assert errors[1][:3] == ["s0", "36m", "scan"]
    assert errors[1][3].startswith(f"{data / 's0_36m.nii.gz'}: file is truncated or corrupt")
    assert errors[2] == ["s1", "00m", "scan", f"{data / 's1_00m.nii.gz'}: no bone found (femur label 1 is empty)"]
    assert errors[3] == ["s2", "00m->36m", "change", f"{data / 's2_36m.nii.gz'}: not the same knee"]
    assert len(errors) == 4
    assert (tmp_path / "out" / "changes.csv").read_text() == "subject,baseline_visit,followup_visit\n"
    cohort = (tmp_path / "out" / "cohort.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in cohort[1:]] == [["s0", "00m"], ["s1", "36m"], ["s2", "00m"],
                                                            ["s2", "36m"]]
    failed_dir = tmp_path / "out" / "s1" / "00m"
    assert not (failed_dir / MARKER_NAME).exists() and not (failed_dir / "measurements.json").exists()
    assert "no bone found" in (failed_dir / "scan.log").read_text()
    log = (tmp_path / "out" / "s2" / "00m" / "scan.log").read_text()
    assert "scan s2 00m" in log and "finished" in log


def test_resume_recomputes_only_changed_or_unfinished(tmp_path: Path) -> None:
    manifest = _cohort(tmp_path, n_subjects=2)
    scans, out = load_manifest(manifest), tmp_path / "out"
    run_batch(scans, out, LocalExecutor(0), **FAKE)
    _phantom(tmp_path / "data" / "s0_36m.nii.gz", seed=1234)        # input changed
    (out / "s1" / "00m" / MARKER_NAME).unlink()                       # unfinished
    seen: dict[tuple[str, str], str] = {}
    summary = run_batch(scans, out, LocalExecutor(0), resume=True, **FAKE,
                        on_outcome=lambda o: seen.__setitem__((o.subject, o.visit), o.status))
    # s1 00m is recomputed from unchanged inputs, so its results and its pair stay valid
    assert seen == {("s0", "00m"): "skipped", ("s0", "36m"): "done", ("s1", "00m"): "done",
                    ("s1", "36m"): "skipped", ("s0", "00m->36m"): "done", ("s1", "00m->36m"): "skipped"}
    assert (summary.done, summary.skipped, summary.pairs_done, summary.pairs_skipped) == (2, 2, 1, 1)
    seen.clear()
    run_batch(scans, out, LocalExecutor(0), resume=True, **FAKE,
              on_outcome=lambda o: seen.__setitem__((o.subject, o.visit), o.status))
    assert set(seen.values()) == {"skipped"} and len(seen) == 6


def test_settings_change_invalidates_marker(tmp_path: Path) -> None:
    manifest = _cohort(tmp_path, n_subjects=1)
    spec = load_manifest(manifest)[0]
    task = ScanTask(spec, tmp_path / "run", BatchSettings(), resume=True, scan_fn=volume_scan)
    assert run_task(task).status == "done"
    assert run_task(task).status == "skipped"
    assert run_task(ScanTask(spec, tmp_path / "run", BatchSettings(schema="other"), True, volume_scan)).status == "done"


@pytest.mark.slow
def test_worker_death_is_recorded_not_fatal(tmp_path: Path) -> None:
    manifest = _cohort(tmp_path, n_subjects=2)
    scans = load_manifest(manifest)[:3]
    summary = run_batch(scans, tmp_path / "out", LocalExecutor(2), scan_fn=dying_scan, pair_fn=volume_change,
                        settings=NO_REPORT)
    assert summary.failures == [("s0", "36m", "scan", WORKER_DIED)]
    assert summary.done == 2


def dying_scan(spec: ScanSpec, run_dir: Path, settings: BatchSettings, provenance: dict[str, Any]) -> dict:
    """Test stand-in whose worker process is killed on one scan (as by the OOM killer)."""
    if spec.key == ("s0", "36m"):
        os.kill(os.getpid(), signal.SIGKILL)
    return volume_scan(spec, run_dir, settings, provenance)


@pytest.mark.slow
def test_dask_executor_matches_local(tmp_path: Path) -> None:
    manifest = _cohort(tmp_path, n_subjects=2)
    scans = load_manifest(manifest)
    local = run_batch(scans, tmp_path / "local", LocalExecutor(1), **FAKE)
    dask = run_batch(scans, tmp_path / "dask", DaskExecutor(workers=1), **FAKE)
    assert local.done == dask.done == 4
    for name in ("cohort.csv", "changes.csv", "errors.csv"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()


_RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from test_batch import volume_change, volume_scan
from bml_pipeline.batch import BatchSettings, LocalExecutor, load_manifest, run_batch
summary = run_batch(load_manifest({manifest!r}), {out!r}, LocalExecutor(1), BatchSettings(report=False),
                    resume={resume}, scan_fn=volume_scan, pair_fn=volume_change,
                    on_outcome=lambda o: print(o.subject, o.visit, o.status, flush=True))
sys.exit(summary.exit_code)
"""


def _batch_process(manifest: Path, out: Path, resume: bool) -> subprocess.Popen:
    code = _RUNNER.format(tests=str(Path(__file__).parent), manifest=str(manifest), out=str(out), resume=resume)
    env = {**os.environ, "BML_TEST_SCAN_DELAY": "0.2"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def check_clean_run(summary: BatchSummary, straight: Path, data: Path) -> None:
    """Tables of a batch of 2 subjects x 2 visits without failures."""
    assert (summary.done, summary.pairs_done, summary.failed, summary.exit_code) == (4, 2, 0, 0)
    assert (straight / "errors.csv").read_text() == "subject,visit,stage,error\n"
    import pandas as pd

    cohort = pd.read_csv(straight / "cohort.csv", dtype={"visit": str})
    parquet = pd.read_parquet(straight / "cohort.parquet")
    pd.testing.assert_frame_equal(cohort, parquet)
    expected = float(np.sum(read_labels(data / "s1_36m.nii.gz").array == 4)) * 0.7 * 0.3646 ** 2
    assert cohort.loc[3, "label4_mm3"] == pytest.approx(expected, abs=1e-6)
    changes = pd.read_csv(straight / "changes.csv", dtype={"baseline_visit": str, "followup_visit": str})
    assert changes[["subject", "baseline_visit", "followup_visit"]].values.tolist() == [["s0", "00m", "36m"],
                                                                                       ["s1", "00m", "36m"]]
    delta = (cohort.loc[3, "label7_mm3"] - cohort.loc[2, "label7_mm3"]) / 1000
    assert changes.loc[1, "bml_total_delta_cm3"] == pytest.approx(delta, abs=1e-6)
    assert (straight / "s1" / "changes" / "00m_to_36m" / "change.json").exists()
    stats = json.loads((straight / "cohort_stats.json").read_text())["measures"]
    assert [(m["measure"], m["n"]) for m in stats] == [("bml_total_delta_cm3", 2), ("bml_total_delta_percent", 0)]
    assert stats[0]["mean"] == pytest.approx(changes["bml_total_delta_cm3"].mean(), abs=1e-6)


def test_kill9_then_resume_gives_identical_tables(tmp_path: Path) -> None:
    """Uninterrupted reference run; then a run killed (SIGKILL) after its first scan, resumed: only the
    unfinished scans are recomputed and every table is byte-identical to the reference."""
    manifest = _cohort(tmp_path, n_subjects=2)
    summary = run_batch(load_manifest(manifest), tmp_path / "straight", LocalExecutor(0), **FAKE)
    check_clean_run(summary, tmp_path / "straight", tmp_path / "data")

    out = tmp_path / "killed"
    proc = _batch_process(manifest, out, resume=False)
    deadline = time.monotonic() + 60
    while not list(out.glob(f"*/*/{MARKER_NAME}")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                                     # parent and its worker
    proc.wait()
    finished = {tuple(p.parent.relative_to(out).parts) for p in out.glob(f"*/*/{MARKER_NAME}")}
    assert 1 <= len(finished) < 4 and not (out / "cohort.csv").exists()

    resumed = _batch_process(manifest, out, resume=True)
    stdout, _ = resumed.communicate(timeout=60)
    assert resumed.returncode == 0
    statuses = {tuple(line.split()[:2]): line.split()[2] for line in stdout.splitlines()}
    assert {k for k, v in statuses.items() if v == "skipped"} == finished
    scans = {(f"s{s}", v) for s in range(2) for v in ("00m", "36m")}
    pairs = {("s0", "00m->36m"), ("s1", "00m->36m")}
    assert {k for k, v in statuses.items() if v == "done"} == (scans - finished) | pairs
    for name in ("cohort.csv", "cohort.parquet", "changes.csv", "errors.csv", "cohort_stats.csv"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_visit_pairs_consecutive_and_baseline_to_last() -> None:
    specs = [ScanSpec("a", v, labels=Path("x")) for v in ("96m", "00m", "12m")] + [ScanSpec("b", "00m"),
                                                                                   ScanSpec("c", "00m"),
                                                                                   ScanSpec("c", "V2")]
    pairs = [(a.subject, a.visit, b.visit, consecutive) for a, b, consecutive in visit_pairs(specs)]
    assert pairs == [("a", "00m", "12m", True), ("a", "12m", "96m", True), ("a", "00m", "96m", False),
                     ("c", "00m", "V2", True)]


@pytest.mark.slow
def test_dask_model_preloader_and_missing_model(tmp_path: Path) -> None:
    """A row without labels registers the model-preloading worker plugin; with no such model the scan
    fails with the clear reason and the batch finishes."""
    image = _phantom(tmp_path / "image.nii.gz", seed=3)
    scans = [ScanSpec("s0", "00m", image=image, model="no_such_model")]
    summary = run_batch(scans, tmp_path / "out", DaskExecutor(workers=1), NO_REPORT)
    assert [(f[0], f[1], f[2]) for f in summary.failures] == [("s0", "00m", "scan")]
    assert "no labels and no segmentation model available" in summary.failures[0][3]
