"""Cohort tables of a batch: ``cohort.csv``/``cohort.parquet`` (one row per scan), ``changes.csv`` (one row
per knee and visit pair) and ``errors.csv`` (one row per failed scan or pair).

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


def write_errors(out: Path, failures: Sequence[tuple[str, str, str, str]]) -> Any:
    """Write ``errors.csv`` (header always present): ``subject, visit, stage, error`` per failed scan
    (stage ``scan``) or visit pair (stage ``change``, visit ``<baseline>-><followup>``); each error on
    one line with numbers written plainly (no ``np.float64(...)``); returns the table."""
    rows = [dict(zip(ERROR_COLUMNS, (*f[:3], one_line(str(f[3]), limit=10_000)))) for f in failures]
    table = frame(rows, ("subject", "visit"), ERROR_COLUMNS)
    _write_csv(out / "errors.csv", table)
    return table
