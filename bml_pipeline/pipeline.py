"""The per-scan job: inputs -> (segmentation) -> measurements -> report, in one run directory.

:func:`process_scan` is what ``run``, ``batch`` and ``demo`` call for one scan. It reads the inputs,
segments the image when no label map is given (with a predictor loaded once per process, see
:func:`load_predictor`), measures, writes the run directory and the per-scan report, and returns a small
:class:`ScanResult`. Bad input raises :class:`~bml_pipeline.errors.InputError`; the batch runner turns
any exception into a recorded failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bml_pipeline.errors import InputError
from bml_pipeline.volume import Volume

if TYPE_CHECKING:
    from bml_pipeline.measure import MeasureConfig

log = logging.getLogger(__name__)

NO_MODEL = "no labels and no segmentation model available"
DEFAULT_MODEL = "knee_coarse_v2"
"""Bones and cartilage plates; it has no lesion classes, so segmented scans report BML as not measured
(QC ``not_segmented``) until the cascade's fine stage is trained (training/README.md)."""


@dataclass(frozen=True)
class ScanResult:
    """What one processed scan leaves behind.

    Attributes:
        run_dir: folder holding the scan's outputs.
        row: the flat measurement row (``Measurements.flat_row()``), JSON-ready.
        segmented: True when the labels were predicted rather than given.
        timings_s: seconds per stage (read, segment, measure, report).
        qc_summary: one line, the label map's quality control (see :mod:`bml_pipeline.qc`).
    """

    run_dir: Path
    row: dict[str, Any]
    segmented: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    qc_summary: str = ""


@lru_cache(maxsize=2)
def load_predictor(model: str, device: str) -> Any:
    """The segmentation predictor for ``model`` on ``device``, loaded once per process and reused.

    Raises:
        InputError: "no labels and no segmentation model available" when the model cannot be found.
    """
    try:
        from bml_pipeline.segment import Predictor, resolve_device
    except ImportError:
        raise InputError(model, f"{NO_MODEL} (segmentation stage not installed)") from None
    resolve_device(device)  # an unknown or absent device is its own error, not a missing model
    log.info("loading segmentation model %s on %s", model, device)
    try:
        return Predictor.load(model, device)
    except InputError as exc:
        raise InputError(exc.path, f"{NO_MODEL} ({exc.problem})") from None


