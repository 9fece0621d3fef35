"""Longitudinal change inside a batch: which visit pairs, and the pair job the executors run.

For each subject with several finished visits (natural visit order) the pairs are every consecutive
pair and, with three or more visits, baseline to last. A pair's outputs go to
``<out>/<subject>/changes/<baseline>_to_<followup>/`` (``change.json``, ``scan.log``, and a completion marker
keyed on both scans' identities and holding the checksums of ``change.json`` and of the follow-up's
re-rendered ``report.html``), so a resumed batch redoes a pair when one of its scans changed or when the
pair stage did not finish or its outputs were lost.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bml_pipeline.batch import store
from bml_pipeline.batch.manifest import ScanSpec, pair_dir, scan_sort_key
from bml_pipeline.batch.worker import (
    LOG_NAME,
    BatchSettings,
    ScanOutcome,
    attach_log,
    detach_log,
    error_line,
    plain_text,
)
from bml_pipeline.io import write_text_atomic

log = logging.getLogger(__name__)

PairFunction = Callable[[ScanSpec, Path, ScanSpec, Path, BatchSettings], dict[str, Any]]
"""``(baseline spec, baseline run dir, follow-up spec, follow-up run dir, settings) -> change.json dict``."""


def visit_pairs(specs: Sequence[ScanSpec]) -> list[tuple[ScanSpec, ScanSpec, bool]]:
    """``(baseline, followup, consecutive)``: consecutive visit pairs per subject, plus baseline-to-last
    (``consecutive`` False) when a subject has 3+ visits."""
    by_subject: dict[str, list[ScanSpec]] = {}
    for spec in sorted(specs, key=scan_sort_key):
        by_subject.setdefault(spec.subject, []).append(spec)
    pairs = []
    for visits in by_subject.values():
        pairs.extend((a, b, True) for a, b in itertools.pairwise(visits))
        if len(visits) > 2:
            pairs.append((visits[0], visits[-1], False))
    return pairs


def pipeline_change(baseline: ScanSpec, baseline_dir: Path, followup: ScanSpec, followup_dir: Path,
                    settings: BatchSettings) -> dict[str, Any]:
    """The real pair job: :func:`bml_pipeline.longitudinal.runs.compare_runs` of the two run directories
    (as ``bml-pipeline longitudinal`` does: the same runs give the same ``change.json``)."""
    from bml_pipeline.longitudinal.runs import compare_runs

    side = baseline.side if baseline.side == followup.side else None
    return compare_runs(baseline_dir, followup_dir, side=side)


def change_table_row(change: dict[str, Any], subject: str, baseline_visit: str, followup_visit: str
                     ) -> dict[str, Any]:
    """The ``changes.csv`` row of one pair."""
    from bml_pipeline.longitudinal.change import change_row

    return change_row(change, subject=subject, baseline_visit=baseline_visit, followup_visit=followup_visit)


@dataclass(frozen=True)
class PairTask:
    """Change between two finished scans of one subject (a :class:`~bml_pipeline.batch.worker.Job`)."""

    baseline: ScanSpec
    followup: ScanSpec
    out: Path
    settings: BatchSettings
    resume: bool
    pair_fn: PairFunction | None = None  # None: pipeline_change
    consecutive: bool = True  # the follow-up's report shows this change (not for baseline-to-last)

    @property
    def key(self) -> tuple[str, str]:
        return (self.baseline.subject, f"{self.baseline.visit}->{self.followup.visit}")

    @property
    def model(self) -> str | None:
        return None

    @property
    def pair_dir(self) -> Path:
        return pair_dir(self.out, self.baseline, self.followup, self.settings.layout)

    def failed(self, reason: str) -> ScanOutcome:
        return ScanOutcome(*self.key, "failed", None, reason)

    @property
    def renders_report(self) -> bool:
        """Whether this pair re-renders the follow-up's ``report.html`` (consecutive pairs, reports on)."""
        return self.settings.report and self.consecutive

    def cleanup(self) -> None:
        """Remove what an interrupted run of this job left half-written (temporary files of atomic
        writes); its completion marker is written last, so the pair is redone on resume."""
        store.remove_partial(self.pair_dir)
        if self.renders_report:
            store.remove_partial(self.followup.run_dir(self.out, self.settings.layout))

    def execute(self, device: str | None = None) -> ScanOutcome:
        """Compare the two visits and re-render the follow-up's report (or reuse a finished pair stage of
        the same scans whose outputs are intact); never raises.

        The pair's marker is written last and records the checksums of ``change.json`` and of the
        follow-up report it rendered, so a pair stage killed before its end, or whose outputs were lost
        or overwritten since (the follow-up scan recomputed), is redone on resume.
        """
        start = time.perf_counter()
        base_dir = self.baseline.run_dir(self.out, self.settings.layout)
        foll_dir = self.followup.run_dir(self.out, self.settings.layout)
        try:
            inputs = {"baseline": store.scan_identity(base_dir), "followup": store.scan_identity(foll_dir)}
        except OSError as exc:
            return self.failed(f"{exc.filename}: scan not finished ({exc.strerror})")
        digest = store.settings_digest({"schema": self.settings.schema, "followup_report": self.renders_report})
        if self.resume:
            row = store.finished_row(self.pair_dir, inputs, digest)
            if row is not None:
                return ScanOutcome(*self.key, "skipped", row, None, time.perf_counter() - start)
        self.pair_dir.mkdir(parents=True, exist_ok=True)
        store.clear_marker(self.pair_dir)
        self.cleanup()  # left by a run killed mid-write
        handler = attach_log(self.pair_dir / LOG_NAME)
        try:
            log.info("change %s %s", *self.key)
            change = (self.pair_fn or pipeline_change)(self.baseline, base_dir, self.followup, foll_dir,
                                                       self.settings)
            write_text_atomic(self.pair_dir / "change.json", json.dumps(change, indent=2, sort_keys=True) + "\n")
            row = change_table_row(change, self.baseline.subject, self.baseline.visit, self.followup.visit)
            outputs = [self.pair_dir / "change.json"]
            report_error = self._followup_report(base_dir, foll_dir) if self.renders_report else None
            if report_error is not None:  # the change stands; no marker, so a resume retries the report
                return ScanOutcome(*self.key, "done", row, report_error, time.perf_counter() - start)
            if self.renders_report:
                report = foll_dir / "report.html"
                store.update_outputs(foll_dir, store.output_checksums(foll_dir, [report]))
                outputs.append(report)
            store.write_marker(self.pair_dir, inputs, digest, row, store.output_checksums(self.pair_dir, outputs))
            return ScanOutcome(*self.key, "done", row, None, time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a failed pair is recorded, the batch goes on
            log.error("change %s %s failed: %s\n%s", *self.key, error_line(exc), plain_text(traceback.format_exc()))
            (self.pair_dir / "change.json").unlink(missing_ok=True)
            return ScanOutcome(*self.key, "failed", None, error_line(exc), time.perf_counter() - start)
        finally:
            detach_log(handler)

    def _followup_report(self, base_dir: Path, foll_dir: Path) -> str | None:
        """Re-render the follow-up's ``report.html`` with the prior visit and this change. Returns a
        one-line error, or None."""
        from bml_pipeline.report import write_scan_report

        try:
            write_scan_report(foll_dir, prior_dir=base_dir, change_path=self.pair_dir / "change.json")
        except Exception as exc:  # noqa: BLE001 - the change stands; the report failure is recorded
            log.error("report of %s with its prior visit failed: %s\n%s", foll_dir, error_line(exc),
                      plain_text(traceback.format_exc()))
            return f"follow-up report: {error_line(exc)}"
        return None
