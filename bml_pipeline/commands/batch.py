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
from typing import TYPE_CHECKING, Any

from bml_pipeline.commands import Command

if TYPE_CHECKING:
    from bml_pipeline.batch import ScanOutcome

log = logging.getLogger(__name__)


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
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.batch.interrupt import BatchInterrupted, stop_children, stop_on_signals

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
                             report=not args.no_report)
    print(f"batch: {len(scans)} scans from {args.manifest} -> {out} on {where}"
          + (" (resuming)" if args.resume else ""), file=sys.stderr)

    with _Progress(fancy=not args.no_progress and sys.stderr.isatty()) as progress:
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


class _Progress:
    """Per stage (scans, visit pairs): a rich progress bar with ETA on a terminal, else one log line per job."""

    def __init__(self, fancy: bool) -> None:
        self.fancy = fancy
        self.stage, self.total, self.count, self.failed = "", 0, 0, 0
        self.start = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:  # noqa: PYI034
        if self.fancy:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn())
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def stage_started(self, stage: str, total: int) -> None:
        self.stage, self.total, self.count, self.failed = stage, total, 0, 0
        self.start = time.perf_counter()
        if self._bar is not None:
            self._task = self._bar.add_task(stage, total=total, failed=0)
        else:
            log.info("%s: %d to process", stage, total)

    def update(self, outcome: ScanOutcome) -> None:
        self.count += 1
        self.failed += outcome.status == "failed"
        if self._bar is not None:
            self._bar.update(self._task, advance=1, failed=self.failed)
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.count * (self.total - self.count)
        detail = f": {outcome.error}" if outcome.error else ""
        log.info("[%s %d/%d] %s %s %s in %.1f s (ETA %.0f s)%s", self.stage, self.count, self.total,
                 outcome.subject, outcome.visit, outcome.status, outcome.seconds, eta, detail)


COMMAND = Command("batch", "process every scan of a manifest (local workers or Dask); cohort tables",
                  _add_arguments, _run)
