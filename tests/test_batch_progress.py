"""The batch progress display: ETA over scans and visit pairs, log lines above the bar, Dask's log level."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from rich.logging import RichHandler

from bml_pipeline.batch import ScanOutcome, ScanSpec, executors, load_manifest
from bml_pipeline.commands.batch import (
    PAIR_PRIOR_WEIGHT,
    BatchEta,
    _Progress,
    configure_batch_logging,
    format_duration,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _specs(subjects: int, visits: tuple[str, ...]) -> list[ScanSpec]:
    return [ScanSpec(f"s{s}", v, labels=Path("x.nii.gz")) for s in range(subjects) for v in visits]


def _outcome(subject: str, visit: str, status: str = "done") -> ScanOutcome:
    return ScanOutcome(subject, visit, status, error="broken" if status == "failed" else None)


def test_eta_includes_visit_pairs_with_fake_clock() -> None:
    clock = FakeClock()
    eta = BatchEta(_specs(2, ("00m", "36m")), clock)          # 4 scans, 2 visit pairs
    eta.stage_started("scans", 4)
    assert eta.remaining() is None                            # nothing measured yet
    assert eta.describe() == "scans 0/4 · pairs 0/~2"

    clock.now = 10.0
    eta.record(_outcome("s0", "00m"))                          # t_scan = 10 s; prior t_pair = t_scan
    assert eta.remaining() == pytest.approx(3 * 10 + 2 * 10)
    clock.now = 15.0                                           # counts down between events
    assert eta.remaining() == pytest.approx(45.0)
    clock.now = 20.0
    eta.record(_outcome("s0", "36m"))
    assert eta.remaining() == pytest.approx(2 * 10 + 2 * 10)
    clock.now = 30.0
    eta.record(_outcome("s1", "00m"))
    clock.now = 40.0
    eta.record(_outcome("s1", "36m"))
    assert eta.remaining() == pytest.approx(2 * 10)           # scans done: only the pairs are left
    assert eta.remaining(now=100.0) == 0.0                    # never below 0

    eta.stage_started("visit pairs", 2)
    assert eta.remaining() == pytest.approx(20.0)
    clock.now = 46.0
    eta.record(_outcome("s0", "00m->36m"))                     # measured 6 s per pair, weighed with the prior
    t_pair = (PAIR_PRIOR_WEIGHT * 10 + 1 * 6) / (PAIR_PRIOR_WEIGHT + 1)
    assert eta.remaining() == pytest.approx(1 * t_pair)
    assert eta.describe() == "scans 4/4 · pairs 1/2"
    clock.now = 52.0
    eta.record(_outcome("s1", "00m->36m"))
    assert eta.remaining() == 0.0


def test_eta_leaves_out_failed_and_skipped_scans() -> None:
    clock = FakeClock()
    eta = BatchEta(_specs(2, ("00m", "12m", "24m")), clock)   # 6 scans, 2 x 3 pairs
    eta.stage_started("scans", 6)
    clock.now = 1.0
    eta.record(_outcome("s0", "00m", "skipped"))               # resume: finished earlier, not timed
    eta.record(_outcome("s0", "12m", "skipped"))
    assert eta.remaining() is None
    clock.now = 20.0
    eta.record(_outcome("s1", "00m", "failed"))                # s1 keeps one pair (12m -> 24m)
    assert (eta.expected_pairs, eta.failed) == (4, 1)
    clock.now = 41.0
    eta.record(_outcome("s0", "24m", "skipped"))               # all of s0 skipped: its 3 pairs too, likely
    assert eta.scans.seconds_per_job == pytest.approx(20.0)    # 20 s busy per computed scan, skipped ones out
    # 2 scans left and 1 pair expected to run (s1 12m -> 24m), each at the 20 s per job measured so far
    assert eta.remaining() == pytest.approx(2 * 20 + 1 * 20)
    assert eta.describe() == "scans 4/6 · pairs 0/~4 · 1 failed"


def test_pair_estimate_from_manifest(tmp_path: Path) -> None:
    lines = ["subject,visit,labels"]
    for s in ("a", "b"):
        for visit in ("00m", "12m", "24m"):
            (tmp_path / f"{s}_{visit}.nii.gz").write_bytes(b"")
            lines.append(f"{s},{visit},{s}_{visit}.nii.gz")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    eta = BatchEta(load_manifest(tmp_path / "manifest.csv"))
    assert eta.expected_pairs == 2 * (2 + 1)                   # consecutive pairs + baseline to last
    assert eta.total_jobs == 6 + 6
    assert BatchEta(_specs(3, ("00m", "36m"))).expected_pairs == 3
    assert BatchEta(_specs(3, ("00m",))).describe() == "scans 0/3"


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 0, 45, 61, 14 * 60 + 10, 2 * 3600 + 5 * 60)] == [
        "--", "0 s", "45 s", "1 min", "14 min", "2 h 05 min"]


@pytest.fixture
def plain_root_handler() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """A plain stream handler on the root logger at INFO, as ``logging.basicConfig`` in the CLI makes."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler, stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def _console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def test_logging_goes_through_the_live_display(plain_root_handler: tuple[logging.Handler, io.StringIO]) -> None:
    plain, plain_stream = plain_root_handler
    console = _console()
    root = logging.getLogger()
    with _Progress(True, _specs(2, ("00m", "36m")), console=console) as progress:
        rich_handlers = [h for h in root.handlers if isinstance(h, RichHandler)]
        assert len(rich_handlers) == 1 and rich_handlers[0].console is progress._bar.console is console
        assert plain not in root.handlers
        progress.stage_started("scans", 4)
        progress.update(_outcome("s0", "00m"))
        logging.getLogger("bml_pipeline.test").warning("disk nearly full")
        logging.getLogger("bml_pipeline.test").info("chatty info line")   # shown with --verbose only
        progress._bar.refresh()
    assert plain in root.handlers and not any(isinstance(h, RichHandler) for h in root.handlers)
    assert plain_stream.getvalue() == ""                        # nothing written through the bar
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "bml_pipeline.test: disk nearly full" in shown
    assert "chatty info line" not in shown
    assert "scans 1/4 · pairs 0/~2" in shown and "ETA" in shown


