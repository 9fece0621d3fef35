"""Trial planning from a changes table: smallest detectable change (SDC) and knees per arm.

For a two-arm parallel trial that compares the mean change of a measure between arms (see
``docs/power.md`` for the formulas, their sources and their limits):

- SD of change: the sample SD (ddof 1) of the per-knee change over the table's non-repeat rows.
- Measurement error, per measure, from (1) repeat pairs (test-retest rows of the table, or a separate
  repeat table): each difference ``d`` holds two measurement errors, so ``SEM = SD(d) / sqrt(2)``; or,
  without repeat pairs, from (2) the 95 % limits of agreement of a validation, ``(low, high)``: the
  half-width ``(high - low) / 2`` is ``1.96 * SD(d)``, so ``SD(d) = half-width / 1.96`` and
  ``SEM = SD(d) / sqrt(2)``. Either way ``SDC_ind = 1.96 * sqrt(2) * SEM`` (= 1.96 SD(d), the LoA
  half-width) and ``SDC_group = SDC_ind / sqrt(n)`` (de Vet et al., J Clin Epidemiol 2006;59:1033-1039;
  Bland & Altman, Lancet 1986;327:307-310).
- Knees per arm to detect a difference ``delta`` in mean change with common SD ``sigma``, two-sided
  ``alpha``, power ``1 - beta``:

  * normal approximation: ``n = 2 (z_{1-alpha/2} + z_{1-beta})^2 sigma^2 / delta^2``, rounded up;
  * t: the smallest ``n`` whose exact power under the noncentral t distribution (two-sample t test,
    ``2n - 2`` df, noncentrality ``delta / (sigma sqrt(2/n))``, both rejection tails) reaches
    ``1 - beta`` (Julious, Stat Med 2004;23:1921-1986; the G*Power "t tests - means: difference between
    two independent means" computation). Detecting d = 0.5 at 80 % power and 5 % two-sided alpha gives
    63 (normal) and 64 (t) per arm.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bml_pipeline.longitudinal.cohort import measure_columns, measure_stats, measure_values

Z_SDC = 1.96  # the 95 % individual-level SDC and limits of agreement use 1.96 (de Vet 2006; Bland & Altman 1986)

_PLACES = {"femoral": ("femur", "femoral_cartilage"), "tibial": ("tibia", "tibial_cartilage"),
           "patellar": ("patella", "patellar_cartilage")}


def _short_names() -> dict[str, str]:
    names: dict[str, str] = {}
    for adjective, (bone, plate) in _PLACES.items():
        names[f"{adjective}_bml"] = f"bml_{bone}_delta_cm3"
        names[f"{adjective}_bml_pct"] = f"bml_{bone}_delta_percent"
        names[f"{adjective}_cartilage_thickness_mm"] = f"cartilage_{plate}_common_region_delta_mm"
        names[f"{adjective}_cartilage_thickness_pct"] = f"cartilage_{plate}_common_region_delta_percent"
        names[f"{adjective}_cartilage_volume"] = f"cartilage_{plate}_whole_plate_volume_delta_cm3"
    names["total_bml"] = "bml_total_delta_cm3"
    names["total_bml_pct"] = "bml_total_delta_percent"
    return names


SHORT_NAMES: dict[str, str] = _short_names()
"""Short measure names accepted by ``--effect``/``--loa`` -> changes-table column."""

DEFAULT_EFFECTS: dict[str, float] = {"bml_femur_delta_cm3": -2.1, "cartilage_femoral_cartilage_common_region_delta_percent": 2.4}
"""Effects used when none is given: femoral BML volume change -2.1 cm3, femoral cartilage mean thickness
change +2.4 % (percentage points of the per-knee percent change)."""


class NotComputable(ValueError):
    """A sample size cannot be computed; ``str(err)`` says why."""


def unit_of(measure: str) -> str:
    """The unit of a change column: ``cm3``, ``mm`` or ``pp`` (percentage points, for ``delta_percent``)."""
    if measure.endswith("delta_cm3"):
        return "cm3"
    if measure.endswith("delta_mm"):
        return "mm"
    if measure.endswith("delta_percent"):
        return "pp"
    return "?"


def resolve_measure(name: str, columns: list[str]) -> str:
    """The change column a user's measure name means: a column name itself, or a short name
    (:data:`SHORT_NAMES`). Raises ``KeyError`` with a one-line reason when the table has no such measure."""
    if name in columns:
        if name not in measure_columns([name]):
            raise KeyError(f"column {name} is not a change measure (names ending in delta_cm3, delta_mm "
                           f"or delta_percent)")
        return name
    if name in SHORT_NAMES:
        column = SHORT_NAMES[name]
        if column not in columns:
            raise KeyError(f"measure {name} ({column}) is not in the table")
        return column
    if measure_columns([name]):
        raise KeyError(f"measure {name} is not in the table")
    raise KeyError(f"measure {name} is not in the table (neither a change column nor a short name such as "
                   f"femoral_bml or femoral_cartilage_thickness_pct)")


# ---- measurement error ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MeasurementError:
    """Measurement error of a change measure, in its unit.

    Attributes:
        source: ``"repeat pairs"`` or ``"limits of agreement"``.
        sd_diff: SD of the differences of two measurements of an unchanged knee (test-retest).
        sem: standard error of measurement, ``sd_diff / sqrt(2)``.
        sdc: individual-level 95 % smallest detectable change, ``1.96 * sqrt(2) * sem`` (= 1.96 sd_diff).
        n_pairs: repeat pairs behind it (None for limits of agreement).
    """

    source: str
    sd_diff: float
    sem: float
    sdc: float
    n_pairs: int | None = None


def error_from_repeats(differences) -> MeasurementError | None:
    """Measurement error from test-retest differences (NaN left out); None for fewer than 2."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    sd_diff = float(d.std(ddof=1))
    sem = sd_diff / math.sqrt(2.0)
    return MeasurementError("repeat pairs", sd_diff, sem, Z_SDC * math.sqrt(2.0) * sem, int(d.size))


