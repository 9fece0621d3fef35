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
from typing import Any

from bml_pipeline.errors import InputError
from bml_pipeline.volume import Volume

log = logging.getLogger(__name__)

NO_MODEL = "no labels and no segmentation model available"


@dataclass(frozen=True)
class ScanResult:
    """What one processed scan leaves behind.

    Attributes:
        run_dir: folder holding the scan's outputs.
        row: the flat measurement row (``Measurements.flat_row()``), JSON-ready.
        segmented: True when the labels were predicted rather than given.
        timings_s: seconds per stage (read, segment, measure, report).
    """

    run_dir: Path
    row: dict[str, Any]
    segmented: bool
    timings_s: dict[str, float] = field(default_factory=dict)


@lru_cache(maxsize=2)
def load_predictor(model: str, device: str) -> Any:
    """The segmentation predictor for ``model`` on ``device``, loaded once per process and reused.

    Raises:
        InputError: when the segmentation stage or the model is not available.
    """
    try:
        from bml_pipeline.segment import Predictor  # type: ignore[attr-defined]
    except ImportError:
        raise InputError(model, f"{NO_MODEL} (segmentation stage not installed)") from None
    log.info("loading segmentation model %s on %s", model, device)
    return Predictor.from_name(model, device)


def process_scan(
    run_dir: str | Path,
    *,
    image: str | Path | None = None,
    labels: str | Path | None = None,
    side: str | None = None,
    model: str | None = None,
    device: str = "cpu",
    schema: str = "oai_zib",
    config: Any = None,
    report: bool = True,
    provenance: dict[str, Any] | None = None,
) -> ScanResult:
    """Measure one scan and write its run directory.

    Args:
        run_dir: output folder (created).
        image: MR image (file or DICOM directory); optional when ``labels`` is given.
        labels: label map on the image's grid; when absent the image is segmented with ``model``.
        side: ``"left"``/``"right"``; overrides the side stored in the image, None keeps it.
        model: segmentation model name or path, used only when ``labels`` is None.
        device: torch device for segmentation (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        schema: label schema name or YAML path.
        config: measurement configuration passed to ``measure_labels`` (None: defaults).
        report: write ``report.html``.
        provenance: extra provenance entries (e.g. input checksums) stored with the measurements.

    Raises:
        InputError: missing or corrupt inputs, labels off the image grid, no labels and no model.
    """
    from bml_pipeline.io import read_labels, read_volume, write_nifti
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure import measure_labels, write_measurements

    run_dir = Path(run_dir)
    if image is None and labels is None:
        raise InputError(run_dir, "neither an image nor a label map was given")
    label_schema = load_schema(schema)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volume: Volume | None = read_volume(image, laterality=side) if image is not None else None
    label_map: Volume | None = None
    if labels is not None:
        label_map = read_labels(labels, label_schema)
        if volume is not None:
            volume.require_same_grid(label_map, "image and label map")
    timings["read"] = time.perf_counter() - t0
    if side is None and volume is not None:
        side = volume.meta.laterality

    segmented = label_map is None
    if label_map is None:
        assert volume is not None
        if model is None:
            raise InputError(image, NO_MODEL)
        t0 = time.perf_counter()
        label_map = load_predictor(model, device).segment(volume)
        timings["segment"] = time.perf_counter() - t0
        write_nifti(label_map, run_dir / "labels.nii.gz", dtype="uint16")
        log.info("segmented %s with %s in %.1f s", image, model, timings["segment"])

    t0 = time.perf_counter()
    measurements = measure_labels(label_map, label_schema, side=side, image=volume, config=config)
    timings["measure"] = time.perf_counter() - t0
    record = dict(provenance or {})
    record.update({"model": model if segmented else None, "timings_s": _rounded(timings)})
    write_measurements(run_dir, measurements, record)

    if report:
        from bml_pipeline.report import write_scan_report

        t0 = time.perf_counter()
        write_scan_report(run_dir)
        timings["report"] = time.perf_counter() - t0
    log.info("measured %s in %s", run_dir, ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return ScanResult(run_dir, measurements.flat_row(), segmented, _rounded(timings))


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timings.items()}
