"""Seconds per knee and peak memory of ``bml-pipeline segment`` on one image (default: the real DESS
knee, echo 1), plus optional overlay figures and cartilage/BML volumes of the result.

    python scripts/benchmark_segment.py [--image DIR] [--model NAME] [--device cpu] [--tta]
        [--overlay-prefix docs/segmentation_dess] [--labels-out runs/dess_labels.nii.gz]

Peak memory is the process's maximum resident set size (``getrusage``), which includes the image, the
network and every intermediate; on CUDA the peak allocated GPU memory is reported too. On a shared
machine wall seconds depend on the load, so the process's CPU seconds and the load average are
reported with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "knee_dess_dicom" / "echo1"
COLOURS = {1: (0.9, 0.8, 0.2), 2: (0.1, 0.9, 0.9), 3: (0.3, 0.5, 1.0), 4: (1.0, 0.3, 1.0), 5: (0.6, 1.0, 0.4),
           6: (1.0, 0.6, 0.2), 7: (1.0, 0.0, 0.0), 8: (1.0, 0.0, 0.0), 9: (1.0, 0.0, 0.0)}


def overlay(image: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], out_prefix: Path) -> list[Path]:
    """Sagittal slices through the lateral and medial femoral condyles and a coronal slice through
    both, image in grey with label outlines/fill; arrays are RAS-canonical (x, y, z)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    femur = np.isin(labels, (1, 7))
    xs = np.flatnonzero(femur.any(axis=(1, 2)))
    cart = np.isin(labels, (2, 4))
    ys = np.flatnonzero(cart.any(axis=(0, 2)))
    if xs.size == 0:
        xs = np.array([0, labels.shape[0] - 1])
    if ys.size == 0:
        ys = np.array([labels.shape[1] // 2])
    x_sl = [int(xs[0] + 0.28 * (xs[-1] - xs[0])), int(xs[0] + 0.72 * (xs[-1] - xs[0]))]
    y_cor = int(np.median(np.nonzero(cart)[1])) if cart.any() else int(ys.mean())
    lo, hi = np.percentile(image, (1, 99.5))

    def rgb(sl_img: np.ndarray, sl_lab: np.ndarray) -> np.ndarray:
        g = np.clip((sl_img - lo) / (hi - lo), 0, 1)
        out = np.stack([g, g, g], axis=-1)
        for lab, col in COLOURS.items():
            m = sl_lab == lab
            out[m] = 0.55 * out[m] + 0.45 * np.array(col)
        return out

    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(12, 12))
    for col, x in enumerate(x_sl):
        for row, show in enumerate((False, True)):
            ax = axes[row, col]
            im, lab = image[x].T, labels[x].T  # (z, y): superior up, anterior right
            ax.imshow(rgb(im, lab) if show else np.clip((im - lo) / (hi - lo), 0, 1), cmap="gray", origin="lower",
                      aspect=spacing[2] / spacing[1], interpolation="nearest")
            ax.set_title(f"sagittal x index {x} ({'labels' if show else 'image'})")
            ax.axis("off")
    fig.tight_layout()
    paths.append(out_prefix.with_name(out_prefix.name + "_sagittal.png"))
    fig.savefig(paths[-1], dpi=70)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(14, 7))
    im, lab = image[:, y_cor].T, labels[:, y_cor].T  # (z, x)
    for ax, show in zip(axes, (False, True)):
        ax.imshow(rgb(im, lab) if show else np.clip((im - lo) / (hi - lo), 0, 1), cmap="gray", origin="lower",
                  aspect=spacing[2] / spacing[0], interpolation="nearest")
        ax.set_title(f"coronal y index {y_cor} ({'labels' if show else 'image'}; image left = patient left)")
        ax.axis("off")
    fig.tight_layout()
    paths.append(out_prefix.with_name(out_prefix.name + "_coronal.png"))
    fig.savefig(paths[-1], dpi=70)
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--model", default="knee_synth_v1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overlay-prefix", help="write <prefix>_sagittal.png and <prefix>_coronal.png")
    parser.add_argument("--labels-out", help="also write the labels as NIfTI")
    args = parser.parse_args()

    import torch

    from bml_pipeline.io import read_volume, write_nifti
    from bml_pipeline.segment.predictor import Predictor

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    image = read_volume(args.image)
    t_read = time.perf_counter() - t0
    predictor = Predictor.load(args.model, device=args.device)
    t1 = time.perf_counter()
    labels = predictor.segment(image, tta=args.tta)
    t_seg = time.perf_counter() - t1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = usage.ru_maxrss / 1024
    counts = np.bincount(np.asarray(labels.array).ravel(), minlength=10)
    vox_cm3 = labels.voxel_volume_mm3 / 1000
    result = {
        "image": args.image, "shape": list(image.shape), "spacing_mm": [round(s, 4) for s in image.spacing],
        "model": predictor.model_id, "device": str(predictor.device), "threads": args.threads, "tta": args.tta,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "seconds_read": round(t_read, 2), "seconds_segment": round(t_seg, 2), "steps": predictor.timings,
        "peak_rss_mb": round(peak_mb, 1),
        "cpu_seconds_process": round(usage.ru_utime + usage.ru_stime, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "volumes_cm3": {name: round(float(counts[i] * vox_cm3), 3) for i, name in enumerate(
            ["background", "femur", "femoral_cartilage", "tibia", "tibial_cartilage", "patella",
             "patellar_cartilage", "femoral_bml", "tibial_bml", "patellar_bml"]) if i},
    }
    if predictor.device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if args.labels_out:
        write_nifti(labels, args.labels_out, dtype="uint8")
    if args.overlay_prefix:
        result["figures"] = [str(p) for p in overlay(np.asarray(image.array, np.float32), np.asarray(labels.array),
                                                      image.spacing, Path(args.overlay_prefix))]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
