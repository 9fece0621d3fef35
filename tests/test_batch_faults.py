"""Batch faults: stopping on SIGTERM/SIGINT, resuming after it, outputs lost after they finished, an
unfinished visit-pair stage, and plain numbers in error messages.

The batch runs the real command (``python -m bml_pipeline batch``) measure-only on small phantom label
maps made here (2 subjects x 2 visits), with reports on, so the visit-pair stage also re-renders each
follow-up's report with its prior visit.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from bml_pipeline.batch import BatchSettings, LocalExecutor, ScanSpec, run_batch
from bml_pipeline.batch.store import MARKER_NAME, output_checksums, stale_outputs, update_outputs
from bml_pipeline.batch.worker import error_line
from bml_pipeline.errors import InputError

SCANS = [(f"s{s}", visit) for s in range(2) for visit in ("00m", "12m")]
TABLES = ("cohort.csv", "cohort.parquet", "changes.csv", "errors.csv", "cohort_stats.csv", "cohort_stats.json")
PRIOR_SECTION = "Change since the prior visit"  # in a follow-up report rendered with its prior visit


# ---- fixtures and helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom knees, 2 subjects x 2 visits (the follow-up slightly moved), and their manifest."""
    from bml_pipeline.io import write_nifti
    from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom

    folder = tmp_path_factory.mktemp("faults_data")
    lines = ["subject,visit,labels,side"]
    for s in range(2):
        side = "left" if s % 2 else "right"
        for v, visit in enumerate(("00m", "12m")):
            spec = KneeSpec(side=side, pose=Pose((float(s), 0.0, float(v)), (0.0, 0.0, 2.0 * v)))
            write_nifti(make_phantom(spec, spacing=(1.2, 1.2, 1.2)).labels, folder / f"s{s}_{visit}.nii.gz")
            lines.append(f"s{s},{visit},s{s}_{visit}.nii.gz,{side}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def _batch(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``bml-pipeline batch`` in its own session (process group); stderr goes to ``<out>.stderr``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stderr = (out.parent / f"{out.name}{'-resume' if '--resume' in extra else ''}.stderr").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "bml_pipeline", "batch", str(manifest), "--out", str(out),
                             "--workers", "2", "--no-progress", *extra],
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stderr_path = Path(stderr.name)  # type: ignore[attr-defined]
    stderr.close()
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    return proc.stderr_path.read_text()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def straight(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of an uninterrupted batch (the reference)."""
    out = tmp_path_factory.mktemp("faults_straight") / "out"
    proc = _batch(manifest, out)
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    for subject in ("s0", "s1"):
        assert PRIOR_SECTION in (out / subject / "12m" / "report.html").read_text(encoding="utf-8")
        assert PRIOR_SECTION not in (out / subject / "00m" / "report.html").read_text(encoding="utf-8")
    return out


def _scan_markers(out: Path) -> set[tuple[str, str]]:
    return {(p.parent.parent.name, p.parent.name) for p in out.glob(f"*/*/{MARKER_NAME}")}


def _group_alive(pgid: int) -> list[psutil.Process]:
    """Processes of process group ``pgid`` that are still running (zombies count as gone)."""
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _running(processes: list[psutil.Process]) -> list[psutil.Process]:
    gone = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    still = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() not in gone:  # is_running also checks pid reuse
                still.append(proc)
        except psutil.Error:
            continue
    return still


def _wait_gone(descendants: list[psutil.Process], pgid: int, seconds: float = 10.0) -> list[psutil.Process]:
    """Wait up to ``seconds`` until neither the batch's descendants nor its process group have a running
    process; returns those still running then."""
    deadline = time.monotonic() + seconds
    while True:
        left = _running(descendants) + [p for p in _group_alive(pgid) if p not in descendants]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _no_partial_files(out: Path) -> list[Path]:
    """Temporary files of atomic writes (``.<name>.<random>.tmp<suffix>``) left in ``out``."""
    return [p for p in out.rglob(".*") if ".tmp" in p.name]


def _stats(out: Path) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of every file of the scan and pair folders."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("s*/**/*") if p.is_file()}


def _copy(straight: Path, out: Path) -> Path:
    shutil.copytree(straight, out, copy_function=shutil.copy2)
    return out


# ---- SIGTERM / SIGINT ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("signum", "to_group"), [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM-to-batch", "SIGINT-to-group-like-ctrl-c"])
def test_signal_stops_batch_and_resume_matches_uninterrupted(manifest: Path, straight: Path, tmp_path: Path,
                                                             signum: int, to_group: bool) -> None:
    """Signalled once its first scan is finished, the batch exits with 128 + signal, its worker processes
    are gone within 10 s, nothing half-written is left, finished scans are intact; ``--resume`` then
    recomputes only the rest and ends with tables byte-identical to an uninterrupted run."""
    out = tmp_path / "out"
    proc = _batch(manifest, out)
    batch = psutil.Process(proc.pid)
    descendants: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 300
    while not _scan_markers(out):
        assert proc.poll() is None, _finish(proc)
        assert time.monotonic() < deadline, "no scan finished in time"
        try:
            descendants.update((p.pid, p) for p in batch.children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(0.02)
    descendants.update((p.pid, p) for p in batch.children(recursive=True))
    assert proc.poll() is None, "the batch finished before it could be signalled"
    assert len(descendants) >= 2  # the two pool workers (and multiprocessing's resource tracker)

    (os.killpg if to_group else os.kill)(proc.pid, signum)
    stderr = _finish(proc, timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr
    if not to_group:
        assert "Traceback" not in stderr
    left = _wait_gone(list(descendants.values()), proc.pid)
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"

    # Nothing half-done: no temporary files; every scan marked finished has its recorded outputs intact.
    assert not _no_partial_files(out)
    finished = _scan_markers(out)
    assert finished and finished <= set(SCANS)
    kept = {}
    for subject, visit in finished:
        run_dir = out / subject / visit
        marker = json.loads((run_dir / MARKER_NAME).read_text())
        assert "measurements.json" in marker["outputs"]
        assert not stale_outputs(run_dir, marker["outputs"])
        kept[run_dir / "measurements.json"] = (run_dir / "measurements.json").stat()

    resumed = _batch(manifest, out, "--resume")
    stderr = _finish(resumed)
    assert resumed.returncode == 0, stderr
    assert f"scans {len(SCANS) - len(finished)} done, {len(finished)} already finished" in stderr
    for path, stat in kept.items():  # finished scans were not recomputed
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), path
    for name in TABLES:
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name
    for subject in ("s0", "s1"):
        assert PRIOR_SECTION in (out / subject / "12m" / "report.html").read_text(encoding="utf-8")
    assert not _no_partial_files(out)


def test_killed_batch_leaves_no_orphaned_worker(manifest: Path, tmp_path: Path) -> None:
    """Even when only the batch process is killed (SIGKILL: no clean-up possible), its pool workers exit
    by themselves instead of going on or idling."""
    out = tmp_path / "out"
    proc = _batch(manifest, out)
    batch = psutil.Process(proc.pid)
    deadline = time.monotonic() + 300
    workers: list[psutil.Process] = []
    while len(workers) < 2 or not _scan_markers(out):
        assert proc.poll() is None and time.monotonic() < deadline, _finish(proc)
        try:
            workers = batch.children(recursive=True)
        except psutil.Error:
            pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = _wait_gone(workers, proc.pid)
    assert not left, f"orphaned processes: {[(p.pid, p.name()) for p in left]}"


@pytest.mark.slow
def test_dask_local_cluster_stops_on_sigterm(manifest: Path, tmp_path: Path) -> None:
    """Best effort for Dask: the LocalCluster is closed and its worker processes are gone."""
    out = tmp_path / "out"
    proc = _batch(manifest, out, "--executor", "dask")
    batch = psutil.Process(proc.pid)
    descendants: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 300
    while not _scan_markers(out):
        assert proc.poll() is None and time.monotonic() < deadline, _finish(proc)
        try:
            descendants.update((p.pid, p) for p in batch.children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    stderr = _finish(proc, timeout=60)
    assert proc.returncode == 143, stderr
    left = _wait_gone(list(descendants.values()), proc.pid)
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
    resumed = _batch(manifest, out, "--resume")
    assert resumed.wait(timeout=600) == 0, _finish(resumed)


# ---- resume verifies outputs -------------------------------------------------------------------------

def test_resume_recomputes_exactly_the_scan_whose_output_was_deleted(manifest: Path, straight: Path,
                                                                     tmp_path: Path) -> None:
    out = _copy(straight, tmp_path / "out")
    lost = out / "s0" / "00m" / "measurements.json"
    content = lost.read_bytes()
    before = _stats(out)
    lost.unlink()

    proc = _batch(manifest, out, "--resume")
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert "scans 1 done, 3 already finished; visit pairs 0 done, 2 already finished; 0 failed" in stderr
    assert lost.read_bytes() == content  # back, with the same measurements
    after = _stats(out)
    recomputed = {p for p in before if after.get(p) != before[p]}
    assert recomputed and all(p.parent == lost.parent for p in recomputed), sorted(map(str, recomputed))
    assert (out / "s0" / "00m" / MARKER_NAME) in recomputed
    for name in TABLES:
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name


def test_resume_recomputes_a_scan_whose_output_changed(manifest: Path, straight: Path, tmp_path: Path) -> None:
    out = _copy(straight, tmp_path / "out")
    changed = out / "s1" / "00m" / "measurements.csv"
    original = changed.read_bytes()
    changed.write_bytes(original.replace(b",", b";", 1))
    proc = _batch(manifest, out, "--resume")
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert "scans 1 done, 3 already finished" in stderr and "measurements.csv has changed" in stderr
    assert changed.read_bytes() == original


@pytest.mark.parametrize("pair_marker", ["missing", "present"])
def test_resume_redoes_an_unfinished_pair_stage(manifest: Path, straight: Path, tmp_path: Path,
                                               pair_marker: str) -> None:
    """The state of a batch killed right after a visit pair's change but before the follow-up's report
    got its prior section: the follow-up's report is the scan's own (as its marker records). Whether the
    pair's marker is missing (killed before it) or present (a report overwritten since), the resume
    redoes the pair stage: the report has its prior section again."""
    from bml_pipeline.report import write_scan_report

    out = _copy(straight, tmp_path / "out")
    followup, pair = out / "s1" / "12m", out / "s1" / "changes" / "00m_to_12m"
    write_scan_report(followup)  # the follow-up's own report, without its prior visit
    assert update_outputs(followup, output_checksums(followup, [followup / "report.html"]))
    assert PRIOR_SECTION not in (followup / "report.html").read_text(encoding="utf-8")
    if pair_marker == "missing":
        (pair / MARKER_NAME).unlink()
    other_pair = _stats(out / "s0")

    proc = _batch(manifest, out, "--resume")
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert "scans 0 done, 4 already finished; visit pairs 1 done, 1 already finished; 0 failed" in stderr
    assert PRIOR_SECTION in (followup / "report.html").read_text(encoding="utf-8")
    assert _stats(out / "s0") == other_pair
    for name in TABLES:
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name
    # and it is finished now: a second resume does nothing
    proc = _batch(manifest, out, "--resume")
    stderr = _finish(proc)
    assert "scans 0 done, 4 already finished; visit pairs 0 done, 2 already finished" in stderr


# ---- plain numbers in messages -----------------------------------------------------------------------

def test_error_line_writes_numpy_numbers_plainly() -> None:
    exc = InputError(Path("/x/a.nii.gz"), f"zero or negative voxel spacing {(np.float64(0.0), np.float32(0.7))}; "
                                          f"counts {[np.int64(3), np.uint16(12)]}, ok {np.True_!r}")
    assert error_line(exc) == "/x/a.nii.gz: zero or negative voxel spacing (0.0, 0.7); counts [3, 12], ok True"
    assert error_line(ValueError(f"bad value {np.float64(-1.5e-05)!r}")) == "ValueError: bad value -1.5e-05"


def numpy_failing_scan(spec: ScanSpec, run_dir: Path, settings: BatchSettings, provenance: dict[str, Any]) -> dict:
    """Test stand-in whose failure message holds numpy scalars in a tuple (their repr)."""
    raise InputError(spec.labels, f"voxel spacing {(np.float64(0.0), np.float64(0.7), np.float32(0.5))} "
                                  f"is not positive")


def test_errors_csv_has_no_numpy_reprs(manifest: Path, tmp_path: Path) -> None:
    scans = [ScanSpec("s0", "00m", labels=manifest.parent / "s0_00m.nii.gz")]
    summary = run_batch(scans, tmp_path / "out", LocalExecutor(0), BatchSettings(report=False),
                        scan_fn=numpy_failing_scan)
    assert summary.failures[0][3].endswith("voxel spacing (0.0, 0.7, 0.5) is not positive")
    with (tmp_path / "out" / "errors.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["error"] == f"{manifest.parent / 's0_00m.nii.gz'}: voxel spacing (0.0, 0.7, 0.5) is not positive"
    assert "np." not in (tmp_path / "out" / "errors.csv").read_text()
    assert "np." not in (tmp_path / "out" / "s0" / "00m" / "scan.log").read_text()


def test_marker_records_output_checksums(straight: Path) -> None:
    """Each finished scan's marker holds the SHA-256 of each file it wrote; a pair's holds its change and
    the follow-up report it rendered."""
    run_dir = straight / "s0" / "00m"
    outputs = json.loads((run_dir / MARKER_NAME).read_text())["outputs"]
    assert {"measurements.json", "measurements.csv", "provenance.json", "report.html"} <= set(outputs)
    assert "scan.log" not in outputs and MARKER_NAME not in outputs
    for name, checksum in outputs.items():
        assert hashlib.sha256((run_dir / name).read_bytes()).hexdigest() == checksum
    pair = json.loads((straight / "s0" / "changes" / "00m_to_12m" / MARKER_NAME).read_text())["outputs"]
    assert set(pair) == {"change.json", "../../12m/report.html"}
