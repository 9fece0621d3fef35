"""Longitudinal change inside a batch: which visit pairs, and the pair job the executors run.

For each subject with several finished visits (natural visit order) the pairs are every consecutive
pair and, with three or more visits, baseline to last. A pair's outputs go to
``<out>/<subject>/changes/<baseline>_to_<followup>/`` (``change.json``, ``change.log``, a completion marker
keyed on both scans' markers, so a resumed batch recomputes a pair only when one of its scans changed).
"""

from __future__ import annotations

import hashlib
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
from bml_pipeline.batch.manifest import ScanSpec, scan_sort_key
from bml_pipeline.batch.worker import LOG_NAME, BatchSettings, ScanOutcome, attach_log, detach_log, error_line
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
    """The real pair job: :func:`bml_pipeline.longitudinal.change.compare_visits` on both scans' labels
    and measurements."""
    from bml_pipeline.io import read_labels
    from bml_pipeline.labels import load_schema
    from bml_pipeline.longitudinal.change import compare_visits

    schema = load_schema(settings.schema)
    volumes, measurements = [], []
    for spec, run_dir in ((baseline, baseline_dir), (followup, followup_dir)):
        volumes.append(read_labels(spec.labels or run_dir / "labels.nii.gz", schema))
        measurements.append(json.loads((run_dir / "measurements.json").read_text(encoding="utf-8")))
    side = baseline.side if baseline.side == followup.side else None
    change = compare_visits(volumes[0], volumes[1], schema, baseline_measurements=measurements[0],
                            followup_measurements=measurements[1], side=side)
    return change.to_dict()


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
        return self.out / self.baseline.subject / "changes" / f"{self.baseline.visit}_to_{self.followup.visit}"

    def failed(self, reason: str) -> ScanOutcome:
        return ScanOutcome(*self.key, "failed", None, reason)

    def execute(self, device: str | None = None) -> ScanOutcome:
        """Compare the two visits (or reuse a finished comparison of the same scans); never raises."""
        start = time.perf_counter()
        base_dir, foll_dir = self.baseline.run_dir(self.out), self.followup.run_dir(self.out)
        try:
            inputs = {"baseline": _marker_digest(base_dir), "followup": _marker_digest(foll_dir)}
        except OSError as exc:
            return self.failed(f"{exc.filename}: scan not finished ({exc.strerror})")
        digest = store.settings_digest({"schema": self.settings.schema})
        if self.resume:
            row = store.finished_row(self.pair_dir, inputs, digest)
            if row is not None:
                report_error = self._followup_report(base_dir, foll_dir, only_if_stale=True)
                return ScanOutcome(*self.key, "skipped", row, report_error, time.perf_counter() - start)
        self.pair_dir.mkdir(parents=True, exist_ok=True)
        store.clear_marker(self.pair_dir)
        handler = attach_log(self.pair_dir / LOG_NAME)
        try:
            log.info("change %s %s", *self.key)
            change = (self.pair_fn or pipeline_change)(self.baseline, base_dir, self.followup, foll_dir,
                                                       self.settings)
            write_text_atomic(self.pair_dir / "change.json", json.dumps(change, indent=2, sort_keys=True) + "\n")
            row = change_table_row(change, self.baseline.subject, self.baseline.visit, self.followup.visit)
            store.write_marker(self.pair_dir, inputs, digest, row)
            report_error = self._followup_report(base_dir, foll_dir)
            return ScanOutcome(*self.key, "done", row, report_error, time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a failed pair is recorded, the batch goes on
            log.error("change %s %s failed: %s\n%s", *self.key, exc, traceback.format_exc())
            (self.pair_dir / "change.json").unlink(missing_ok=True)
            return ScanOutcome(*self.key, "failed", None, error_line(exc), time.perf_counter() - start)
        finally:
            detach_log(handler)


    def _followup_report(self, base_dir: Path, foll_dir: Path, only_if_stale: bool = False) -> str | None:
        """Re-render the follow-up's ``report.html`` with the prior visit and this change (consecutive
        pairs, reports on). ``only_if_stale``: only when the report is newer than this pair's marker (the
        follow-up scan was rewritten). Returns a one-line error, or None."""
        report = foll_dir / "report.html"
        if not (self.settings.report and self.consecutive) or (
                only_if_stale and report.exists()
                and report.stat().st_mtime_ns <= (self.pair_dir / store.MARKER_NAME).stat().st_mtime_ns):
            return None
        from bml_pipeline.report import write_scan_report

        try:
            write_scan_report(foll_dir, prior_dir=base_dir, change_path=self.pair_dir / "change.json")
        except Exception as exc:  # noqa: BLE001 - the change stands; the report failure is recorded
            log.error("report of %s with its prior visit failed: %s\n%s", foll_dir, exc, traceback.format_exc())
            return f"follow-up report: {error_line(exc)}"
        return None


def _marker_digest(run_dir: Path) -> str:
    """Digest of a finished scan's completion marker (its inputs, settings and results)."""
    return hashlib.sha256((run_dir / store.MARKER_NAME).read_bytes()).hexdigest()[:16]
