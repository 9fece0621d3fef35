"""Cohort tables of a batch: ``cohort.csv``/``cohort.parquet`` (one row per scan) and ``errors.csv``.

Tables are sorted by subject and visit (natural visit order) and written atomically, so a batch that
was interrupted and resumed ends with the same bytes as one that ran straight through.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bml_pipeline.batch.manifest import visit_sort_key
from bml_pipeline.io import atomic_path, write_text_atomic

ERROR_COLUMNS = ("subject", "visit", "error")
KEY_COLUMNS = ("subject", "visit")


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (str(row["subject"]), visit_sort_key(str(row["visit"])), str(row["visit"]))


def cohort_frame(rows: Iterable[dict[str, Any]]) -> Any:
    """A pandas DataFrame of scan rows: sorted, subject and visit first, other columns in first-seen
    order (rows lacking a column get NaN)."""
    import pandas as pd

    ordered = sorted(rows, key=_row_key)
    columns: list[str] = list(KEY_COLUMNS)
    for row in ordered:
        columns.extend(c for c in row if c not in columns)
    return pd.DataFrame(ordered, columns=columns)


def write_cohort_tables(out: Path, rows: Iterable[dict[str, Any]]) -> Any:
    """Write ``cohort.csv`` and ``cohort.parquet`` under ``out``; returns the DataFrame."""
    frame = cohort_frame(rows)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    write_text_atomic(out / "cohort.csv", buffer.getvalue())
    with atomic_path(out / "cohort.parquet") as tmp:
        frame.to_parquet(tmp, index=False, engine="pyarrow")
    return frame


def write_errors(out: Path, failures: Sequence[tuple[str, str, str]]) -> None:
    """Write ``errors.csv`` (header always present): one ``subject,visit,error`` row per failed scan."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ERROR_COLUMNS)
    for subject, visit, error in sorted(failures, key=lambda f: (f[0], visit_sort_key(f[1]), f[1])):
        writer.writerow((subject, visit, error))
    write_text_atomic(out / "errors.csv", buffer.getvalue())
