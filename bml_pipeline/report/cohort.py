"""The cohort report: one self-contained HTML page for a batch (``cohort_report.html``).

Shows the distribution of BML volume and mean cartilage thickness over scans, baseline against
follow-up per knee, a waterfall of each knee's BML change, the failures and the cohort statistics.
Columns are found by name (see :data:`BML_TOTAL_COLUMNS` and :func:`thickness_columns`), so tables
with extra or missing columns still give a report; what is missing is said, not invented.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from bml_pipeline import __version__
from bml_pipeline.io import write_text_atomic
from bml_pipeline.report import render
from bml_pipeline.report.tables import number, pretty

log = logging.getLogger(__name__)

REPORT_NAME = "cohort_report.html"
BML_TOTAL_COLUMNS = ("bml.total_volume_cm3", "bml_total_volume_cm3", "bml_total_cm3", "bml_volume_cm3")
PLATES = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")
WORSE = "#d55e00"   # vermillion: BML growth, cartilage loss
BETTER = "#0072b2"  # blue: the opposite
NEUTRAL = "#7f8c95"
_PLATE_COLOURS = {p: render.hex_colour(render.PALETTE[p]) for p in PLATES}


def write_cohort_report(out_dir: str | Path, cohort: Any, changes: Any, errors: Any, stats: Any) -> Path:
    """Write ``out_dir/cohort_report.html`` (atomically) and return its path.

    Args:
        out_dir: the batch output folder (links to per-scan reports are relative to it).
        cohort: one row per scan (``cohort.csv``): ``subject``, ``visit`` and measurement columns.
        changes: one row per knee and visit pair (``changes.csv``, ``change_row`` columns).
        errors: one row per failure (``errors.csv``: subject, visit, stage, error).
        stats: cohort statistics: a DataFrame (one row per measure), a list of row dicts, or a dict
            of measure -> dict of statistics (or of name -> value).
    """
    out_dir = Path(out_dir)
    cohort, changes, errors = (_frame(t) for t in (cohort, changes, errors))
    html = render_cohort_report(out_dir, cohort, changes, errors, stats_rows(stats))
    target = out_dir / REPORT_NAME
    write_text_atomic(target, html)
    log.info("wrote %s (%d scans, %d pairs, %d failures)", target, len(cohort), len(changes), len(errors))
    return target


def render_cohort_report(out_dir: Path, cohort: Any, changes: Any, errors: Any,
                         stats: tuple[list[str], list[dict[str, Any]]]) -> str:
    """The cohort report's HTML text."""
    from bml_pipeline.report.html import environment

    bml_col = next((c for c in BML_TOTAL_COLUMNS if c in cohort.columns), None)
    thickness = thickness_columns(list(cohort.columns))
    waterfall_col = next((c for c in ("bml_total_delta_cm3",) if c in changes.columns), None)
    sdc = _sdc(stats[1], waterfall_col)
    context = {
        "title": "Cohort report: bone marrow lesions and cartilage",
        "version": __version__,
        "counts": {"scans": len(cohort), "subjects": _n_unique(cohort, "subject"), "pairs": len(changes),
                   "failures": len(errors)},
        "distributions": distribution_figure(cohort, bml_col, thickness),
        "scatter": baseline_followup_figure(changes),
        "waterfall": waterfall_figure(changes, waterfall_col, sdc),
        "waterfall_summary": _direction_counts(changes, waterfall_col, sdc),
        "sdc": sdc,
        "errors": _records(errors),
        "error_columns": list(errors.columns),
        "stats_columns": stats[0],
        "stats": stats[1],
        "scans": scan_rows(out_dir, cohort, bml_col, thickness),
        "thickness_columns": thickness,
        "bml_column": bml_col,
    }
    return environment().get_template("cohort.html").render(**context)


def thickness_columns(columns: list[str]) -> dict[str, str]:
    """Plate -> the column holding its mean thickness (mm), for the plates the table has."""
    found = {}
    for plate in PLATES:
        pattern = re.compile(rf"{plate}[._].*thickness.*mean|{plate}[._].*mean.*thickness")
        match = next((c for c in columns if pattern.search(c) and not re.search("delta|subregion|baseline|followup", c)),
                     None)
        if match:
            found[plate] = match
    return found


