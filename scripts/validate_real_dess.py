"""The real-image check of a segmentation model: the shared DESS knee, echo 1 and echo 2 of one acquisition.

    python scripts/validate_real_dess.py [--model knee_coarse_v2] [--dicom ../shared/data/knee_dess_dicom]
        [--overlay-prefix docs/segmentation_dess] [--out runs/real_dess] [--json runs/real_dess.json]

Each echo is run through the whole pipeline (`process_scan`: segmentation, QC, measurement) into
``<out>/<echo>``. Printed: QC status and failed checks per echo; structure volumes (cm3) and cartilage
mean thickness (mm, whole plate) per echo; the Dice of echo 1 against echo 2 per structure (the same
knee, the same grid: a model that reads anatomy rather than contrast agrees with itself). There is no
expert segmentation of this knee; these are consistency and plausibility checks, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="knee_coarse_v2")
    parser.add_argument("--dicom", default=str(REPO.parent / "shared" / "data" / "knee_dess_dicom"))
    parser.add_argument("--out", default=str(REPO / "runs" / "real_dess"))
    parser.add_argument("--overlay-prefix", help="write sagittal/coronal overlays of each echo with this prefix")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()

    from benchmark_segment import overlay

    from bml_pipeline.io import read_labels, read_volume
    from bml_pipeline.labels import load_schema
    from bml_pipeline.pipeline import process_scan

    schema = load_schema("oai_zib")
    results: dict[str, dict] = {}
    labels = {}
    for echo in ("echo1", "echo2"):
        started = time.perf_counter()
        run_dir = Path(args.out) / echo
        process_scan(run_dir, image=Path(args.dicom) / echo, model=args.model, device="cpu", report=True,
                     dicom_export=False)
        m = json.loads((run_dir / "measurements.json").read_text())
        labels[echo] = read_labels(run_dir / "labels.nii.gz", schema)
        results[echo] = {
            "seconds": round(time.perf_counter() - started, 1),
            "qc_status": m["qc"]["status"],
            "qc_failed": [c["detail"] for c in m["qc"]["checks"] if c["status"] == "fail"],
            "qc_warned": [c["detail"] for c in m["qc"]["checks"] if c["status"] == "warn"],
            "volumes_cm3": {k: v["volume_cm3"] for k, v in m["structures"].items()},
            "mean_thickness_mm": {k: (v or {}).get("thickness_mm", {}).get("mean") for k, v in m["cartilage"].items()},
            "side": m["side"], "side_source": m["side_source"],
        }
        if args.overlay_prefix:
            image = read_volume(Path(args.dicom) / echo)
            overlay(np.asarray(image.array), np.asarray(labels[echo].array), image.spacing,
                    Path(f"{args.overlay_prefix}_{echo}"))
    dice = {}
    for s in schema.structures:
        a, b = labels["echo1"].array == s.id, labels["echo2"].array == s.id
        total = int(a.sum()) + int(b.sum())
        dice[s.name] = round(2 * int((a & b).sum()) / total, 4) if total else None
    results["echo1_vs_echo2_dice"] = dice

    print(f"model {args.model}; {args.dicom}")
    print("\n| | echo1 | echo2 |\n|---|---|---|")
    for key in ("qc_status", "side", "seconds"):
        print(f"| {key} | {results['echo1'][key]} | {results['echo2'][key]} |")
    for name in [s.name for s in schema.structures]:
        v1, v2 = results["echo1"]["volumes_cm3"].get(name), results["echo2"]["volumes_cm3"].get(name)
        print(f"| {name} volume (cm3) | {v1 if v1 is None else round(v1, 2)} | {v2 if v2 is None else round(v2, 2)} |")
    for plate in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage"):
        t1, t2 = results["echo1"]["mean_thickness_mm"].get(plate), results["echo2"]["mean_thickness_mm"].get(plate)
        print(f"| {plate} mean thickness (mm) | {t1 if t1 is None else round(t1, 2)} | "
              f"{t2 if t2 is None else round(t2, 2)} |")
    print("\n| structure | Dice echo1 vs echo2 |\n|---|---|")
    for name, d in dice.items():
        print(f"| {name} | {d} |")
    for echo in ("echo1", "echo2"):
        for line in results[echo]["qc_failed"]:
            print(f"{echo} QC fail: {line}")
        for line in results[echo]["qc_warned"]:
            print(f"{echo} QC warn: {line}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