def test_verbose_shows_info_above_the_bar(plain_root_handler: tuple[logging.Handler, io.StringIO]) -> None:
    console = _console()
    with _Progress(True, _specs(1, ("00m",)), console=console, verbose=True):
        logging.getLogger("bml_pipeline.test").info("chatty info line")
    assert "chatty info line" in console.file.getvalue()  # type: ignore[attr-defined]


def test_no_progress_logs_plain_lines(plain_root_handler: tuple[logging.Handler, io.StringIO]) -> None:
    _, plain_stream = plain_root_handler
    clock = FakeClock()
    handlers = list(logging.getLogger().handlers)
    with _Progress(False, _specs(2, ("00m", "36m")), clock=clock) as progress:
        assert logging.getLogger().handlers == handlers
        progress.stage_started("scans", 4)
        clock.now = 60.0
        progress.update(_outcome("s0", "00m"))
    assert "[scans 1/4] s0 00m done in 0.0 s (ETA 5 min incl. ~2 visit pairs)" in plain_stream.getvalue()


@pytest.fixture
def restore_log_levels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    names = ("distributed", "dask", "bml_pipeline")
    levels = {name: logging.getLogger(name).level for name in names}
    monkeypatch.setenv(executors.DASK_LOG_ENV, "")
    monkeypatch.setattr(executors, "_dask_log_level", None)
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("restore_log_levels")
def test_dask_loggers_at_warning_unless_verbose() -> None:
    logging.getLogger("bml_pipeline").setLevel(logging.WARNING)   # as with -q
    configure_batch_logging(verbose=False)
    assert logging.getLogger("distributed").level == logging.WARNING
    assert logging.getLogger("distributed.scheduler").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("dask").level == logging.WARNING
    assert os.environ[executors.DASK_LOG_ENV] == "warning"       # inherited by LocalCluster workers
    assert logging.getLogger("bml_pipeline").getEffectiveLevel() == logging.WARNING

    configure_batch_logging(verbose=True)
    assert logging.getLogger("distributed").level == logging.INFO
    assert logging.getLogger("dask").level == logging.INFO
    assert os.environ[executors.DASK_LOG_ENV] == "info"
    assert logging.getLogger("bml_pipeline").getEffectiveLevel() == logging.INFO

    logging.getLogger("distributed").setLevel(logging.INFO)      # as importing distributed does
    configure_batch_logging(verbose=False)
    logging.getLogger("distributed").setLevel(logging.INFO)
    executors.apply_dask_log_level()                              # what DaskExecutor does after the import
    assert logging.getLogger("distributed").level == logging.WARNING


@pytest.mark.usefixtures("restore_log_levels")
def test_dask_level_reaches_a_fresh_distributed_import() -> None:
    """A process that imports distributed after the batch set the level (a LocalCluster worker) keeps it."""
    configure_batch_logging(verbose=False)                        # sets the variable child processes inherit
    code = "import logging, distributed; print(logging.getLogger('distributed.worker').getEffectiveLevel())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(logging.WARNING)


def test_batch_command_has_verbose() -> None:
    from bml_pipeline.cli import build_parser

    args = build_parser().parse_args(["batch", "m.csv", "--out", "o", "--verbose"])
    assert args.verbose is True
    assert build_parser().parse_args(["batch", "m.csv", "--out", "o"]).verbose is False
