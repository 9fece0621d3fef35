"""What a batch worker runs for one scan: resume check, per-scan log, the scan, completion marker.

:func:`run_task` never raises for a failing scan: the failure comes back as a :class:`ScanOutcome` with
a one-line reason, so one bad scan never stops a batch. It runs in worker processes (local pool or Dask),
so everything it receives and returns is picklable.

A finished scan's marker records the SHA-256 of every file the scan wrote, so a resumed batch recomputes
a scan whose outputs were deleted or changed since (:func:`bml_pipeline.batch.store.finished_row`).
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from bml_pipeline.batch import store
from bml_pipeline.batch.manifest import ScanSpec
from bml_pipeline.errors import InputError
from bml_pipeline.provenance import sha256_path

log = logging.getLogger(__name__)

LOG_NAME = "scan.log"
SCAN_OUTPUTS = ("labels.nii.gz", "measurements.json", "measurements.csv", "provenance.json", "report.html")
"""Files a scan writes besides its log, marker and ``thickness_<plate>.nii.gz`` maps; removed when the
scan fails."""


@dataclass(frozen=True)
class BatchSettings:
    """Settings shared by every scan of a batch (those that change results enter the resume digest).

    Attributes:
        schema: label schema name or YAML path.
        config_file: YAML config whose ``measure`` section is used (None: packaged defaults).
        model: segmentation model for rows without labels and without their own ``model`` (None: the
            pipeline's default model).
        device: torch device for segmentation.
        report: write the per-scan ``report.html`` and the ``cohort_report.html``.
    """

    schema: str = "oai_zib"
    config_file: str | None = None
    model: str | None = None
    device: str = "auto"
    report: bool = True
    layout: str = "default"
    """Run-folder layout: "default" (``<subject>/<visit>``) or "bids" (``sub-<id>/ses-<visit>``)."""


ScanFunction = Callable[[ScanSpec, Path, BatchSettings, dict[str, Any]], dict[str, Any]]
"""``(spec, run_dir, settings, provenance) -> flat measurement row``; writes the run directory."""


@dataclass(frozen=True)
class ScanOutcome:
    """Result of one job: ``status`` is ``"done"``, ``"skipped"`` (finished earlier) or ``"failed"``.

    ``visit`` is the scan's visit, or ``"<baseline>-><followup>"`` for a visit pair. ``seconds`` is the
    job's wall time in its worker, ``cpu_seconds`` the worker process's CPU time over the job.
    """

    subject: str
    visit: str
    status: str
    row: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0


class Job(Protocol):
    """What executors run: a picklable unit of work with a unique key."""

    @property
    def key(self) -> tuple[str, str]: ...

    @property
    def model(self) -> str | None:
        """The segmentation model the job loads, None when it needs none (no GPU)."""

    def execute(self, device: str | None = None) -> ScanOutcome:
        """Run in a worker (on ``device`` when given); never raises for bad input."""

    def failed(self, reason: str) -> ScanOutcome:
        """The outcome recorded when the job's worker died."""

    def cleanup(self) -> None:
        """Remove what the job left half-written when it was stopped (called after an interruption)."""


@dataclass(frozen=True)
class ScanTask:
    """One unit of batch work: a scan, where it goes, and how it is processed."""

    spec: ScanSpec
    run_dir: Path
    settings: BatchSettings
    resume: bool
    scan_fn: ScanFunction | None = None  # None: the real pipeline (pipeline_scan)

    @property
    def key(self) -> tuple[str, str]:
        return self.spec.key

    @property
    def model(self) -> str | None:
        return model_for(self.spec, self.settings)

    def execute(self, device: str | None = None) -> ScanOutcome:
        task = self if device in (None, self.settings.device) else \
            replace(self, settings=replace(self.settings, device=device))
        return run_task(task)

    def failed(self, reason: str) -> ScanOutcome:
        return ScanOutcome(self.spec.subject, self.spec.visit, "failed", None, reason)

    def cleanup(self) -> None:
        """Remove what an interrupted run of this job left half-written (temporary files of atomic
        writes); its completion marker is written last, so the scan is recomputed on resume."""
        store.remove_partial(self.run_dir)


def pipeline_scan(spec: ScanSpec, run_dir: Path, settings: BatchSettings,
                  provenance: dict[str, Any]) -> dict[str, Any]:
    """The real per-scan job: :func:`bml_pipeline.pipeline.process_scan` for a manifest row."""
    from bml_pipeline.measure import load_measure_config
    from bml_pipeline.pipeline import process_scan

    result = process_scan(run_dir, image=spec.image, labels=spec.labels, side=spec.side, series=spec.series,
                          acquisition_date=spec.date,
                          model=spec.model or settings.model, device=settings.device, schema=settings.schema,
                          config=load_measure_config(settings.config_file), report=settings.report,
                          extra_provenance=provenance)
    return result.row


def settings_for(spec: ScanSpec, settings: BatchSettings) -> dict[str, Any]:
    """The settings that determine a scan's results (its resume digest covers exactly these)."""
    from bml_pipeline import __version__
    from bml_pipeline.measure import load_measure_config

    return {"version": __version__, "schema": settings.schema, "model": model_for(spec, settings),
            "measure": load_measure_config(settings.config_file).to_dict(), "side": spec.side,
            "series": spec.series, "date": spec.date, "report": settings.report}


def model_for(spec: ScanSpec, settings: BatchSettings) -> str | None:
    """The segmentation model a scan uses; None when it has labels."""
    from bml_pipeline.pipeline import DEFAULT_MODEL

    return None if spec.labels is not None else spec.model or settings.model or DEFAULT_MODEL


def run_task(task: ScanTask) -> ScanOutcome:
    """Process one scan (or reuse its finished outputs when resuming); never raises for a bad scan."""
    spec, run_dir = task.spec, task.run_dir
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        checksums = {role: sha256_path(p) for role, p in (("image", spec.image), ("labels", spec.labels))
                     if p is not None}
        digest = store.settings_digest(settings_for(spec, task.settings))
    except OSError as exc:
        return _failed(spec, f"{exc.filename or spec.image or spec.labels}: cannot read input ({exc.strerror})",
                       start)
    except InputError as exc:
        return _failed(spec, error_line(exc), start)
    if task.resume:
        row = store.finished_row(run_dir, checksums, digest)
        if row is not None:
            return ScanOutcome(spec.subject, spec.visit, "skipped", row, None, time.perf_counter() - start)

    run_dir.mkdir(parents=True, exist_ok=True)
    store.clear_marker(run_dir)
    store.remove_partial(run_dir)  # left by a run killed mid-write
    before = store.snapshot(run_dir)
    handler = attach_log(run_dir / LOG_NAME)
    try:
        log.info("scan %s %s: image=%s labels=%s side=%s", spec.subject, spec.visit, spec.image, spec.labels,
                 spec.side)
        provenance = {"batch": {"subject": spec.subject, "visit": spec.visit, **asdict(task.settings)}}
        scan_fn = task.scan_fn or pipeline_scan
        row = {"subject": spec.subject, "visit": spec.visit, **scan_fn(spec, run_dir, task.settings, provenance)}
        outputs = store.output_checksums(run_dir, store.written_since(run_dir, before, exclude=(LOG_NAME,)))
        store.write_marker(run_dir, checksums, digest, row, outputs)
        log.info("scan %s %s finished in %.2f s", spec.subject, spec.visit, time.perf_counter() - start)
        return ScanOutcome(spec.subject, spec.visit, "done", row, None, time.perf_counter() - start,
                           time.process_time() - cpu_start)
    except Exception as exc:  # noqa: BLE001 - every failure of one scan is recorded, the batch goes on
        log.error("scan %s %s failed: %s\n%s", spec.subject, spec.visit, error_line(exc),
                  plain_text(traceback.format_exc()))
        for name in SCAN_OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        for path in run_dir.glob("thickness_*.nii.gz"):
            path.unlink()
        return _failed(spec, error_line(exc), start)
    finally:
        detach_log(handler)


def error_line(exc: BaseException) -> str:
    """A one-line reason for a failure: the message of an InputError, else ``Type: message``; numbers
    written plainly (:func:`plain_text`)."""
    text = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
    return one_line(text)


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, numbers written plainly, at most ``limit`` characters."""
    text = plain_text(" ".join(text.split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


# numpy >= 2 scalar reprs inside messages: np.float64(0.0), np.int64(3), np.str_('a'), np.True_ ...
_NUMPY_SCALAR = re.compile(r"\b(?:np|numpy)\.(?:float|int|uint|complex|longdouble|double|single|half|longlong|"
                           r"ulonglong|intc|uintc|short|ushort|byte|ubyte|str_|bytes_|bool_?)\w*\(([^()]*)\)")
_NUMPY_BOOL = re.compile(r"\b(?:np|numpy)\.(True|False)_")


def plain_text(text: str) -> str:
    """``text`` with numpy scalar reprs (``np.float64(0.0)``, ``np.True_``) replaced by their plain
    values (``0.0``, ``True``), as messages made from containers of numpy numbers show them."""
    return _NUMPY_BOOL.sub(r"\1", _NUMPY_SCALAR.sub(r"\1", text))


def _failed(spec: ScanSpec, reason: str, start: float) -> ScanOutcome:
    return ScanOutcome(spec.subject, spec.visit, "failed", None, one_line(reason), time.perf_counter() - start)


def attach_log(path: Path) -> logging.Handler:
    """Send this thread's ``bml_pipeline`` log records to ``path`` (overwritten) until :func:`detach_log`."""
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    package_logger = logging.getLogger("bml_pipeline")
    if multiprocessing.parent_process() is not None and package_logger.getEffectiveLevel() > logging.INFO:
        package_logger.setLevel(logging.INFO)  # a worker process: its logging is ours to set
    package_logger.addHandler(handler)
    return handler


def detach_log(handler: logging.Handler) -> None:
    logging.getLogger("bml_pipeline").removeHandler(handler)
    handler.close()
