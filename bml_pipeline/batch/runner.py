"""A batch: every scan of a manifest through an executor, then the cohort-level outputs.

:func:`run_batch` maps the per-scan job over the scans (skipping finished ones when resuming), records
failures without stopping, and writes ``cohort.csv``, ``cohort.parquet`` and ``errors.csv`` at the
output folder. Exit status: 0 all scans done, 3 done with failures (see :mod:`bml_pipeline.cli`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bml_pipeline.batch.cohort import write_cohort_tables, write_errors
from bml_pipeline.batch.executors import Executor
from bml_pipeline.batch.manifest import ScanSpec
from bml_pipeline.batch.worker import BatchSettings, ScanFunction, ScanOutcome, ScanTask

log = logging.getLogger(__name__)

EXIT_ALL_DONE, EXIT_WITH_FAILURES = 0, 3


@dataclass
class BatchSummary:
    """Counts and failures of a finished batch."""

    total: int
    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (subject, visit, reason)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def exit_code(self) -> int:
        """0 when every scan is done, 3 when some failed."""
        return EXIT_WITH_FAILURES if self.failures else EXIT_ALL_DONE


def run_batch(
    scans: Sequence[ScanSpec],
    out: str | Path,
    executor: Executor,
    settings: BatchSettings | None = None,
    *,
    resume: bool = False,
    scan_fn: ScanFunction | None = None,
    on_outcome: Callable[[ScanOutcome], None] | None = None,
) -> BatchSummary:
    """Process ``scans`` into ``out`` and write the cohort tables.

    Args:
        scans: validated manifest rows (:func:`~bml_pipeline.batch.manifest.load_manifest`).
        out: output folder; each scan goes to ``<out>/<subject>/<visit>/``.
        executor: :class:`~bml_pipeline.batch.executors.LocalExecutor` or ``DaskExecutor``.
        settings: schema, default model, device, per-scan reports (None: defaults).
        resume: reuse scans whose completion marker matches their current inputs and settings;
            without it every scan is recomputed.
        scan_fn: the per-scan job (default: the full pipeline); must be a picklable module-level function.
        on_outcome: called in this process as each scan finishes (progress display).
    """
    out = Path(out)
    settings = settings or BatchSettings()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tasks = [ScanTask(spec, spec.run_dir(out), settings, resume, scan_fn) for spec in scans]
    summary = BatchSummary(total=len(tasks))
    rows = []
    for _task, outcome in executor.run(tasks):
        if outcome.status == "failed":
            summary.failures.append((outcome.subject, outcome.visit, outcome.error or "unknown error"))
            log.warning("%s %s failed: %s", outcome.subject, outcome.visit, outcome.error)
        else:
            rows.append(outcome.row or {})
            if outcome.status == "skipped":
                summary.skipped += 1
            else:
                summary.done += 1
        if on_outcome is not None:
            on_outcome(outcome)
    write_cohort_tables(out, rows)
    write_errors(out, summary.failures)
    summary.seconds = time.perf_counter() - start
    log.info("batch finished: %d done, %d already finished, %d failed in %.1f s", summary.done,
             summary.skipped, summary.failed, summary.seconds)
    return summary
