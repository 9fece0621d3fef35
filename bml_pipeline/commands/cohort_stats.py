"""``bml-pipeline cohort-stats CHANGES.csv [--out DIR]``: change statistics over a cohort of knees."""

from __future__ import annotations

import argparse

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


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("changes", help="changes.csv: one row per knee and visit pair (from longitudinal/batch)")
    parser.add_argument("--out", help="folder for cohort_stats.json and cohort_stats.csv")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.longitudinal.cohort import cohort_stats, load_changes, write_stats

    table = load_changes(args.changes)
    rows = [s.to_dict() for s in cohort_stats(table)]
    print(format_table(rows))
    if args.out:
        write_stats(args.out, rows)
    return 0


COMMAND = Command("cohort-stats", "mean change, 95% CI, SRM and smallest detectable change over a changes table",
                  _add_arguments, _run)
