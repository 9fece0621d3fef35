"""``bml-pipeline batch MANIFEST --out DIR``: every scan of a manifest, on local workers or a Dask cluster.

Exit status: 0 all scans done, 3 done with failures (listed in ``errors.csv``), 2 could not start
(invalid manifest: every problem listed in one line), 130 stopped by SIGINT (Ctrl-C), 143 stopped by
SIGTERM. Stopped, the batch cancels its queued scans, terminates its worker processes and exits within
seconds; finished scans are kept and ``--resume`` completes the rest (:mod:`bml_pipeline.batch.interrupt`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bml_pipeline.commands import Command

if TYPE_CHECKING:
    from bml_pipeline.batch import ScanOutcome, ScanSpec

log = logging.getLogger(__name__)

PAIR_COST_PRIOR = 1.0
"""Prior wall time of one visit pair relative to one scan (a pair reads both runs, aligns the knees and
re-renders the follow-up's report: about as long as a scan), used for the ETA until pairs have run."""
PAIR_PRIOR_WEIGHT = 2.0
"""Weight of that prior, in pairs: after ``n`` measured pairs the pair time is
``(w * prior + n * measured) / (w + n)``."""


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="CSV or YAML manifest: subject, visit, image and/or labels [, side, model]")
    parser.add_argument("--out", required=True, help="output folder: <out>/<subject>/<visit>/ and cohort tables")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes (local executor or LocalCluster); 0 runs scans in this process")
    parser.add_argument("--executor", choices=("local", "dask"), default="local", help="where scans run")
    parser.add_argument("--scheduler", help="Dask scheduler address (tcp://host:8786) or scheduler file (.json);"
                                            " implies --executor dask")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="BLAS/OpenMP/torch threads per worker (default 1)")
    parser.add_argument("--resume", action="store_true",
                        help="skip scans and visit pairs already finished with unchanged inputs and intact "
                             "outputs (SHA-256 checked); recompute the rest")
    parser.add_argument("--model", help="segmentation model for rows without labels")
    parser.add_argument("--device", default="auto",
                        help="torch device for segmentation (auto, cpu, cuda, cuda:N); a list (cuda:0,cuda:1) is "
                             "shared out among workers")
    parser.add_argument("--gpu-resource", action="store_true",
                        help="Dask: run segmentation scans only on workers started with --resources GPU=1")
    parser.add_argument("--schema", default="oai_zib", help="label schema name or YAML file")
    parser.add_argument("--config", metavar="YAML", help="config file whose 'measure' section is used")
    parser.add_argument("--no-report", action="store_true", help="skip the per-scan and cohort HTML reports")
    parser.add_argument("--layout", choices=("default", "bids"), default="default",
                        help="run folders <subject>/<visit> (default) or BIDS-derivatives-like sub-<id>/ses-<visit> "
                             "with dataset_description.json")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    parser.add_argument("--verbose", action="store_true",
                        help="INFO lines of the pipeline (also above the progress bar) and of Dask (kept at "
                             "WARNING otherwise)")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.batch.interrupt import BatchInterrupted, stop_children, stop_on_signals

    configure_batch_logging(args.verbose)
    with stop_on_signals():
        try:
            return _run_batch(args)
        except BatchInterrupted as exc:
            stopped = stop_children()  # anything the executor could not stop (a Dask worker, say)
            if stopped:
                log.warning("stopped leftover worker processes %s", stopped)
            print(f"batch: stopped by {exc.signal_name}: queued scans cancelled, worker processes stopped; "
                  f"finished scans are kept, run again with --resume to complete the batch", file=sys.stderr)
            return exc.exit_code


