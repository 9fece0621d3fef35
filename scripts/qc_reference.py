"""The QC reference: volumes of every structure over the expert label maps, and each map's QC metrics.

    python scripts/qc_reference.py [--label-dir ../shared/data/oai_labels] [--write configs/qc/oai_zib.yaml]

Prints one row per map (bone and plate volumes, the arrangement metrics, QC status) and the range per
structure. With ``--write`` the plausible range is written as [min / MARGIN, max * MARGIN]: fields of
view and knee sizes beyond these 52 knees must still pass, while a missing or half-found bone fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MARGIN = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label-dir", default=str(REPO.parent / "shared" / "data" / "oai_labels"))
    parser.add_argument("--write", help="write the ranges to this YAML")
    args = parser.parse_args()

    from bml_pipeline.io import read_labels
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure.volumes import check_label_values, structure_volumes
    from bml_pipeline.qc import check_labels

    schema = load_schema("oai_zib")
    names = [s.name for s in (*schema.of_kind("bone"), *schema.of_kind("cartilage"))]
    table: dict[str, list[float]] = {n: [] for n in names}
    paths = sorted(Path(args.label_dir).glob("*.nii.gz"))
    print("| map | " + " | ".join(names) + " | gap mm | tilt deg | patella ant. mm | QC |")
    print("|---" * (len(names) + 5) + "|")
    for path in paths:
        labels = read_labels(path, schema)
        volumes = structure_volumes(labels, schema, check_label_values(labels, schema))
        full = dict(volumes)
        for bone in schema.of_kind("bone"):
            lesion = schema.lesion_of(bone.name)
            if full.get(bone.name) is not None and lesion is not None:
                full[bone.name] = full[bone.name] + (volumes.get(lesion.name) or 0.0)
        for n in names:
            if full.get(n) is not None:
                table[n].append(float(full[n]))
        qc = check_labels(labels, schema, volumes)
        m = qc.metrics
        print(f"| {path.name.split('_labels')[0]} | " + " | ".join(f"{full.get(n) or 0:.1f}" for n in names)
              + f" | {m.get('joint_gap_mm')} | {m.get('long_axis_tilt_deg')} | {m.get('patella_anterior_mm')} | "
              + f"{qc.summary()} |")
    print()
    print("| structure | n | min cm3 | median | max | plausible low | high |")
    print("|---|---|---|---|---|---|---|")
    ranges = {}
    for n in names:
        v = np.array(table[n])
        ranges[n] = (float(v.min()) / MARGIN, float(v.max()) * MARGIN)
        print(f"| {n} | {len(v)} | {v.min():.2f} | {np.median(v):.2f} | {v.max():.2f} | {ranges[n][0]:.2f} | "
              f"{ranges[n][1]:.2f} |")
    if args.write:
        lines = [f"# Plausible volumes (cm3, bones with their lesions) for QC: the range over {len(paths)} expert",
                 f"# OAI label maps, min / {MARGIN:g} to max * {MARGIN:g}. Made by scripts/qc_reference.py.",
                 "volume_cm3:"]
        lines += [f"  {n}: {{low_cm3: {lo:.2f}, high_cm3: {hi:.2f}}}" for n, (lo, hi) in ranges.items()]
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
