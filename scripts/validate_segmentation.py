"""Accuracy of a segmentation model on images synthesized from held-out label maps, per contrast preset.

    python scripts/validate_segmentation.py [--model knee_synth_v1] [--config configs/models/knee_synth_v1.yaml]
        [--presets dess pd_fs t2 t1 random] [--maps 8] [--json runs/validation.json]

For every held-out map (the config's ``training.held_out`` subjects) and preset, an image is
synthesized on the map's own grid (0.7 x 0.36 x 0.36 mm) with :mod:`bml_pipeline.synth.image`
(seed fixed per map and preset), segmented with the predictor, and compared with the map:
Dice per label, BML volume per bone (predicted vs true, cm3 and %), and whether every true lesion
component of >= 0.5 cm3 overlaps a predicted lesion of its bone. Prints one markdown table per preset
and a summary; ``--json`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
NAMES = {1: "femur", 2: "fem. cart.", 3: "tibia", 4: "tib. cart.", 5: "patella", 6: "pat. cart.",
         7: "fem. BML", 8: "tib. BML", 9: "pat. BML"}
BONES = {"femur": 7, "tibia": 8, "patella": 9}
BIG_LESION_CM3 = 0.5


def lesion_detection(truth: np.ndarray, pred: np.ndarray, voxel_cm3: float) -> list[dict[str, object]]:
    """Every true lesion component >= 0.5 cm3 (26-connected, per lesion label) and whether a predicted
    lesion voxel of the same label overlaps it."""
    out = []
    for bone, lab in BONES.items():
        comps, n = ndimage.label(truth == lab, structure=np.ones((3, 3, 3), bool))
        if not n:
            continue
        sizes = np.bincount(comps.ravel())[1:] * voxel_cm3
        hit = np.bincount(comps[(pred == lab) & (comps > 0)], minlength=n + 1)[1:]
        out += [{"bone": bone, "volume_cm3": float(s), "found": bool(h > 0)}
                for s, h in zip(sizes, hit) if s >= BIG_LESION_CM3]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="knee_synth_v1", help="shipped model name or weights path")
    parser.add_argument("--config", default=str(REPO / "configs" / "models" / "knee_synth_v1.yaml"))
    parser.add_argument("--label-dir", help="default: the config's training.label_dir")
    parser.add_argument("--presets", nargs="+", default=["dess", "pd_fs", "t2", "t1", "random"])
    parser.add_argument("--maps", type=int, default=0, help="use only the first N held-out maps (0: all)")
    parser.add_argument("--only", nargs="+", help="use only held-out maps whose names start with these")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()

    import torch

    from bml_pipeline.io import read_volume
    from bml_pipeline.segment.config import load_train_config
    from bml_pipeline.segment.metrics import dice_per_label
    from bml_pipeline.segment.predictor import Predictor
    from bml_pipeline.segment.training import split_label_maps
    from bml_pipeline.synth.image import synthesize

    torch.set_num_threads(args.threads)
    config = load_train_config(args.config)
    label_dir = Path(args.label_dir or config.training.label_dir)
    _, held_out = split_label_maps(label_dir, config.training.held_out)
    if args.only:
        held_out = [p for p in held_out if any(p.name.startswith(o) for o in args.only)]
    if args.maps:
        held_out = held_out[:args.maps]
    predictor = Predictor.load(args.model, device="cpu")
    rows = []
    for m, path in enumerate(held_out):
        truth = read_volume(path)
        truth_arr = np.asarray(truth.array)
        voxel_cm3 = truth.voxel_volume_mm3 / 1000
        for p, preset in enumerate(args.presets):
            image = synthesize(truth, preset=preset, seed=args.seed + 100 * m + p).image
            t0 = time.perf_counter()
            pred = np.asarray(predictor.segment(image, tta=args.tta).array)
            seconds = time.perf_counter() - t0
            dice = dice_per_label(pred, truth_arr, list(NAMES))
            bml = {}
            for bone, lab in BONES.items():
                v_true = float(np.count_nonzero(truth_arr == lab) * voxel_cm3)
                v_pred = float(np.count_nonzero(pred == lab) * voxel_cm3)
                bml[bone] = {"true_cm3": v_true, "pred_cm3": v_pred,
                             "error_percent": 100 * (v_pred - v_true) / v_true if v_true > 0 else None}
            rows.append({"map": path.name, "preset": preset, "seconds": seconds, "dice": dice, "bml": bml,
                         "lesions_ge_0.5cm3": lesion_detection(truth_arr, pred, voxel_cm3)})
            print(f"{path.name} {preset}: " + " ".join(f"{NAMES[k]}={v:.3f}" for k, v in dice.items()
                                                     if np.isfinite(v)) + f" ({seconds:.0f} s)", flush=True)
    print()
    print(summary_markdown(rows, args.presets))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": predictor.provenance, "maps": [p.name for p in held_out],
                                               "presets": args.presets, "seed": args.seed, "rows": rows}, indent=1))


def summary_markdown(rows: list[dict], presets: list[str]) -> str:
    """Mean Dice per label and preset, BML volume error and big-lesion detection, as markdown."""
    head = "| preset | " + " | ".join(NAMES.values()) + " | BML abs. vol. error (median over bones with BML) | lesions >= 0.5 cm3 found |"
    lines = [head, "|" + " --- |" * (len(NAMES) + 3)]
    for preset in presets:
        sel = [r for r in rows if r["preset"] == preset]
        if not sel:
            continue
        means = []
        for k in NAMES:
            vals = [r["dice"][k] for r in sel if np.isfinite(r["dice"][k])]
            means.append(f"{np.mean(vals):.3f} (n={len(vals)})" if vals else "n/a")
        errs = [abs(b["error_percent"]) for r in sel for b in r["bml"].values() if b["error_percent"] is not None]
        big = [les for r in sel for les in r["lesions_ge_0.5cm3"]]
        found = f"{sum(les['found'] for les in big)}/{len(big)}" if big else "none in these maps"
        err = f"{np.median(errs):.0f} % (n={len(errs)})" if errs else "n/a"
        lines.append(f"| {preset} | " + " | ".join(means) + f" | {err} | {found} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