def _run_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bml_pipeline.batch import BatchSettings, DaskExecutor, LocalExecutor, load_manifest, run_batch
    from bml_pipeline.batch.manifest import check_bids_labels, write_dataset_description
    from bml_pipeline.errors import InputError
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure import load_measure_config

    use_dask = args.executor == "dask" or args.scheduler is not None
    if args.workers < (1 if use_dask else 0):
        raise InputError(None, f"--workers must be at least {1 if use_dask else 0}, got {args.workers}")
    scans = load_manifest(args.manifest)
    # Everything a worker needs is checked here, before any work; paths become absolute for remote workers.
    config_file = str(Path(args.config).resolve()) if args.config else None
    load_measure_config(config_file)
    schema = args.schema if Path(args.schema).suffix not in (".yaml", ".yml") else str(Path(args.schema).resolve())
    load_schema(schema)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    if use_dask:
        executor = DaskExecutor(args.scheduler, args.workers, args.threads_per_worker, gpu=args.gpu_resource)
        where = f"Dask scheduler {args.scheduler}" if args.scheduler else f"a local Dask cluster of {args.workers}"
    else:
        executor = LocalExecutor(args.workers, args.threads_per_worker)
        where = f"{args.workers} local worker(s)" if args.workers else "this process"
    settings = BatchSettings(schema=schema, config_file=config_file, model=args.model, device=args.device,
                             report=not args.no_report, layout=args.layout)
    if args.layout == "bids":
        check_bids_labels(list(scans), Path(args.manifest))
        out.mkdir(parents=True, exist_ok=True)
        write_dataset_description(out)
    print(f"batch: {len(scans)} scans from {args.manifest} -> {out} on {where}"
          + (" (resuming)" if args.resume else ""), file=sys.stderr)

    with _Progress(fancy=not args.no_progress and sys.stderr.isatty(), specs=scans, verbose=args.verbose) as progress:
        summary = run_batch(scans, out, executor, settings, resume=args.resume, on_outcome=progress.update,
                            on_stage=progress.stage_started)
    print(f"batch: scans {summary.done} done, {summary.skipped} already finished; visit pairs "
          f"{summary.pairs_done} done, {summary.pairs_skipped} already finished; {summary.failed} failed; "
          f"{summary.seconds:.1f} s; tables in {out}", file=sys.stderr)
    for subject, visit, stage, reason in summary.failures[:10]:
        print(f"  failed {stage} {subject} {visit}: {reason}", file=sys.stderr)
    if summary.failed > 10:
        print(f"  ... {summary.failed - 10} more in {out / 'errors.csv'}", file=sys.stderr)
    return summary.exit_code


def configure_batch_logging(verbose: bool) -> None:
    """Logging of a batch: Dask's loggers (``distributed``, ``dask``, also in LocalCluster worker processes)
    at WARNING, or INFO with ``--verbose``; ``--verbose`` also shows the pipeline's INFO lines (even with
    ``-q``). The root level and handlers set by :func:`bml_pipeline.cli.main` are left as they are."""
    from bml_pipeline.batch.executors import set_dask_log_level

    set_dask_log_level(logging.INFO if verbose else logging.WARNING)
    if verbose:
        package = logging.getLogger("bml_pipeline")
        if package.getEffectiveLevel() > logging.INFO:
            package.setLevel(logging.INFO)


def format_duration(seconds: float | None) -> str:
    """``"45 s"``, ``"14 min"``, ``"2 h 05 min"``; ``"--"`` when unknown."""
    if seconds is None:
        return "--"
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass
class StageCount:
    """Jobs of one stage (scans or visit pairs): ``computed`` are done or failed ones (not skipped on resume);
    ``busy`` is the wall time from the stage's start to its last computed job."""

    total: int = 0
    start: float = 0.0
    finished: int = 0
    computed: int = 0
    failed: int = 0
    busy: float = 0.0

    @property
    def seconds_per_job(self) -> float | None:
        """Measured wall time per computed job (workers in parallel included); None before the first."""
        return self.busy / self.computed if self.computed else None


