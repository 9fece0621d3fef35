"""Cohort tables of a batch: ``cohort.csv``/``cohort.parquet`` (one row per scan), ``changes.csv`` (one row
per knee and visit pair), ``cohort_long.csv`` (the same numbers tidy: one row per scan or pair,
structure, region and measure, with its unit) and ``errors.csv`` (one row per failed scan or pair).

Tables are sorted by subject and visit (natural visit order) and written atomically, so a batch that
was interrupted and resumed ends with the same bytes as one that ran straight through.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bml_pipeline.batch.manifest import visit_sort_key
from bml_pipeline.batch.worker import one_line
from bml_pipeline.io import atomic_path, write_text_atomic

ERROR_COLUMNS = ("subject", "visit", "stage", "error")
SCAN_KEYS = ("subject", "visit")
PAIR_KEYS = ("subject", "baseline_visit", "followup_visit")


def _sort_key(row: dict[str, Any], keys: Sequence[str]) -> tuple[Any, ...]:
    return tuple((str(row[k]),) if k == "subject" else (visit_sort_key(str(row[k])), str(row[k])) for k in keys)


def frame(rows: Iterable[dict[str, Any]], keys: Sequence[str] = SCAN_KEYS, columns: Sequence[str] = ()) -> Any:
    """A pandas DataFrame of rows sorted by ``keys`` (subject, then visits in natural order); ``keys``
    and ``columns`` first (present even without rows), the others in first-seen order (rows lacking a
    column get NaN)."""
    import pandas as pd

    ordered = sorted(rows, key=lambda row: _sort_key(row, keys))
    columns = list(dict.fromkeys([*keys, *columns]))
    for row in ordered:
        columns.extend(c for c in row if c not in columns)
    return pd.DataFrame(ordered, columns=columns)


def _write_csv(path: Path, table: Any) -> None:
    buffer = io.StringIO()
    table.to_csv(buffer, index=False, lineterminator="\n")
    write_text_atomic(path, buffer.getvalue())


def write_cohort_tables(out: Path, rows: Iterable[dict[str, Any]]) -> Any:
    """Write ``cohort.csv`` and ``cohort.parquet`` (one row per scan) under ``out``; returns the table."""
    table = frame(rows, SCAN_KEYS)
    _write_csv(out / "cohort.csv", table)
    with atomic_path(out / "cohort.parquet") as tmp:
        table.to_parquet(tmp, index=False, engine="pyarrow")
    return table


def write_changes(out: Path, rows: Iterable[dict[str, Any]]) -> Any:
    """Write ``changes.csv`` (one row per knee and visit pair, header always present); returns the table."""
    table = frame(rows, PAIR_KEYS)
    _write_csv(out / "changes.csv", table)
    return table


LONG_COLUMNS = ("subject", "visit", "table", "structure", "region", "measure", "value", "unit")
UNITS = {"cm3": "cm3", "mm": "mm", "mm2": "mm2", "percent": "%", "deg": "deg", "days": "days", "year": "per year"}
STRUCTURES = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage", "femoral_bml", "tibial_bml",
              "patellar_bml", "femur", "tibia", "patella", "total")


def _measure_and_unit(tokens: list[str]) -> tuple[str, str]:
    """("thickness_mean", "mm") from ["thickness", "mm", "mean"]; units are the tokens in :data:`UNITS`."""
    units = [UNITS[t] for t in tokens if t in UNITS]
    measure = "_".join(t for t in tokens if (t not in UNITS or t == "percent") and t != "per")
    if units:
        unit = " ".join(units)
    else:
        unit = "grade" if measure.endswith("grade") else "mm" if measure.endswith("residual") else "count"
    return measure, unit


def long_row(column: str) -> tuple[str, str, str, str] | None:
    """(structure, region, measure, unit) of a ``cohort.csv`` (dotted) or ``changes.csv`` column; None
    for identifiers and text columns."""
    if "." in column:  # cohort.csv: group.structure[.subregions.region].measure...
        parts = column.split(".")
        if parts[0] not in ("structures", "bml", "cartilage") or len(parts) < 3:
            return None
        structure, rest = parts[1], parts[2:]
        whole = {"structures": "whole", "bml": "whole_bone", "cartilage": "whole_plate"}[parts[0]]
        region = rest[1] if rest[0] == "subregions" and len(rest) > 2 else whole
        rest = rest[2:] if region != whole else rest
        tokens = "_".join(rest).split("_")
        measure, unit = _measure_and_unit(tokens)
        return structure, region, ("bml_" + measure if parts[0] == "bml" else measure), unit
    for group in ("bml", "cartilage", "alignment"):
        for structure in STRUCTURES:
            prefix = f"{group}_{structure}_"
            if column.startswith(prefix):
                tail = column[len(prefix):]
                region = "whole_bone" if group == "bml" else "whole"
                for named in ("common_region", "whole_plate"):
                    if tail.startswith(named + "_"):
                        region, tail = named, tail[len(named) + 1:]
                measure, unit = _measure_and_unit(tail.split("_"))
                if group == "cartilage" and measure.startswith("delta"):
                    measure = "thickness_" + measure  # the common region's thickness change
                return structure, region, f"{group}_{measure}" if group != "cartilage" else measure, unit
    if column == "interval_days":
        return "knee", "whole", "interval", "days"
    return None


def write_long_table(out: Path, scans: Any, changes: Any) -> Any:
    """Write ``cohort_long.csv``: every number of ``cohort.csv`` and ``changes.csv``, one per row, with
    its structure, region (``whole_plate``, ``common_region``, a subregion ...), measure and unit."""
    import pandas as pd

    rows = []
    for table, frame_, visit_of in (("scan", scans, lambda r: r["visit"]),
                                    ("change", changes, lambda r: f"{r['baseline_visit']}->{r['followup_visit']}")):
        if frame_ is None or not len(frame_):
            continue
        parsed = {c: long_row(c) for c in frame_.columns}
        for record in frame_.to_dict("records"):
            for column, key in parsed.items():
                value = record[column]
                if key is None or isinstance(value, str) or value is None or pd.isna(value):
                    continue
                rows.append(dict(zip(LONG_COLUMNS, (record["subject"], visit_of(record), table, *key[:3],
                                                    value, key[3]))))
    table = pd.DataFrame(rows, columns=list(LONG_COLUMNS))
    _write_csv(out / "cohort_long.csv", table)
    return table


def write_errors(out: Path, failures: Sequence[tuple[str, str, str, str]]) -> Any:
    """Write ``errors.csv`` (header always present): ``subject, visit, stage, error`` per failed scan
    (stage ``scan``) or visit pair (stage ``change``, visit ``<baseline>-><followup>``); each error on
    one line with numbers written plainly (no ``np.float64(...)``); returns the table."""
    rows = [dict(zip(ERROR_COLUMNS, (*f[:3], one_line(str(f[3]), limit=10_000)))) for f in failures]
    table = frame(rows, ("subject", "visit"), ERROR_COLUMNS)
    _write_csv(out / "errors.csv", table)
    return table
