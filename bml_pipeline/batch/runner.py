"""A batch: every scan of a manifest through an executor, visit pairs, then the cohort-level outputs.

:func:`run_batch` maps the per-scan job over the scans (skipping finished ones when resuming), then the
change job over visit pairs, records failures without stopping, and writes the cohort tables, statistics
and report at the output folder. Exit status: 0 all done, 3 done with failures (see :mod:`bml_pipeline.cli`).

An exception while jobs run (:class:`~bml_pipeline.batch.interrupt.BatchInterrupted` on SIGINT/SIGTERM)
stops the executor's workers, removes the temporary files of the unfinished jobs and propagates; no
cohort table is written then, and ``resume=True`` later picks up where the batch stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bml_pipeline.batch.changes import PairFunction, PairTask, visit_pairs
from bml_pipeline.batch.cohort import write_changes, write_cohort_tables, write_errors, write_long_table
from bml_pipeline.batch.executors import Executor
from bml_pipeline.batch.manifest import ScanSpec
from bml_pipeline.batch.worker import (
    BatchSettings,
    ScanFunction,
    ScanOutcome,
    ScanTask,
    error_line,
    one_line,
)

log = logging.getLogger(__name__)

EXIT_ALL_DONE, EXIT_WITH_FAILURES = 0, 3


@dataclass
class BatchSummary:
    """Counts and failures of a finished batch (scans and visit pairs)."""

    total: int
    done: int = 0
    skipped: int = 0
    pairs_done: int = 0
    pairs_skipped: int = 0
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)  # subject, visit, stage, reason
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def exit_code(self) -> int:
        """0 when every scan and pair is done, 3 when some failed."""
        return EXIT_WITH_FAILURES if self.failures else EXIT_ALL_DONE


def run_batch(
    scans: Sequence[ScanSpec],
    out: str | Path,
    executor: Executor,
    settings: BatchSettings | None = None,
    *,
    resume: bool = False,
    scan_fn: ScanFunction | None = None,
    pair_fn: PairFunction | None = None,
    on_outcome: Callable[[ScanOutcome], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> BatchSummary:
    """Process ``scans`` into ``out``, compare visits, and write the cohort outputs.

    Steps: every scan (:class:`~bml_pipeline.batch.worker.ScanTask`); then every visit pair of finished
    scans (:func:`~bml_pipeline.batch.changes.visit_pairs`); then ``cohort.csv``, ``cohort.parquet``,
    ``changes.csv``, ``errors.csv``, ``cohort_stats.json/.csv`` and ``cohort_report.html``.

    Args:
        scans: validated manifest rows (:func:`~bml_pipeline.batch.manifest.load_manifest`).
        out: output folder; each scan goes to ``<out>/<subject>/<visit>/``.
        executor: :class:`~bml_pipeline.batch.executors.LocalExecutor` or ``DaskExecutor``.
        settings: schema, default model, device, reports on/off (None: defaults).
        resume: reuse scans and pairs whose completion marker matches their current inputs and
            settings; without it everything is recomputed.
        scan_fn, pair_fn: the per-scan and per-pair jobs (default: the full pipeline); picklable
            module-level functions.
        on_outcome: called in this process as each scan or pair finishes (progress display).
        on_stage: called with ``("scans", n)`` and ``("visit pairs", n)`` as each stage starts.
    """
    out = Path(out).absolute()  # workers on other machines or in other folders write here too
    settings = settings or BatchSettings()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = BatchSummary(total=len(scans))

    scan_rows, finished, change_rows = [], [], []
    unfinished: dict[tuple[str, str], Any] = {}  # jobs handed to the executor without an outcome yet
    try:
        with executor:  # workers stay up from the scans to the pairs
            tasks = [ScanTask(spec, spec.run_dir(out, settings.layout), settings, resume, scan_fn) for spec in scans]
            if on_stage is not None:
                on_stage("scans", len(tasks))
            unfinished.update((t.key, t) for t in tasks)
            for task, outcome in executor.run(tasks):
                unfinished.pop(task.key, None)
                if _record(summary, outcome, "scan", on_outcome):
                    scan_rows.append(outcome.row or {})
                    finished.append(task.spec)
                    summary.done += outcome.status == "done"
                    summary.skipped += outcome.status == "skipped"
            cohort = write_cohort_tables(out, scan_rows)

            pairs = [PairTask(a, b, out, settings, resume, pair_fn, consecutive=consecutive)
                     for a, b, consecutive in visit_pairs(finished)]
            if on_stage is not None and pairs:
                on_stage("visit pairs", len(pairs))
            unfinished.update((t.key, t) for t in pairs)
            for task, outcome in executor.run(pairs):
                unfinished.pop(task.key, None)
                if _record(summary, outcome, "change", on_outcome):
                    change_rows.append(outcome.row or {})
                    summary.pairs_done += outcome.status == "done"
                    summary.pairs_skipped += outcome.status == "skipped"
    except BaseException:  # interrupted (SIGINT/SIGTERM): the executor has stopped its workers
        _remove_partial(unfinished.values())
        raise
    changes = write_changes(out, change_rows)
    write_long_table(out, cohort, changes)
    stats = write_cohort_stats(out, changes)
    errors = write_errors(out, summary.failures)
    try:
        if settings.report:
            write_report(out, cohort, changes, errors, stats)
    except Exception as exc:
        log.exception("cohort report failed")
        summary.failures.append(("", "", "report", error_line(exc)))
        write_errors(out, summary.failures)

    summary.seconds = time.perf_counter() - start
    log.info("batch finished: %d scans done, %d already finished, %d pairs compared, %d failures in %.1f s",
             summary.done, summary.skipped, summary.pairs_done + summary.pairs_skipped, summary.failed,
             summary.seconds)
    return summary


def _remove_partial(jobs: Any) -> None:
    """Remove the temporary files that jobs stopped mid-write left (best effort); their completion
    markers are missing, so a resume recomputes them."""
    for job in jobs:
        try:
            job.cleanup()
        except Exception as exc:  # noqa: BLE001 - never hide the interruption behind a clean-up error
            log.debug("clean-up of %s failed: %s", job.key, exc)


def _record(summary: BatchSummary, outcome: ScanOutcome, stage: str,
            on_outcome: Callable[[ScanOutcome], None] | None) -> bool:
    """Count a failure and call the progress hook; True when the outcome has a row."""
    if outcome.error:  # whatever produced it: one line, numbers written plainly
        outcome = replace(outcome, error=one_line(outcome.error))
    if on_outcome is not None:
        on_outcome(outcome)
    if outcome.status == "failed":
        summary.failures.append((outcome.subject, outcome.visit, stage, outcome.error or "unknown error"))
        log.warning("%s %s failed: %s", outcome.subject, outcome.visit, outcome.error)
        return False
    if outcome.error:  # finished, but its report could not be written
        summary.failures.append((outcome.subject, outcome.visit, "report", outcome.error))
        log.warning("%s %s: %s", outcome.subject, outcome.visit, outcome.error)
    return True


def write_cohort_stats(out: Path, changes: Any) -> list[dict[str, Any]]:
    """``cohort_stats.json``/``.csv``: n, mean, SD, 95 % CI, SRM per change measure (empty without pairs)."""
    from bml_pipeline.longitudinal.cohort import cohort_stats, write_stats

    rows = [s.to_dict() for s in cohort_stats(changes)] if len(changes) else []
    write_stats(out, rows)
    return rows


def write_report(out: Path, cohort: Any, changes: Any, errors: Any, stats: list[dict[str, Any]]) -> None:
    """``cohort_report.html`` from the tables just written."""
    from bml_pipeline.report import write_cohort_report

    write_cohort_report(out, cohort, changes, errors, stats)