def process_scan(
    run_dir: str | Path,
    *,
    image: str | Path | None = None,
    labels: str | Path | None = None,
    side: str | None = None,
    model: str | None = None,
    device: str = "auto",
    tta: bool = False,
    schema: str = "oai_zib",
    config: MeasureConfig | None = None,
    report: bool = True,
    extra_provenance: dict[str, Any] | None = None,
    dicom_export: bool = True,
    series: str | None = None,
    acquisition_date: str | None = None,
) -> ScanResult:
    """Measure one scan and write its run directory.

    Writes ``labels.nii.gz`` with its colour tables ``labels.ctbl`` and ``labels_itksnap.txt`` (when
    segmented), ``measurements.json``/``.csv``, ``provenance.json``, ``thickness_<plate>.nii.gz``,
    ``report.html`` (unless ``report`` is False), and for DICOM input a DICOM SEG and SR. The folder is
    replaced as a whole: whatever ``run_dir`` held before is gone (commands check it first with
    :func:`bml_pipeline.io.outdir.check_output_dir`).

    Args:
        run_dir: output folder (created).
        image: MR image (file or DICOM directory); optional when ``labels`` is given.
        labels: label map on the image's grid; when absent the image is segmented with ``model``.
        side: ``"left"``/``"right"`` when known; None: from the image metadata, else from anatomy.
        model: segmentation model name or weights path, used only when ``labels`` is None (None: the
            shipped default, :data:`DEFAULT_MODEL`).
        device: torch device for segmentation (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        tta: average the segmentation with its medial-lateral mirror (test-time augmentation).
        schema: label schema name or YAML path.
        config: measurement configuration (None: the packaged defaults).
        report: write ``report.html``.
        extra_provenance: further entries for ``provenance.json`` (e.g. batch subject and visit).
        series: the DICOM series instance UID to read when the image folder holds several.
        acquisition_date: ``YYYY-MM-DD`` when known (a manifest's ``date``); else the image's own date
            (DICOM), else unknown. Recorded in provenance; the longitudinal stage turns two into an
            interval and changes per year.
        dicom_export: when the image is a DICOM series, also write ``labels_seg.dcm`` (DICOM SEG) and
            ``measurements_sr.dcm`` (TID 1500 SR) referencing it (needs ``highdicom``; docs/export.md).

    Raises:
        InputError: missing or corrupt inputs, labels off the image grid, no labels and no model,
            label maps the measurement rejects (no bone, lesion outside its bone ...).
    """
    from bml_pipeline.export import (
        dicom_export_available,
        write_colour_tables,
        write_dicom_seg,
        write_dicom_sr,
        write_label_nifti,
    )
    from bml_pipeline.io import read_labels, read_volume
    from bml_pipeline.io.outdir import staged_dir
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure import load_measure_config, measure_labels, write_measurements
    from bml_pipeline.provenance import provenance_record

    run_dir = Path(run_dir)
    if image is None and labels is None:
        raise InputError(run_dir, "neither an image nor a label map was given")
    label_schema = load_schema(schema)
    given_date = iso_date(acquisition_date, run_dir)  # a bad date is refused before any work
    config = config or load_measure_config()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volume: Volume | None = read_volume(image, series_uid=series) if image is not None else None
    label_map = read_labels(labels, label_schema) if labels is not None else None
    timings["read"] = time.perf_counter() - t0

    model_record: dict[str, Any] | None = None
    if label_map is None:
        assert volume is not None
        t0 = time.perf_counter()
        predictor = load_predictor(model or DEFAULT_MODEL, device)
        label_map = predictor.segment(volume, tta=tta)
        timings["segment"] = time.perf_counter() - t0
        model_record = predictor.provenance
        log.info("segmented %s with %s in %.1f s", image, model_record.get("model_id"), timings["segment"])

    measurements = measure_labels(label_map, label_schema, side=side, image=volume, config=config,
                                  segmentation_quality=model_record.get("quality") if model_record else None)
    timings.update(measurements.timings_s)
    date = given_date or _image_date(volume)
    extra = {"side": measurements.side.to_dict(), "model": model_record, "acquisition_date": date,
             **(extra_provenance or {})}
    provenance = provenance_record(
        step="pipeline", inputs={"image": image, "labels": labels},
        config={"measure": config.to_dict(), "label_schema": label_schema.name}, timings_s=timings, extra=extra)
    # Written only once the measurement succeeded, into a staging folder that then replaces run_dir as a
    # whole: no partial output, and nothing from an earlier run in that folder survives.
    with staged_dir(run_dir) as staging:
        if model_record is not None:
            write_label_nifti(label_map, staging / "labels.nii.gz", intent_name=label_schema.name)
            write_colour_tables(staging / "labels.nii.gz", label_schema)
        write_measurements(staging, measurements, provenance)
        if dicom_export and volume is not None and volume.meta.extra.get("series_uid") and dicom_export_available():
            t0 = time.perf_counter()
            source = Path(image) if Path(image).is_dir() else Path(image).parent  # type: ignore[arg-type]
            model_id = model_record.get("model_id") if model_record else None
            seg = write_dicom_seg(label_map, source, label_schema, staging / "labels_seg.dcm",
                                  automatic=model_record is not None, algorithm_name=str(model_id or "expert labels"))
            write_dicom_sr(measurements.to_dict(), source, staging / "measurements_sr.dcm", schema=label_schema,
                           series_uid=volume.meta.extra["series_uid"], seg_path=seg)
            timings["dicom_export"] = time.perf_counter() - t0

    if report:
        from bml_pipeline.report import write_scan_report

        t0 = time.perf_counter()
        write_scan_report(run_dir)
        timings["report"] = time.perf_counter() - t0
    log.info("measured %s: %s", run_dir, ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return ScanResult(run_dir, measurements.flat_row(), model_record is not None,
                      {k: round(v, 3) for k, v in timings.items()},
                      measurements.qc.summary() if measurements.qc is not None else "")


def iso_date(value: str | None, source: str | Path | None = None) -> str | None:
    """``YYYY-MM-DD`` from an ISO date or a DICOM ``YYYYMMDD`` date; None when absent.

    Raises:
        InputError: a date that is neither.
    """
    import datetime as dt

    if not value:
        return None
    text = str(value).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date().isoformat()
        except ValueError:
            continue
    raise InputError(source, f"acquisition date {text!r} is not YYYY-MM-DD (or DICOM YYYYMMDD)")


def _image_date(volume: Volume | None) -> str | None:
    """The image's own acquisition date (DICOM), as ISO; None when absent or unreadable."""
    try:
        return iso_date(volume.meta.acquisition_date if volume is not None else None)
    except InputError:
        return None