def error_from_loa(low: float, high: float) -> MeasurementError:
    """Measurement error from 95 % limits of agreement of a change (or test-retest difference):
    half-width ``(high - low) / 2 = 1.96 SD(d)``; the SDC is that half-width. The centre (bias) is not
    part of the SDC."""
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ValueError(f"limits of agreement must be two numbers, low < high (got {low:g}, {high:g})")
    half = (high - low) / 2.0
    sd_diff = half / Z_SDC
    sem = sd_diff / math.sqrt(2.0)
    return MeasurementError("limits of agreement", sd_diff, sem, half)


def sdc_group(sdc_individual: float, n: int) -> float:
    """Group-level SDC: the individual SDC over sqrt(n) for the mean of n knees (de Vet et al. 2006)."""
    return sdc_individual / math.sqrt(n)


# ---- sample size -----------------------------------------------------------------------------------

def _check(delta: float, sd: float | None, alpha: float, power: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie between 0 and 1 (got {alpha:g})")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie between 0 and 1 (got {power:g})")
    if sd is None:
        raise NotComputable("SD of change is not available (fewer than 2 knees with a value)")
    if not math.isfinite(sd):
        raise NotComputable("SD of change is not a finite number")
    if sd <= 0.0:
        raise NotComputable("SD of change is 0 (every knee changed by the same amount)")
    if not math.isfinite(delta) or delta == 0.0:
        raise NotComputable("the effect is 0")
    return sd


def _ceil(x: float) -> int:
    """Round up, ignoring float noise just above an integer."""
    return math.ceil(x - 1e-9 * max(1.0, abs(x)))


def sample_size_normal(delta: float, sd: float | None, alpha: float = 0.05, power: float = 0.8) -> int:
    """Knees per arm by the normal approximation, ``2 (z_{1-alpha/2} + z_{power})^2 sd^2 / delta^2``
    rounded up (at least 1). Raises :class:`NotComputable` for a zero/NaN SD or a zero effect."""
    from scipy import stats

    sd = _check(delta, sd, alpha, power)
    z = float(stats.norm.ppf(1.0 - alpha / 2.0)) + float(stats.norm.ppf(power))
    return max(1, _ceil(2.0 * z * z * sd * sd / (delta * delta)))


