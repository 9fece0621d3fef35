"""Time phantom generation and image synthesis on the OAI grid (160 x 384 x 384, 0.7 x 0.3646 x 0.3646 mm).

Prints a table of wall-clock and CPU seconds (median of ``--repeat`` runs, one process). On a shared
machine, CPU seconds are the fairer number; wall-clock includes waiting for the CPU.

Usage: python scripts/benchmark_synth.py [--labels LABELS.nii.gz] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LABELS = REPO.parent / "shared" / "data" / "oai_labels" / "zib_9002430_labels.nii.gz"


def _time(fn, repeat: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    from bml_pipeline.io import read_labels
    from bml_pipeline.labels import load_schema
    from bml_pipeline.synth.image import synthesize, synthesize_patch
    from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom, phantom_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default=str(DEFAULT_LABELS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    schema = load_schema("oai_zib")
    rows = []
    spec = KneeSpec(pose=Pose((4.0, -3.0, 2.0), (1.0, 2.0, -1.0)))
    shape, affine = phantom_grid(spec, (0.7, 0.3646, 0.3646), shape=(160, 384, 384))
    rows.append(("phantom, 160x384x384 @ 0.7x0.3646x0.3646 mm", *_time(lambda: make_phantom(spec, shape, affine),
                                                                        args.repeat)))
    rows.append(("phantom, own grid @ 0.3125x0.3125x1.5 mm",
                 *_time(lambda: make_phantom(spec, spacing=(0.3125, 0.3125, 1.5)), args.repeat)))
    labels = read_labels(args.labels, schema)
    for preset in ("dess", "pd_fs", "t2", "t1", "random"):
        rows.append((f"synthesize {preset}, {'x'.join(map(str, labels.shape))} (same grid)",
                     *_time(lambda p=preset: synthesize(labels, schema, p, seed=0), args.repeat)))
    rows.append(("synthesize dess -> 1.5 x 0.3646 x 0.3646 mm grid",
                 *_time(lambda: synthesize(labels, schema, "dess", seed=0, target_spacing=(1.5, 0.3646, 0.3646)),
                        args.repeat)))
    centre = tuple(n // 2 for n in labels.shape)
    rows.append(("synthesize_patch dess, 96x160x160 patch",
                 *_time(lambda: synthesize_patch(labels, centre, (96, 160, 160), schema, seed=0), args.repeat)))
    print("| task | wall s | CPU s |\n| --- | ---: | ---: |")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
