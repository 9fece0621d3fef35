"""``bml-pipeline cohort-stats CHANGES.csv [--out DIR]``: change statistics over a cohort of knees, and trial
planning numbers (smallest detectable change, knees per arm; see ``docs/power.md``)."""

from __future__ import annotations

import argparse
import math

from bml_pipeline.commands import Command


def format_table(rows: list[dict]) -> str:
    """Plain-text table of the statistics (one line per measure)."""
    def f(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    width = max(len("measure"), *(len(r["measure"]) for r in rows))
    head = (f"{'measure':<{width}} {'n':>4} {'mean':>9} {'sd':>9} {'95% CI':>21} {'SRM':>7} "
            f"{'n_rep':>5} {'SDC':>8} {'>SDC':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ci = "-" if r["ci95_low"] is None else f"[{f(r['ci95_low'])}, {f(r['ci95_high'])}]"
        lines.append(f"{r['measure']:<{width}} {r['n']:>4} {f(r['mean']):>9} {f(r['sd']):>9} {ci:>21} "
                     f"{f(r['srm'], 2):>7} {r['n_repeat']:>5} {f(r['sdc']):>8} "
                     f"{'-' if r['n_beyond_sdc'] is None else r['n_beyond_sdc']:>5}")
    return "\n".join(lines)


def format_power_table(rows: list[dict], power: float, alpha: float) -> str:
    """Plain-text trial-planning table: SD of change, SEM, SDC and knees per arm per measure."""
    def g(v):
        return "-" if v is None else str(v) if isinstance(v, int) else f"{v:.4g}"

    def source(r):
        if r["error_source"] == "repeat pairs":
            return f"repeats({r['n_repeat']})"
        return "LoA" if r["error_source"] == "limits of agreement" else "-"

    width = max(len("measure"), *(len(r["measure"]) for r in rows))
    head = (f"{'measure':<{width}} {'unit':>4} {'knees':>5} {'SD chg':>9} {'error':>12} {'SEM':>9} "
            f"{'SDC ind':>9} {'SDC grp':>9} {'(n)':>5} {'effect':>8} {'n/arm z':>8} {'n/arm t':>8}")
    title = [(f"Knees per arm: two-arm parallel trial, difference in mean change between arms, power {power:g}, "
              f"alpha {alpha:g} two-sided"),
             ("(n/arm z: normal approximation; n/arm t: noncentral t; SDC ind/grp: smallest detectable change of "
              "one knee / of the mean of (n) knees; values in each measure's unit, pp: percentage points)")]
    lines = [*title, head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['measure']:<{width}} {r['unit']:>4} {r['n_knees']:>5} {g(r['sd_change']):>9} "
                     f"{source(r):>12} {g(r['sem']):>9} {g(r['sdc_individual']):>9} {g(r['sdc_group']):>9} "
                     f"{g(r['sdc_group_n']):>5} {g(r['effect']):>8} {g(r['n_per_arm_normal']):>8} "
                     f"{g(r['n_per_arm_t']):>8}")
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("changes", help="changes.csv: one row per knee and visit pair (from longitudinal/batch)")
    parser.add_argument("--out", help="folder for cohort_stats.json/.csv and power.json/.csv")
    parser.add_argument("--visits", metavar="BASE:FOLLOW",
                        help="use only the rows of this visit pair, e.g. 00m:24m (repeat rows are kept); a "
                             "batch's table also holds consecutive and baseline-to-last pairs")
    parser.add_argument("--repeat", metavar="REPEAT.csv",
                        help="a changes table whose rows are all test-retest pairs (their change is "
                             "measurement error); adds to the table's own repeat rows")
    parser.add_argument("--effect", action="append", metavar="MEASURE=VALUE", default=None,
                        help="difference in mean change between arms to detect, in the measure's unit; "
                             "repeatable; MEASURE is a change column or a short name (femoral_bml, "
                             "femoral_cartilage_thickness_pct, ...). Default: femoral_bml=-2.1 and "
                             "femoral_cartilage_thickness_pct=2.4 (those present); any --effect replaces both")
    parser.add_argument("--loa", action="append", metavar="MEASURE=LOW,HIGH", default=None,
                        help="95%% limits of agreement of the measure's change error (e.g. from a validation), "
                             "used for the SDC when the measure has no repeat pairs; repeatable")
    parser.add_argument("--power", type=float, default=0.8, help="power of the trial (default 0.8)")
    parser.add_argument("--alpha", type=float, default=0.05, help="two-sided significance level (default 0.05)")
    parser.add_argument("--group-n", type=int, default=None, metavar="N",
                        help="knees for the group-level SDC (default: the measure's knees per arm, t)")


def _number(text: str, what: str) -> float:
    from bml_pipeline.errors import InputError

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputError(None, f"{what}: {text!r} is not a finite number")
    return value


def _pairs(items: list[str] | None, option: str, example: str) -> list[tuple[str, str]]:
    from bml_pipeline.errors import InputError

    out = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(None, f"{option} {item}: expected MEASURE=VALUE, e.g. {option} {example}")
        out.append((name.strip(), value.strip()))
    return out


def _resolve(name: str, option: str, columns: list[str], path: str, seen: dict) -> str:
    from bml_pipeline.errors import InputError
    from bml_pipeline.longitudinal.power import resolve_measure

    try:
        column = resolve_measure(name, columns)
    except KeyError as exc:
        raise InputError(path, f"{option} {name}: {exc.args[0]}") from None
    if column in seen:
        raise InputError(None, f"{option}: measure {column} given twice")
    return column


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.errors import InputError
    from bml_pipeline.longitudinal.cohort import (
        cohort_stats,
        load_changes,
        repeat_mask,
        select_visits,
        write_stats,
    )
    from bml_pipeline.longitudinal.power import DEFAULT_EFFECTS, power_table, write_power

    if not 0.0 < args.power < 1.0:
        raise InputError(None, f"--power must lie between 0 and 1 (got {args.power:g})")
    if not 0.0 < args.alpha < 1.0:
        raise InputError(None, f"--alpha must lie between 0 and 1 (got {args.alpha:g})")
    if args.group_n is not None and args.group_n < 1:
        raise InputError(None, f"--group-n must be at least 1 (got {args.group_n})")
    effect_items = _pairs(args.effect, "--effect", "femoral_bml=-2.1")
    loa_items = _pairs(args.loa, "--loa", "femoral_cartilage_thickness_pct=-0.249,0.226")

    table = load_changes(args.changes)
    if args.visits:
        base, sep, follow = args.visits.partition(":")
        if not sep or not base or not follow:
            raise InputError(None, f"--visits {args.visits}: expected BASE:FOLLOW, e.g. 00m:24m")
        try:
            table = select_visits(table, base, follow)
        except ValueError as exc:
            raise InputError(args.changes, f"--visits: {exc}") from None
        if not (~repeat_mask(table)).any():
            raise InputError(args.changes, f"--visits: no rows with baseline_visit {base} and followup_visit {follow}")
    repeats = load_changes(args.repeat) if args.repeat else None
    columns = list(table.columns)

    effects: dict[str, float] = {}
    for name, value in effect_items:
        column = _resolve(name, "--effect", columns, args.changes, effects)
        effects[column] = _number(value, f"--effect {name}")
    notes = []
    if not effect_items:
        effects = {c: v for c, v in DEFAULT_EFFECTS.items() if c in columns}
        notes += [f"note: default effect {c}={v:g} not used: the table has no such column"
                  for c, v in DEFAULT_EFFECTS.items() if c not in columns]
    loa: dict[str, tuple[float, float]] = {}
    for name, value in loa_items:
        column = _resolve(name, "--loa", columns, args.changes, loa)
        low, sep, high = value.partition(",")
        if not sep:
            raise InputError(None, f"--loa {name}={value}: expected LOW,HIGH, e.g. -0.249,0.226")
        low_v, high_v = _number(low, f"--loa {name}"), _number(high, f"--loa {name}")
        if not low_v < high_v:
            raise InputError(None, f"--loa {name}: the low limit must be below the high limit")
        loa[column] = (low_v, high_v)
    if "subject" in columns:
        subjects = table.loc[~repeat_mask(table), "subject"].astype(str)
        several = int(subjects.duplicated(keep=False).groupby(subjects).any().sum())
        if several:
            notes.append(f"note: several visit pairs for {several} knee(s) (consecutive and baseline-to-last): "
                         f"the SD of change pools them; choose one interval with --visits BASE:FOLLOW")

    rows = [s.to_dict() for s in cohort_stats(table, repeats)]
    print(format_table(rows))
    power_rows = [r.to_dict() for r in power_table(table, effects, loa, repeats, alpha=args.alpha,
                                                   power=args.power, group_n=args.group_n)]
    print()
    print(format_power_table(power_rows, args.power, args.alpha))
    notes = [f"note: {r['measure']}: {r['note']}" for r in power_rows
             if r["note"] and (r["measure"] in effects or r["measure"] in loa)] + notes
    for line in notes:
        print(line)
    if args.out:
        write_stats(args.out, rows)
        settings = {
            "changes": str(args.changes), "repeat": args.repeat, "visits": args.visits,
            "design": "two-arm parallel trial, equal arms, difference in mean change (two-sample comparison)",
            "power": args.power, "alpha": args.alpha, "sides": 2,
            "effects": effects, "loa": {k: list(v) for k, v in loa.items()}, "group_n": args.group_n,
            "units": "each row's unit column (pp: percentage points)",
            "n_per_arm_normal": "ceil(2 (z_{1-alpha/2} + z_{power})^2 sd_change^2 / effect^2)",
            "n_per_arm_t": "smallest n with noncentral-t power of the two-sided two-sample t test >= power",
            "sem": "SD(repeat differences) / sqrt(2), or LoA half-width / 1.96 / sqrt(2)",
            "sdc_individual": "1.96 * sqrt(2) * sem (= LoA half-width)",
            "sdc_group": "sdc_individual / sqrt(sdc_group_n)",
        }
        write_power(args.out, power_rows, settings)
    return 0


COMMAND = Command("cohort-stats", "mean change, 95% CI, SRM and smallest detectable change over a changes table, "
                  "and knees per arm for a two-arm trial", _add_arguments, _run)