def power_t(n: int, delta: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided two-sample t test with n knees per arm (noncentral t, both tails)."""
    from scipy import stats

    if n < 2:
        return 0.0
    df = 2 * n - 2
    ncp = abs(delta) / (sd * math.sqrt(2.0 / n))
    t_crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    p = float(stats.nct.sf(t_crit, df, ncp)) + float(stats.nct.cdf(-t_crit, df, ncp))
    if not math.isfinite(p):  # scipy's noncentral t can fail at very large df; t is then normal
        p = float(stats.norm.sf(t_crit - ncp)) + float(stats.norm.cdf(-t_crit - ncp))
    return p


def sample_size_t(delta: float, sd: float | None, alpha: float = 0.05, power: float = 0.8) -> int:
    """Knees per arm for the two-sample t test: the smallest n >= 2 with :func:`power_t` >= ``power``."""
    n = max(2, sample_size_normal(delta, sd, alpha, power))
    sd = _check(delta, sd, alpha, power)
    while n > 2 and power_t(n - 1, delta, sd, alpha) >= power:
        n -= 1
    while power_t(n, delta, sd, alpha) < power:
        n += 1
    return n


# ---- per-measure table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerRow:
    """Trial-planning numbers of one measure, all in the measure's ``unit`` (``pp``: percentage points).

    Attributes:
        measure, unit: column name and its unit.
        n_knees: knees (non-repeat rows) with a value; sd_change: their SD of change (ddof 1).
        error_source: ``repeat pairs``, ``limits of agreement`` or None; n_repeat: repeat pairs with a
            value (used when 2 or more).
        sd_error_diff, sem, sdc_individual: measurement error (see :class:`MeasurementError`).
        sdc_group, sdc_group_n: SDC of a mean over sdc_group_n knees.
        effect: difference in mean change between arms to detect.
        n_per_arm_normal, n_per_arm_t: knees per arm (normal approximation; exact noncentral t).
        power_at_n_per_arm_t: the power the t test reaches with n_per_arm_t knees per arm.
        note: why something is missing.
    """

    measure: str
    unit: str
    n_knees: int
    sd_change: float | None
    error_source: str | None
    n_repeat: int | None
    sd_error_diff: float | None
    sem: float | None
    sdc_individual: float | None
    sdc_group: float | None
    sdc_group_n: int | None
    effect: float | None
    n_per_arm_normal: int | None
    n_per_arm_t: int | None
    power_at_n_per_arm_t: float | None
    note: str | None

    def to_dict(self, decimals: int = 6) -> dict[str, Any]:
        return {k: (round(v, decimals) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def power_row(measure: str, changes, differences=(), *, effect: float | None = None,
              loa: tuple[float, float] | None = None, alpha: float = 0.05, power: float = 0.8,
              group_n: int | None = None) -> PowerRow:
    """The :class:`PowerRow` of one measure from its per-knee changes and repeat differences.

    Repeat pairs (2 or more) give the measurement error; else ``loa`` does. The group SDC is for
    ``group_n`` knees, or for ``n_per_arm_t`` when ``group_n`` is None.
    """
    stats = measure_stats(np.asarray(changes, dtype=np.float64), np.asarray(differences, dtype=np.float64), measure)
    notes = []
    error = error_from_repeats(differences)
    if error is None and loa is not None:
        error = error_from_loa(*loa)
    elif error is not None and loa is not None:
        notes.append(f"--loa not used: {error.n_pairs} repeat pairs give the error")
    if error is None:
        notes.append("SDC not available: no repeat pairs and no --loa")
    n_normal = n_t = achieved = None
    if effect is not None:
        try:
            n_normal = sample_size_normal(effect, stats.sd, alpha, power)
            n_t = sample_size_t(effect, stats.sd, alpha, power)
            achieved = power_t(n_t, effect, _check(effect, stats.sd, alpha, power), alpha)
        except NotComputable as exc:
            notes.append(f"knees per arm not computable: {exc}")
    n_group = group_n if group_n is not None else n_t
    grp = sdc_group(error.sdc, n_group) if error is not None and n_group else None
    return PowerRow(measure, unit_of(measure), stats.n, stats.sd,
                    None if error is None else error.source, stats.n_repeat,
                    None if error is None else error.sd_diff, None if error is None else error.sem,
                    None if error is None else error.sdc, grp, n_group if grp is not None else None,
                    None if effect is None else float(effect), n_normal, n_t, achieved,
                    "; ".join(notes) or None)


def power_table(table, effects: dict[str, float], loa: dict[str, tuple[float, float]] | None = None,
                repeats=None, *, alpha: float = 0.05, power: float = 0.8,
                group_n: int | None = None) -> list[PowerRow]:
    """One :class:`PowerRow` per change measure of ``table`` (a changes DataFrame), in table order.

    ``effects`` and ``loa`` are keyed by column name; ``repeats`` is an optional table of repeat pairs.
    """
    loa = loa or {}
    rows = []
    for column in measure_columns(list(table.columns)):
        changes, diffs = measure_values(table, column, repeats)
        rows.append(power_row(column, changes, diffs, effect=effects.get(column), loa=loa.get(column),
                              alpha=alpha, power=power, group_n=group_n))
    return rows


def write_power(out_dir: str | Path, rows: list[dict], settings: dict[str, Any]) -> None:
    """Write ``power.json`` (settings and rows) and ``power.csv`` (rows) into ``out_dir`` atomically."""
    import csv
    import io

    from bml_pipeline.io import write_text_atomic

    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "power.json",
                      json.dumps({"settings": settings, "measures": rows}, indent=2, sort_keys=True) + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(PowerRow.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # None -> empty cell; integers stay integers
    write_text_atomic(out_dir / "power.csv", text.getvalue())
