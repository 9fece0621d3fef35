"""Run ``bml-pipeline measure`` and ``bml-pipeline longitudinal`` on the 19 real OAI longitudinal pairs.

Usage::

    .venv/bin/python scripts/run_real_pairs.py [--data ../shared/data/oai_labels] [--out /tmp/bml_real_pairs]
                                               [--subjects 9031930 ...] [--resume]

Each knee gets ``<out>/<subject>/<visit>/`` (measure run directories; reused when already there) and
``<out>/<subject>/change/`` (change.json, change.csv). At the end the script writes ``<out>/changes.csv``
and prints the distribution of BML and thickness changes and of the alignment residuals, then the
cohort statistics (``cohort-stats``). Exit status 1 when any pair failed.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bml_pipeline.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
PATTERN = re.compile(r"akoa_(\d+)_(\d+m)_labels\.nii\.gz$")
COLUMNS = {
    "BML femur delta (cm3)": "bml_femur_delta_cm3",
    "BML tibia delta (cm3)": "bml_tibia_delta_cm3",
    "BML patella delta (cm3)": "bml_patella_delta_cm3",
    "BML total delta (cm3)": "bml_total_delta_cm3",
    "femoral cart. thickness delta (%)": "cartilage_femoral_cartilage_delta_percent",
    "tibial cart. thickness delta (%)": "cartilage_tibial_cartilage_delta_percent",
    "patellar cart. thickness delta (%)": "cartilage_patellar_cartilage_delta_percent",
    "femoral cart. thickness delta (mm)": "cartilage_femoral_cartilage_delta_mm",
    "femoral cart. volume delta (cm3)": "cartilage_femoral_cartilage_volume_delta_cm3",
    "femur residual (mm)": "alignment_femur_residual",
    "tibia residual (mm)": "alignment_tibia_residual",
    "patella residual (mm)": "alignment_patella_residual",
    "femur rotation (deg)": "alignment_femur_rotation_deg",
    "femur translation (mm)": "alignment_femur_translation_mm",
}


def find_pairs(data: Path) -> dict[str, list[tuple[str, Path]]]:
    """subject -> [(visit, path)] sorted by visit month, for every subject with at least two visits."""
    visits: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(data.glob("akoa_*_labels.nii.gz")):
        m = PATTERN.search(path.name)
        if m:
            visits.setdefault(m.group(1), []).append((m.group(2), path))
    return {s: sorted(v, key=lambda x: int(x[0][:-1])) for s, v in visits.items() if len(v) >= 2}


def distribution(table: pd.DataFrame) -> str:
    lines = [f"{'measure':<36} {'n':>3} {'median':>8} {'IQR':>19} {'min':>8} {'max':>8}"]
    for name, column in COLUMNS.items():
        if column not in table:
            continue
        x = pd.to_numeric(table[column], errors="coerce").dropna().to_numpy()
        if not x.size:
            continue
        q1, med, q3 = np.percentile(x, [25, 50, 75])
        lines.append(f"{name:<36} {x.size:>3} {med:>8.3f} [{q1:>7.3f}, {q3:>7.3f}] {x.min():>8.3f} {x.max():>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "oai_labels")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bml_real_pairs"))
    parser.add_argument("--subjects", nargs="*", help="only these subjects")
    parser.add_argument("--resume", action="store_true", help="reuse change.csv files already in --out")
    args = parser.parse_args(argv)
    pairs = find_pairs(args.data)
    if args.subjects:
        pairs = {s: v for s, v in pairs.items() if s in args.subjects}
    rows, failed = [], []
    for subject, visits in pairs.items():
        start = time.perf_counter()
        run_dirs = []
        for visit, path in visits[:2]:
            run_dir = args.out / subject / visit
            measured = (run_dir / "measurements.json").is_file()
            if not measured and cli(["-q", "measure", str(path), "--out", str(run_dir)]) != 0:
                failed.append(f"{subject} {visit}: measure failed")
                break
            run_dirs.append(run_dir)
        if len(run_dirs) < 2:
            continue
        change_dir = args.out / subject / "change"
        if args.resume and (change_dir / "change.csv").is_file():
            rows.append({**pd.read_csv(change_dir / "change.csv").iloc[0].to_dict(), "subject": subject})
            continue
        code = cli(["-q", "longitudinal", "--baseline", str(run_dirs[0]), "--followup", str(run_dirs[1]),
                    "--out", str(change_dir)])
        if code != 0:
            failed.append(f"{subject}: longitudinal exit {code}")
            continue
        row = pd.read_csv(change_dir / "change.csv").iloc[0].to_dict()
        row["subject"] = subject
        rows.append(row)
        print(f"{subject} {visits[0][0]} -> {visits[1][0]}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "changes.csv", index=False)
    print(f"\n{len(rows)} of {len(pairs)} pairs compared; changes in {args.out / 'changes.csv'}\n")
    if rows:
        print(distribution(table))
        print()
        cli(["cohort-stats", str(args.out / "changes.csv"), "--out", str(args.out)])
    for line in failed:
        print("FAILED", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