class BatchEta:
    """Remaining wall time of a batch: the scans still to finish *and* the visit pairs after them.

    With ``t_scan`` the scan stage's measured wall time per computed scan (:class:`StageCount`, so parallel
    workers are accounted for, and scans skipped on resume are left out)::

        remaining = scans_left * t_scan + pairs_left * t_pair
        t_pair    = (w * PAIR_COST_PRIOR * t_scan + n * m_pair) / (w + n)

    ``m_pair`` is the measured wall time per computed pair over the ``n`` pairs run so far (``w`` =
    :data:`PAIR_PRIOR_WEIGHT`; before any pair ran, ``t_pair`` is the prior ``PAIR_COST_PRIOR * t_scan``).
    Before the pair stage, ``pairs_left`` comes from the manifest: the visit pairs
    (:func:`~bml_pipeline.batch.changes.visit_pairs`: consecutive visits per knee, plus baseline to last with
    3+ visits) of the scans that have not failed, less those whose two scans were both skipped on resume
    (their pair is most likely finished too). Once the pair stage started, ``scans_left`` is 0 and
    ``pairs_left`` counts its unfinished pairs.

    The estimate is made at each event (a stage start, a finished job) and counts down with the clock
    until the next one (never below 0); None (shown ``--``) until a job needed for it has been measured.
    """

    def __init__(self, specs: Sequence[ScanSpec] = (), clock: Callable[[], float] = time.monotonic,
                 pair_cost_prior: float = PAIR_COST_PRIOR, prior_weight: float = PAIR_PRIOR_WEIGHT) -> None:
        self.specs = tuple(specs)
        self.clock = clock
        self.pair_cost_prior = pair_cost_prior
        self.prior_weight = prior_weight
        now = clock()
        self.scans = StageCount(total=len(self.specs), start=now)
        self.pairs: StageCount | None = None  # until the pair stage starts
        self.expected_pairs = 0  # visit pairs the manifest gives, less those of failed scans
        self._pairs_to_compute = 0  # of which not expected to be skipped on resume
        self._scan_status: dict[tuple[str, str], str] = {}
        self._estimate_pairs()
        self._snapshot: tuple[float, float | None] = (now, None)  # (time of the last event, estimate then)

    @property
    def current(self) -> StageCount:
        """The stage running now."""
        return self.scans if self.pairs is None else self.pairs

    @property
    def stage(self) -> str:
        return "scans" if self.pairs is None else "visit pairs"

    @property
    def total_jobs(self) -> int:
        """Scans and visit pairs (estimated until the pair stage starts)."""
        return self.scans.total + (self.expected_pairs if self.pairs is None else self.pairs.total)

    @property
    def finished_jobs(self) -> int:
        return self.scans.finished + (0 if self.pairs is None else self.pairs.finished)

    @property
    def failed(self) -> int:
        return self.scans.failed + (0 if self.pairs is None else self.pairs.failed)

    def stage_started(self, stage: str, total: int) -> None:
        """Hook of :func:`~bml_pipeline.batch.run_batch` (``on_stage``): ``"scans"`` or ``"visit pairs"``."""
        now = self.clock()
        if stage == "scans":
            self.scans, self.pairs = StageCount(total=total, start=now), None
        else:
            self.pairs = StageCount(total=total, start=now)
        self._snapshot = (now, self.estimate())

    def record(self, outcome: ScanOutcome) -> None:
        """A scan or pair finished (done, skipped or failed)."""
        now = self.clock()
        count = self.current
        count.finished += 1
        count.failed += outcome.status == "failed"
        if outcome.status != "skipped":
            count.computed += 1
            count.busy = now - count.start
        if self.pairs is None:
            self._scan_status[(outcome.subject, outcome.visit)] = outcome.status
            if outcome.status != "done":  # failed: its pairs will not run; skipped: its pairs may be skipped
                self._estimate_pairs()
        self._snapshot = (now, self.estimate())

    def _estimate_pairs(self) -> None:
        from bml_pipeline.batch.changes import visit_pairs

        status = self._scan_status
        pairs = visit_pairs([s for s in self.specs if status.get(s.key) != "failed"])
        self.expected_pairs = len(pairs)
        self._pairs_to_compute = sum(not (status.get(a.key) == status.get(b.key) == "skipped") for a, b, _ in pairs)

    def pair_seconds(self) -> float | None:
        """``t_pair``: the prior (pair ~ scan) refined with the measured pairs."""
        t_scan = self.scans.seconds_per_job
        prior = None if t_scan is None else self.pair_cost_prior * t_scan
        measured = None if self.pairs is None else self.pairs.seconds_per_job
        if measured is None or self.pairs is None:
            return prior
        if prior is None:
            return measured
        n, w = self.pairs.computed, self.prior_weight
        return (w * prior + n * measured) / (w + n)

    def estimate(self) -> float | None:
        """Seconds left as of the last event; None when a needed job time is not measured yet."""
        t_scan, t_pair = self.scans.seconds_per_job, self.pair_seconds()
        if self.pairs is None:
            scans_left, pairs_left = self.scans.total - self.scans.finished, self._pairs_to_compute
        else:
            scans_left, pairs_left = 0, self.pairs.total - self.pairs.finished
        if (scans_left and t_scan is None) or (pairs_left and t_pair is None):
            return None
        return scans_left * (t_scan or 0.0) + pairs_left * (t_pair or 0.0)

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left at ``now`` (default: the clock): the last estimate counted down, at least 0."""
        at, estimate = self._snapshot
        if estimate is None:
            return None
        return max(0.0, estimate - ((self.clock() if now is None else now) - at))

    def describe(self) -> str:
        """``"scans 12/40 · pairs 0/~30 · 1 failed"`` (``~``: pairs estimated from the manifest)."""
        parts = [f"scans {self.scans.finished}/{self.scans.total}"]
        if self.pairs is not None:
            parts.append(f"pairs {self.pairs.finished}/{self.pairs.total}")
        elif self.expected_pairs:
            parts.append(f"pairs 0/~{self.expected_pairs}")
        if self.failed:
            parts.append(f"{self.failed} failed")
        return " · ".join(parts)


def _bar_columns(eta: BatchEta) -> tuple[Any, ...]:
    """Rich columns: stages and counts, one bar over all jobs, elapsed time, ETA of the whole batch."""
    from rich.progress import BarColumn, ProgressColumn, TimeElapsedColumn
    from rich.text import Text

    class StagesColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(eta.describe(), style="bold")

    class EtaColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"ETA {format_duration(eta.remaining())}", style="cyan")

    return StagesColumn(), BarColumn(), TimeElapsedColumn(), EtaColumn()


class _Progress:
    """Scans, then visit pairs: on a terminal one rich progress bar (``scans 12/40 · pairs 0/~30 ... ETA 14
    min``, the ETA covering both stages: :class:`BatchEta`) with log records printed above it; else one log
    line per job.

    While the bar is live, the root logger's plain stream handlers (``logging.basicConfig``'s) are replaced
    by a ``RichHandler`` on the bar's console, so log lines appear above the bar instead of through it;
    it shows warnings and errors, and INFO lines too with ``verbose`` (or with ``--debug``). The
    handlers are put back when the bar stops.
    """

    def __init__(self, fancy: bool, specs: Sequence[ScanSpec] = (), *, verbose: bool = False,
                 console: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.fancy = fancy
        self.verbose = verbose
        self.eta = BatchEta(specs, clock)
        self._console = console
        self._bar: Any = None
        self._task: Any = None
        self._handler: logging.Handler | None = None
        self._replaced: list[logging.Handler] = []

    def __enter__(self) -> _Progress:  # noqa: PYI034
        if self.fancy:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(*_bar_columns(self.eta), console=self._console or Console(stderr=True))
            self._task = self._bar.add_task("batch", total=self.eta.total_jobs)
            self._bar.start()
            self._route_logging(self._bar.console)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            try:
                self._bar.stop()
            finally:
                self._restore_logging()

    def _route_logging(self, console: Any) -> None:
        from rich.logging import RichHandler

        root = logging.getLogger()
        self._replaced = [h for h in root.handlers if type(h) is logging.StreamHandler]
        handler = RichHandler(console=console, show_path=False, markup=False, log_time_format="[%X]")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        quiet = not self.verbose and root.getEffectiveLevel() >= logging.INFO
        handler.setLevel(max([logging.WARNING if quiet else logging.NOTSET] + [h.level for h in self._replaced]))
        for old in self._replaced:
            root.removeHandler(old)
        root.addHandler(handler)
        self._handler = handler

    def _restore_logging(self) -> None:
        root = logging.getLogger()
        if self._handler is not None:
            root.removeHandler(self._handler)
            self._handler = None
        for old in self._replaced:
            root.addHandler(old)
        self._replaced = []

    def stage_started(self, stage: str, total: int) -> None:
        self.eta.stage_started(stage, total)
        if self._bar is not None:
            self._bar.update(self._task, total=self.eta.total_jobs, completed=self.eta.finished_jobs)
        else:
            log.info("%s: %d to process", stage, total)

    def update(self, outcome: ScanOutcome) -> None:
        self.eta.record(outcome)
        if self._bar is not None:
            self._bar.update(self._task, total=self.eta.total_jobs, completed=self.eta.finished_jobs)
            return
        count = self.eta.current
        pairs = f" incl. ~{self.eta.expected_pairs} visit pairs" if self.eta.pairs is None and \
            self.eta.expected_pairs else ""
        detail = f": {outcome.error}" if outcome.error else ""
        log.info("[%s %d/%d] %s %s %s in %.1f s (ETA %s%s)%s", self.eta.stage, count.finished, count.total,
                 outcome.subject, outcome.visit, outcome.status, outcome.seconds,
                 format_duration(self.eta.remaining()), pairs, detail)

COMMAND = Command("batch", "process every scan of a manifest (local workers or Dask); cohort tables",
                  _add_arguments, _run)
