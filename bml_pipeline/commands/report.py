"""``bml-pipeline report RUN_DIR``: write the run's self-contained ``report.html`` (and PDF)."""

from __future__ import annotations

import argparse

from bml_pipeline.commands import Command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `bml-pipeline measure`")
    parser.add_argument("--prior", metavar="RUN_DIR", help="run directory of the same knee's prior visit")
    parser.add_argument("--change", metavar="CHANGE_JSON",
                        help="change.json from `bml-pipeline longitudinal` (default: RUN_DIR/change.json if present)")
    parser.add_argument("--pdf", action="store_true", help="also write report.pdf")
    parser.add_argument("--include-identifiers", action="store_true",
                        help="show full input paths and patient fields (hidden by default)")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.report.html import write_scan_report

    path = write_scan_report(args.run_dir, prior_dir=args.prior, pdf=args.pdf,
                             include_identifiers=args.include_identifiers, change_path=args.change)
    print(path)
    if args.pdf:
        print(path.with_suffix(".pdf"))
    return 0


COMMAND = Command("report", "write a self-contained HTML report (and PDF) for a run directory", _add_arguments, _run)
