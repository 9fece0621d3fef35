"""``bml-pipeline longitudinal --baseline A --followup B --out DIR [--force] [--allow-mismatch]``: change
between two visits.

``A`` and ``B`` are run directories (from ``measure`` or ``run``) of the same knee; ``DIR`` receives
``change.json`` (DESIGN.md contract) and ``change.csv`` (the same numbers, one flat row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bml_pipeline.commands import Command


def write_change(out_dir: str | Path, change: dict[str, Any], row: dict[str, Any]) -> None:
    """Write ``change.json`` and ``change.csv`` into ``out_dir`` (atomically, after all computation)."""
    import pandas as pd

    from bml_pipeline.io.outdir import staged_dir

    csv = pd.DataFrame([row]).to_csv(index=False, float_format="%.6g")
    with staged_dir(out_dir) as staging:
        (staging / "change.json").write_text(json.dumps(change, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (staging / "change.csv").write_text(csv, encoding="utf-8")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", required=True, help="run directory of the baseline visit")
    parser.add_argument("--followup", required=True, help="run directory of the follow-up visit")
    parser.add_argument("--out", required=True, help="folder for change.json and change.csv")
    parser.add_argument("--side", choices=("left", "right"), help="the knee's side, when known")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="compare even when the scans do not look like the same knee (recorded in change.json)")
    parser.add_argument("--force", action="store_true", help="replace an earlier result in --out")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.io.outdir import check_output_dir
    from bml_pipeline.longitudinal.change import change_row
    from bml_pipeline.longitudinal.runs import compare_runs, subject_of
    from bml_pipeline.report.rundir import read_json

    check_output_dir(args.out, force=args.force)
    change = compare_runs(args.baseline, args.followup, side=args.side, allow_mismatch=args.allow_mismatch)
    base, foll = Path(args.baseline).resolve(), Path(args.followup).resolve()
    subjects = [subject_of(read_json(p / "provenance.json", required=False) or {}) for p in (base, foll)]
    ids = {"subject": subjects[0] if subjects[0] == subjects[1] else None,  # as recorded, never guessed
           "baseline_visit": base.name, "followup_visit": foll.name}
    write_change(args.out, change, change_row(change, **ids))
    print(summary(change))
    return 0


def summary(change: dict[str, Any]) -> str:
    """A few lines for the terminal: BML and thickness change, alignment residuals."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [f"side: {change.get('side') or 'unknown'}"
             + (f"  (FORCED: {change['same_knee']['problem']})" if change["same_knee"]["forced"] else "")]
    for bone, e in change["bml"].items():
        lines.append(f"BML {bone:<9} {num(e['baseline_cm3'], '.3f')} -> {num(e['followup_cm3'], '.3f')} cm3 "
                     f"(delta {num(e['delta_cm3'], '+.3f')} cm3, {num(e['delta_percent'], '+.1f')} %)")
    for plate, e in change["cartilage"].items():
        lines.append(f"{plate:<19} thickness (common region) {num(e['thickness_mean_baseline_mm'], '.3f')} -> "
                     f"{num(e['thickness_mean_followup_mm'], '.3f')} mm (delta {num(e['delta_mm'], '+.3f')} mm, "
                     f"{num(e['delta_percent'], '+.2f')} %), volume delta {num(e['volume_delta_cm3'], '+.3f')} cm3")
    for bone, a in change["alignment"].items():
        lines.append(f"align {bone:<8} rotation {a['rotation_deg']:.2f} deg, translation {a['translation_mm']:.2f} mm, "
                     f"residual {a['residual']:.3f} mm")
    return "\n".join(lines)


COMMAND = Command("longitudinal", "change between two visits of one knee (per-bone alignment, BML, cartilage)",
                  _add_arguments, _run)
