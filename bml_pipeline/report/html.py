"""The per-scan report: one self-contained HTML file (figures embedded, inline CSS, no network).

``write_scan_report(run_dir)`` reads the run directory, renders figures and tables, and writes
``report.html`` atomically (and ``report.pdf`` with ``pdf=True``). Every string that comes from a
file (paths, DICOM descriptions, flag texts) goes through Jinja2 autoescaping.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bml_pipeline import __version__
from bml_pipeline.errors import InputError
from bml_pipeline.io import atomic_path, write_text_atomic
from bml_pipeline.report import figures, render, viewer
from bml_pipeline.report.quality import quality_flags
from bml_pipeline.report.rundir import RunData, load_run, read_json
from bml_pipeline.report.tables import (
    PLATES,
    alignment_rows,
    bml_rows,
    cartilage_rows,
    change_rows,
    lesions_from_labels,
    lesions_from_measurements,
    mapping,
    pretty,
    structure_rows,
)

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
PDF_NAME = "report.pdf"


def environment():
    """The Jinja2 environment of the report templates (autoescape on, undefined variables are errors)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bml_pipeline.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = format_number
    env.filters["pretty"] = pretty
    return env


def format_number(value: Any, digits: int = 2, signed: bool = False) -> str:
    """``value`` with ``digits`` decimals (``+`` for positive when ``signed``), or "absent"."""
    if value is None:
        return "absent"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def write_scan_report(run_dir: str | Path, *, prior_dir: str | Path | None = None, pdf: bool = False,
                      include_identifiers: bool = False, change_path: str | Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (and ``report.pdf`` when ``pdf``) for one scan.

    Args:
        run_dir: run directory with ``measurements.json`` (labels, image, thickness maps, provenance
            and ``change.json`` are used when present).
        prior_dir: run directory of the same knee's prior visit: its slices are shown beside today's at
            matched positions, and a change table is added.
        pdf: also write ``report.pdf`` (weasyprint).
        include_identifiers: show the full input paths and patient fields found in provenance.
        change_path: ``change.json`` of ``bml-pipeline longitudinal`` comparing the prior visit with this
            one (default: ``run_dir/change.json`` when present); its aligned changes fill the change
            table and its per-bone alignment matches the prior slices.

    Returns:
        Path of ``report.html``.

    Raises:
        InputError: a run directory or its ``measurements.json`` is missing or unreadable.
    """
    started = time.perf_counter()
    run = load_run(run_dir)
    if change_path is not None:
        change = read_json(Path(change_path), required=True, missing="change file not found")
        check_change_matches(Path(change_path), change or {}, run)
        run = replace(run, change=change)
    prior = load_run(prior_dir) if prior_dir is not None else None
    if prior is not None:
        check_same_knee(run, prior)
    html = render_scan_report(run, prior, include_identifiers=include_identifiers)
    target = run.run_dir / REPORT_NAME
    write_text_atomic(target, html)
    log.info("wrote %s (%.1f MB) in %.1f s", target, target.stat().st_size / 1e6, time.perf_counter() - started)
    if pdf:
        started = time.perf_counter()
        write_pdf(html, run.run_dir / PDF_NAME)
        log.info("wrote %s in %.1f s", run.run_dir / PDF_NAME, time.perf_counter() - started)
    return target


def write_pdf(html: str, target: Path) -> Path:
    """Render ``html`` to PDF at ``target`` with weasyprint (atomically). No resource is fetched."""
    logging.getLogger("weasyprint.progress").setLevel(logging.WARNING)  # else one line per step and page
    import weasyprint

    fetcher_class = getattr(weasyprint.urls, "URLFetcher", None)
    if fetcher_class is not None:  # weasyprint >= 66: only the embedded data: URIs may be read
        fetcher: Any = fetcher_class(allowed_protocols=("data",))
    else:
        def fetcher(url: str, *args: Any, **kwargs: Any) -> Any:
            if not url.startswith("data:"):
                raise ValueError(f"report PDFs fetch nothing from the network ({url[:60]})")
            return weasyprint.default_url_fetcher(url, *args, **kwargs)

    document = weasyprint.HTML(string=html, url_fetcher=fetcher)
    with atomic_path(target) as tmp:
        document.write_pdf(str(tmp))
    return target


CHANGE_KEYS = ("same_knee", "bml", "cartilage", "alignment")


def _knee_identity(run: RunData) -> dict[str, str]:
    """What names the knee of a run, where recorded: its side, batch subject and patient id."""
    from bml_pipeline.longitudinal.runs import subject_of

    found = {"side": run.measurements.get("side"), "subject": subject_of(run.provenance)}
    found.update({k.lower(): v for k, v in _identifiers(run.provenance) if k.lower().endswith("patientid")})
    return {k: str(v) for k, v in found.items() if isinstance(v, (str, int)) and str(v)}


def check_same_knee(run: RunData, prior: RunData) -> None:
    """Refuse a prior visit of another knee: side, subject or patient id recorded in both and different."""
    mine, theirs = _knee_identity(run), _knee_identity(prior)
    for key in sorted(set(mine) & set(theirs)):
        if mine[key] != theirs[key]:
            raise InputError(prior.run_dir, f"prior visit is not the same knee: its {key} is {theirs[key]!r}, "
                                            f"this run's is {mine[key]!r}")


def check_change_matches(path: Path, change: dict[str, Any], run: RunData) -> None:
    """Refuse a change file that is not a ``bml-pipeline longitudinal`` result for this run's knee."""
    missing = [k for k in CHANGE_KEYS if not isinstance(change.get(k), dict)]
    if missing:
        raise InputError(path, f"not a change.json of `bml-pipeline longitudinal` (missing {', '.join(missing)})")
    side, own_side = change.get("side"), run.measurements.get("side")
    if isinstance(side, str) and isinstance(own_side, str) and side != own_side:
        raise InputError(path, f"change is of a {side} knee, this run is of a {own_side} knee")


def render_scan_report(run: RunData, prior: RunData | None = None, *, include_identifiers: bool = False) -> str:
    """The report's HTML text for ``run`` (and its ``prior`` visit)."""
    m = run.measurements
    context: dict[str, Any] = {
        "title": "Knee MRI: bone marrow lesions and cartilage",
        "header": header(run, include_identifiers),
        "prior_header": header(prior, include_identifiers) if prior is not None else None,
        "bml": bml_rows(m),
        "bml_total": mapping(m.get("bml")).get("total_volume_cm3"),
        "cartilage": cartilage_rows(m),
        "structures": structure_rows(m),
        "flags": quality_flags(m, run.labels, run.schema, run.notes),
        "qc": {"status": None, "checks": [], "unreliable": [], **mapping(m.get("qc"))},
        "legend": legend(run),
        "change": change_rows(run.change, prior.measurements, m) if prior is not None else None,
        "change_source": "change.json" if run.change else "difference of the two visits' measurements",
        "change_from_file": bool(run.change),
        "alignment": alignment_rows(run.change),
        "version": __version__,
    }
    context.update(_figures(run, prior))
    context["viewer"] = viewer.viewer_context(run, context["thickness_vmax"], context["lesions"])
    return environment().get_template("scan.html").render(**context)


def header(run: RunData, include_identifiers: bool) -> dict[str, Any]:
    """What the report's header says about a scan: input, date, series, side, versions."""
    p, m = run.provenance, run.measurements
    meta = run.image.meta if run.image is not None else (run.labels.meta if run.labels is not None else None)
    source = _input_path(p) or (meta.source if meta else None) or str(run.run_dir)
    date = _find(p, "acquisition_date") or _find(m, "acquisition_date") or (meta.acquisition_date if meta else None)
    series = _find(p, "series_description") or _find(m, "series_description") or (
        meta.series_description if meta else None)
    model = _find(p, "model_id") or _find(p, "model") or _find(p, "engine")
    fields = {
        "input": source if include_identifiers else Path(str(source)).name,
        "run_dir": str(run.run_dir) if include_identifiers else run.run_dir.name,
        "date": _format_date(date),
        "series": series,
        "side": m.get("side") if m.get("side") in ("left", "right") else None,
        "side_source": m.get("side_source") if isinstance(m.get("side_source"), str) else None,
        "pipeline_version": _find(p, "version") or _find(p, "package_version"),
        "model": model if isinstance(model, (str, int, float)) else None,
        "identifiers": _identifiers(p) if include_identifiers else [],
    }
    return fields


def legend(run: RunData) -> list[dict[str, str]]:
    """Colour legend entries (name, CSS colour) for the structures in the schema."""
    # The bone outline is drawn near-white over dark images; its swatch is grey to show on white paper.
    items = [{"name": "Bone outline", "colour": "#9aa3a9"}]
    for s in run.schema.of_kind("cartilage"):
        items.append({"name": pretty(s.name), "colour": render.hex_colour(render.colour_of(run.schema, s.id))})
    items.append({"name": "Bone marrow lesion (BML)", "colour": render.hex_colour(render.PALETTE["lesion"])})
    return items


def _figures(run: RunData, prior: RunData | None) -> dict[str, Any]:
    out: dict[str, Any] = {"slices": [], "lesion_maps": [], "lesions": [], "thickness": [], "background": None,
                           "thickness_vmax": None, "colour_bar": None}
    if run.labels is None:
        out["lesions"] = _flat(lesions_from_measurements(run.measurements) or {})
        return out
    scene = figures.Scene(run.labels, run.image, run.schema)
    prior_scene = figures.Scene(prior.labels, prior.image, prior.schema) if prior and prior.labels is not None else None
    lesions = lesions_from_measurements(run.measurements) or lesions_from_labels(run.labels, run.schema)
    transforms = alignment_matrices(run.change, prior) if prior is not None else {}
    specs = figures.lesion_specs(scene, lesions) + figures.compartment_specs(scene, run.measurements.get("side"))
    for spec in specs:
        current = scene.render_slice(spec, np.asarray(spec.point_mm))
        if current is None:
            continue
        row = {"current": current, "prior": None, "match": None}
        if prior_scene is not None:
            matched = figures.matched_point(spec, scene, prior_scene, transforms)
            if matched is not None:
                row["prior"], row["match"] = prior_scene.render_slice(spec, matched[0]), matched[1]
        out["slices"].append(row)
    out["lesion_maps"] = figures.lesion_maps(scene, lesions)
    out["lesions"] = _flat(lesions)
    out["background"] = scene.background
    vmax = figures.thickness_vmax([run] + ([prior] if prior is not None else []))
    plates = [s.name for s in run.schema.of_kind("cartilage")] or list(PLATES)
    out["thickness"] = [{"plate": plate, "current": figures.thickness_map(run, plate, vmax, scene),
                         "prior": figures.thickness_map(prior, plate, vmax, prior_scene) if prior is not None else None}
                        for plate in plates]
    if any(t["current"] or t["prior"] for t in out["thickness"]):
        out["thickness_vmax"] = vmax
        out["colour_bar"] = figures.colour_bar_uri()
    return out


def alignment_matrices(change: dict[str, Any] | None, prior: RunData) -> dict[str, np.ndarray]:
    """Bone -> 4x4 prior-to-current matrix from ``change.json``'s alignment, when that file compares
    with ``prior`` (its baseline labels are the prior run's, or it does not say)."""
    change = mapping(change)
    baseline = mapping(change.get("baseline")).get("labels")
    prior_source = prior.labels.meta.source if prior.labels is not None else None
    if isinstance(baseline, str) and prior_source and Path(baseline).resolve() != Path(prior_source).resolve():
        return {}
    out = {}
    for bone, entry in mapping(change.get("alignment")).items():
        try:
            matrix = np.asarray(mapping(entry).get("matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if matrix.shape == (4, 4) and np.all(np.isfinite(matrix)) and abs(np.linalg.det(matrix[:3, :3])) > 1e-6:
            out[str(bone)] = matrix
    return out


def _flat(lesions: dict[str, list[Any]]) -> list[Any]:
    return [lesion for items in lesions.values() for lesion in items]


def _input_path(provenance: dict[str, Any]) -> str | None:
    """The scan's input as recorded in provenance: the image, else the label map."""
    inputs = mapping(provenance.get("inputs"))
    for key in ("image", "labels"):
        path = mapping(inputs.get(key)).get("path")
        if isinstance(path, str) and path:
            return path
    return None


def _find(data: Any, key: str) -> Any:
    """The first value stored under ``key`` anywhere in nested dicts (breadth first), or None."""
    queue = [data]
    while queue:
        item = queue.pop(0)
        if isinstance(item, dict):
            if item.get(key) not in (None, ""):
                return item[key]
            queue.extend(v for v in item.values() if isinstance(v, dict))
    return None


def _identifiers(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(key, value) of fields named ``patient*`` anywhere in ``data``."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            if str(key).lower().startswith("patient") and isinstance(value, (str, int, float)):
                found.append((f"{prefix}{key}", str(value)))
            else:
                found += _identifiers(value, f"{prefix}{key}.")
    return found


def _format_date(value: Any) -> str | None:
    """DICOM ``YYYYMMDD`` as ``YYYY-MM-DD``; other strings unchanged."""
    if not isinstance(value, (str, int)):
        return None
    text = str(value)
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text