def stats_rows(stats: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the statistics table from a DataFrame, a list of dicts or a dict."""
    if stats is None:
        return [], []
    if hasattr(stats, "to_dict") and hasattr(stats, "columns"):
        rows = stats.to_dict(orient="records")
    elif isinstance(stats, list):
        rows = [r if isinstance(r, dict) else getattr(r, "to_dict", dict)() for r in stats]
    elif isinstance(stats, dict):
        if all(isinstance(v, dict) for v in stats.values()):
            rows = [{"measure": k, **v} for k, v in stats.items()]
        else:
            rows = [{"statistic": k, "value": v} for k, v in stats.items()]
    else:
        raise TypeError(f"cohort statistics must be a DataFrame, list or dict, not {type(stats).__name__}")
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    return columns, rows


def scan_rows(out_dir: Path, cohort: Any, bml_col: str | None, thickness: dict[str, str]) -> list[dict[str, Any]]:
    """Per scan: ids, BML volume, mean thicknesses and the relative link to its report when it exists."""
    rows = []
    for record in _records(cohort):
        subject, visit = str(record.get("subject", "")), str(record.get("visit", ""))
        links = [f"{subject}/{visit}/report.html", f"sub-{subject}/ses-{visit}/report.html"]  # either layout
        link = next((candidate for candidate in links if (out_dir / candidate).is_file()), links[0])
        rows.append({"subject": subject, "visit": visit, "side": record.get("side"),
                     "bml": number(record.get(bml_col)) if bml_col else None,
                     "thickness": {p: number(record.get(c)) for p, c in thickness.items()},
                     "link": link if subject and (out_dir / link).is_file() else None})
    return rows


def distribution_figure(cohort: Any, bml_col: str | None, thickness: dict[str, str]) -> str | None:
    """Histograms: total BML volume per scan, and mean thickness per plate."""
    panels = []
    if bml_col:
        panels.append(("Total BML volume per scan", "BML volume (cm³)", {"BML": _values(cohort, bml_col)},
                       {"BML": render.hex_colour(render.PALETTE["lesion"])}))
    if thickness:
        panels.append(("Mean cartilage thickness per scan", "mean thickness (mm)",
                       {pretty(p): _values(cohort, c) for p, c in thickness.items()},
                       {pretty(p): _PLATE_COLOURS[p] for p in thickness}))
    panels = [p for p in panels if any(len(v) for v in p[2].values())]
    if not panels:
        return None
    fig, axes = _figure(len(panels), (5.2, 3.2))
    for ax, (title, xlabel, series, colours) in zip(axes, panels):
        everything = np.concatenate([v for v in series.values() if len(v)])
        bins = np.histogram_bin_edges(everything, bins=min(20, max(5, int(math.sqrt(everything.size)) + 1)))
        for name, values in series.items():
            if len(values):
                ax.hist(values, bins=bins, alpha=0.75 if len(series) > 1 else 0.9, color=colours[name],
                        label=f"{name} (n={len(values)})", edgecolor="white", linewidth=0.6)
        ax.set_title(title, loc="left")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("scans")
        ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def baseline_followup_figure(changes: Any) -> str | None:
    """Follow-up against baseline per knee (identity line dashed): BML volume and mean thickness."""
    panels = []
    if {"bml_total_baseline_cm3", "bml_total_followup_cm3"} <= set(changes.columns):
        panels.append(("BML volume per knee", "cm³", {"BML": ("bml_total_baseline_cm3", "bml_total_followup_cm3")},
                       {"BML": render.hex_colour(render.PALETTE["lesion"])}))
    plates = {pretty(p): (f"cartilage_{p}_common_region_thickness_mean_baseline_mm",
                          f"cartilage_{p}_common_region_thickness_mean_followup_mm") for p in PLATES}
    plates = {k: v for k, v in plates.items() if set(v) <= set(changes.columns)}
    if plates:
        panels.append(("Mean cartilage thickness per knee (region both visits cover)", "mm", plates,
                       {pretty(p): _PLATE_COLOURS[p] for p in PLATES}))
    drawn = []
    for title, unit, series, colours in panels:
        pairs = {name: _pairs(changes, *cols) for name, cols in series.items()}
        if any(len(b) for b, _ in pairs.values()):
            drawn.append((title, unit, pairs, colours))
    if not drawn:
        return None
    fig, axes = _figure(len(drawn), (4.2, 3.8))
    for ax, (title, unit, pairs, colours) in zip(axes, drawn):
        lo = min(float(min(b.min(), f.min())) for b, f in pairs.values() if len(b))
        hi = max(float(max(b.max(), f.max())) for b, f in pairs.values() if len(b))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", lw=1, color=NEUTRAL, label="no change")
        for name, (b, f) in pairs.items():
            if len(b):
                ax.scatter(b, f, s=22, color=colours[name], alpha=0.85, label=f"{name} (n={len(b)})",
                           edgecolors="white", linewidths=0.5)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_title(title, loc="left")
        ax.set_xlabel(f"baseline ({unit})")
        ax.set_ylabel(f"follow-up ({unit})")
        ax.legend(frameon=False, fontsize=8, loc="best")
    return _png(fig)


def waterfall_figure(changes: Any, column: str | None, sdc: float | None) -> str | None:
    """One bar per knee and visit pair, sorted by change; colour and sign mark the direction."""
    if column is None:
        return None
    values = _values(changes, column)
    if not len(values):
        return None
    order = np.sort(values)[::-1]
    colours = [WORSE if v > 0 else BETTER if v < 0 else NEUTRAL for v in order]
    fig, (ax,) = _figure(1, (min(10.0, max(6.0, 3.0 + 0.12 * len(order))), 3.4))
    ax.bar(np.arange(len(order)), order, color=colours, width=0.85)
    ax.axhline(0, color="#333333", lw=0.8)
    if sdc:
        for y in (sdc, -sdc):
            ax.axhline(y, color=NEUTRAL, lw=1, ls=":")
        ax.text(len(order) - 0.5, sdc, f" ±SDC {sdc:.3g} cm³", va="bottom", ha="right", fontsize=8, color=NEUTRAL)
    ax.set_xticks([])
    ax.set_xlabel(f"knees and visit pairs, sorted by change (n={len(order)})")
    ax.set_ylabel("BML volume change (cm³)")
    ax.set_title("Total BML volume change per knee", loc="left")
    return _png(fig)


def _figure(n: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * n, size[1]), dpi=110, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
        ax.title.set_fontsize(10)
        ax.xaxis.label.set_fontsize(9)
        ax.yaxis.label.set_fontsize(9)
    return fig, axes


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _frame(table: Any) -> Any:
    import pandas as pd

    if table is None:
        return pd.DataFrame()
    return table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)


def _values(table: Any, column: str) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    return values[np.isfinite(values)]


def _pairs(table: Any, base: str, follow: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    b = pd.to_numeric(table[base], errors="coerce").to_numpy(dtype=np.float64)
    f = pd.to_numeric(table[follow], errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(b) & np.isfinite(f)
    return b[ok], f[ok]


def _records(table: Any) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in table.to_dict(orient="records")]


def _n_unique(table: Any, column: str) -> int | None:
    return int(table[column].nunique()) if column in table.columns else None


def _sdc(rows: list[dict[str, Any]], column: str | None) -> float | None:
    for row in rows:
        if column and row.get("measure") == column:
            return number(row.get("sdc"))
    return None


def _direction_counts(changes: Any, column: str | None, sdc: float | None) -> dict[str, int] | None:
    if column is None:
        return None
    values = _values(changes, column)
    if not len(values):
        return None
    counts = {"increase": int(np.sum(values > 0)), "decrease": int(np.sum(values < 0)),
              "no change": int(np.sum(values == 0))}
    if sdc:
        counts["beyond the SDC"] = int(np.sum(np.abs(values) > sdc))
    return counts
