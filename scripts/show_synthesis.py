"""Write a PNG panel of every synthesis preset for one real label map (sagittal and coronal slices).

Usage: python scripts/show_synthesis.py [LABELS.nii.gz] [--out docs/synthesis_panel.png] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LABELS = REPO.parent / "shared" / "data" / "oai_labels" / "zib_9002817_labels.nii.gz"


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bml_pipeline.io import read_labels
    from bml_pipeline.labels import load_schema
    from bml_pipeline.synth.image import PRESET_NAMES, synthesize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="?", default=str(DEFAULT_LABELS))
    parser.add_argument("--out", default=str(REPO / "docs" / "synthesis_panel.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    schema = load_schema("oai_zib")
    labels = read_labels(args.labels, schema)
    arr = labels.array
    lesion_ids = [s.id for s in schema.of_kind("lesion")]
    # Sagittal slice (constant R-L index) through the most lesion voxels if any, else the middle.
    counts = np.isin(arr, lesion_ids).sum(axis=(1, 2))
    i = int(np.argmax(counts)) if counts.any() else arr.shape[0] // 2
    j = int(np.argwhere(arr[i] == schema.by_name("femoral_cartilage").id)[:, 0].mean()) \
        if np.any(arr[i] == schema.by_name("femoral_cartilage").id) else arr.shape[1] // 2
    aspect_sag = labels.spacing[2] / labels.spacing[1]
    aspect_cor = labels.spacing[2] / labels.spacing[0]
    fig, axes = plt.subplots(2, len(PRESET_NAMES) + 1, figsize=(3.2 * (len(PRESET_NAMES) + 1), 6.6))
    axes[0, 0].imshow(arr[i].T, origin="lower", cmap="tab10", vmin=0, vmax=9, interpolation="nearest", aspect=aspect_sag)
    axes[1, 0].imshow(arr[:, j].T, origin="lower", cmap="tab10", vmin=0, vmax=9, interpolation="nearest", aspect=aspect_cor)
    axes[0, 0].set_title("labels (sagittal)")
    axes[1, 0].set_title("labels (coronal)")
    for col, preset in enumerate(PRESET_NAMES, start=1):
        image = synthesize(labels, schema, preset, seed=args.seed).image.array
        vmax = float(np.percentile(image, 99.5))
        axes[0, col].imshow(image[i].T, origin="lower", cmap="gray", vmin=0, vmax=vmax, aspect=aspect_sag)
        axes[1, col].imshow(image[:, j].T, origin="lower", cmap="gray", vmin=0, vmax=vmax, aspect=aspect_cor)
        axes[0, col].set_title(preset)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"{Path(args.labels).name}: sagittal slice {i}, coronal slice {j}, seed {args.seed}")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
