"""Cohort statistics of change: mean change with a t-based 95 % CI, standardized response mean, and the
smallest detectable change from repeat scans.

Input is a changes table (``changes.csv``), one row per knee and visit pair, as written by
:func:`bml_pipeline.longitudinal.change.change_row`. Its *measures* are the numeric columns whose names
end in ``delta_cm3``, ``delta_mm`` or ``delta_percent``.

Repeat scans: a row is a test-retest pair (two scans of the same knee at the same visit, so its deltas are
pure measurement error) when its ``repeat`` column is true (``1``/``true``/``yes``), or, in a table
without that column, when ``followup_visit`` is ``baseline_visit`` plus the suffix ``_rep`` (``00m`` and
``00m_rep``). Repeat rows never enter the change statistics; they give, per measure:

- SEM, the standard error of measurement: the within-knee SD, ``SD(d) / sqrt(2)`` over the repeat
  differences ``d`` (Bland & Altman, Lancet 1986;327:307-310; Bland & Altman, BMJ 1996;313:744);
- SDC, the smallest detectable change: ``1.96 * sqrt(2) * SEM`` (= 1.96 * SD(d)), the change one knee
  must exceed to be told from measurement error with 95 % confidence (Beckerman et al., Qual Life Res
  2001;10:571-578; de Vet et al., J Clin Epidemiol 2006;59:1033-1039).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MEASURE_SUFFIXES = ("delta_cm3", "delta_mm", "delta_percent")
REPEAT_SUFFIX = "_rep"
_TRUE = {"1", "true", "yes", "y", "t"}


@dataclass(frozen=True)
class MeasureStats:
    """Statistics of one change measure (in the measure's own unit).

    Attributes:
        measure: column name.
        n: knees with a value (repeat rows excluded).
        mean, sd: mean and sample SD (ddof 1) of the change; sd is None for n < 2.
        ci95_low, ci95_high: 95 % confidence interval of the mean (Student t, n - 1 df); None for n < 2.
        srm: standardized response mean, mean / sd; None when sd is None or 0.
        n_repeat: repeat pairs with a value.
        sem: standard error of measurement from the repeats; None for fewer than 2 repeat pairs.
        sdc: smallest detectable change, 1.96 * sqrt(2) * sem; None without sem.
        n_beyond_sdc: knees whose |change| exceeds the SDC; None without sdc.
    """

    measure: str
    n: int
    mean: float | None
    sd: float | None
    ci95_low: float | None
    ci95_high: float | None
    srm: float | None
    n_repeat: int
    sem: float | None
    sdc: float | None
    n_beyond_sdc: int | None

    def to_dict(self, decimals: int = 6) -> dict[str, Any]:
        return {k: (round(v, decimals) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def measure_columns(columns: list[str]) -> list[str]:
    """The change measures among ``columns``, in their table order."""
    return [c for c in columns if c.endswith(MEASURE_SUFFIXES)]


def repeat_mask(table) -> np.ndarray:
    """Boolean array: which rows of the changes table (a pandas DataFrame) are repeat pairs."""
    if "repeat" in table.columns:
        return table["repeat"].astype(str).str.strip().str.lower().isin(_TRUE).to_numpy()
    if {"baseline_visit", "followup_visit"} <= set(table.columns):
        base = table["baseline_visit"].astype(str)
        foll = table["followup_visit"].astype(str)
        return (foll == base + REPEAT_SUFFIX).to_numpy()
    return np.zeros(len(table), dtype=bool)


def measure_stats(changes: np.ndarray, repeats: np.ndarray, measure: str) -> MeasureStats:
    """Statistics of one measure from its changes (follow-up minus baseline) and repeat differences.

    NaN values (a measure missing for a knee) are left out.
    """
    from scipy import stats

    x = np.asarray(changes, dtype=np.float64)
    x = x[np.isfinite(x)]
    d = np.asarray(repeats, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = int(x.size)
    mean = float(x.mean()) if n else None
    sd = float(x.std(ddof=1)) if n >= 2 else None
    low = high = srm = None
    if sd is not None and mean is not None:
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
        srm = mean / sd if sd > 0 else None
    sem = float(d.std(ddof=1)) / math.sqrt(2.0) if d.size >= 2 else None
    sdc = 1.96 * math.sqrt(2.0) * sem if sem is not None else None
    beyond = int(np.sum(np.abs(x) > sdc)) if sdc is not None else None
    return MeasureStats(measure, n, mean, sd, low, high, srm, int(d.size), sem, sdc, beyond)


def measure_values(table, column: str, repeats=None) -> tuple[np.ndarray, np.ndarray]:
    """``(changes, repeat differences)`` of one measure: the table's non-repeat and repeat rows, plus every
    row of ``repeats`` (a second changes table whose rows are all repeat pairs) when it has the column.
    Non-numeric cells become NaN."""
    import pandas as pd

    repeat = repeat_mask(table)
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    diffs = values[repeat]
    if repeats is not None and column in repeats.columns:
        extra = pd.to_numeric(repeats[column], errors="coerce").to_numpy(dtype=np.float64)
        diffs = np.concatenate([diffs, extra])
    return values[~repeat], diffs


def cohort_stats(table, repeats=None) -> list[MeasureStats]:
    """Statistics of every change measure in a changes table (pandas DataFrame).

    ``repeats``: an optional second changes table whose rows are all repeat pairs (a separate
    test-retest study); they add to the table's own repeat rows.
    """
    out = []
    for column in measure_columns(list(table.columns)):
        changes, diffs = measure_values(table, column, repeats)
        out.append(measure_stats(changes, diffs, column))
    return out


def select_visits(table, baseline_visit: str, followup_visit: str):
    """The repeat rows and the rows of one visit pair (``baseline_visit`` to ``followup_visit``).

    A batch's changes table holds every consecutive visit pair and, with three or more visits, baseline to
    last, so one knee can give several rows over different intervals; a trial's SD of change is over one
    interval, one row per knee. Raises ``ValueError`` when the table lacks the visit columns.
    """
    if not {"baseline_visit", "followup_visit"} <= set(table.columns):
        raise ValueError("the table has no baseline_visit and followup_visit columns")
    keep = repeat_mask(table) | ((table["baseline_visit"].astype(str) == baseline_visit)
                                 & (table["followup_visit"].astype(str) == followup_visit)).to_numpy()
    return table[keep].reset_index(drop=True)


def load_changes(path: str | Path):
    """The changes table as a pandas DataFrame; :class:`InputError` when it is unusable."""
    import pandas as pd

    from bml_pipeline.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable CSV table ({exc.__class__.__name__})") from None
    if not measure_columns(list(table.columns)):
        raise InputError(path, "no change columns (names ending in delta_cm3, delta_mm or delta_percent)")
    if table.empty:
        raise InputError(path, "the table has no rows")
    return table


def write_stats(out_dir: str | Path, rows: list[dict]) -> None:
    """Write ``cohort_stats.json`` and ``cohort_stats.csv`` into ``out_dir`` atomically."""
    import pandas as pd

    from bml_pipeline.io import write_text_atomic

    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "cohort_stats.json", json.dumps({"measures": rows}, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out_dir / "cohort_stats.csv", pd.DataFrame(rows).to_csv(index=False))
