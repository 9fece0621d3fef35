"""Speed and memory of ``bml-pipeline measure`` on a real OAI label map, next to the plain reference.

Prints, as medians over ``--repeats`` runs (the machine is shared: medians, not minima, and expect
noise while others work):

1. the whole command (``python -m bml_pipeline measure``) in a child process: wall time, CPU time and
   peak resident memory (from ``wait4``);
2. per-step times inside ``measure_labels`` (the plates are measured concurrently: each plate's
   own wall time, and ``thickness`` for all of them) and the plain reference, 2 x EDT on the skeleton of the
   femoral cartilage (scipy ``distance_transform_edt`` with ``sampling=spacing``), on the same mask in
   the same process;
3. how the cost grows with voxel count: the same knee resampled along its slice axis (every second
   slice, as is, every slice twice; nearest neighbour, so the anatomy is the same).

Usage: ``python scripts/benchmark_measure.py [LABELS] [--repeats 3]`` (default: the first
``zib_*`` map in ``../shared/data/oai_labels``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path(os.environ.get("BML_SHARED_DATA", REPO.parent / "shared" / "data")) / "oai_labels"


def run_command(labels: Path, out: Path) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one ``measure`` command in a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bml_pipeline", "-q", "measure", str(labels), "--out", str(out)])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"measure failed with status {status}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def in_process(labels_path: Path, repeats: int) -> None:
    from bml_pipeline.io import read_labels
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure import measure_labels, skeleton_edt_thickness

    schema = load_schema("oai_zib")
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        labels = read_labels(labels_path, schema)
        times.setdefault("read", []).append(time.perf_counter() - t0)
        m = measure_labels(labels, schema)
        for k, v in m.timings_s.items():
            times.setdefault(k, []).append(v)
        mask = labels.array == schema.by_name("femoral_cartilage").id
        t0 = time.perf_counter()
        ref = skeleton_edt_thickness(mask, labels.spacing)
        times.setdefault("reference: 2xEDT skeleton (femoral)", []).append(time.perf_counter() - t0)
    print("\n2. Steps inside one process (median s)")
    for k, v in times.items():
        print(f"  {k:40s} {statistics.median(v):7.3f}")
    ours = m.to_dict()["cartilage"]["femoral_cartilage"]["thickness_mm"]["mean"]
    print(f"  femoral cartilage mean thickness: ours {ours:.3f} mm, 2 x EDT on skeleton {ref:.3f} mm")


def scaling(labels_path: Path) -> None:
    from bml_pipeline.io import read_labels
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure import measure_labels
    from bml_pipeline.volume import Volume

    schema = load_schema("oai_zib")
    labels = read_labels(labels_path, schema)
    print("\n3. Cost against voxel count (same knee, slice axis resampled; one run each, s)")
    print(f"  {'voxels':>12s} {'spacing (mm)':>22s} {'measure':>8s} {'thickness':>10s}")
    axis = int(np.argmax(labels.spacing))
    for factor in (0.5, 1.0, 2.0):
        if factor == 0.5:
            array = np.take(labels.array, np.arange(0, labels.shape[axis], 2), axis=axis)
        elif factor == 2.0:
            array = np.repeat(labels.array, 2, axis=axis)
        else:
            array = labels.array
        affine = labels.affine.copy()
        affine[:3, axis] /= factor
        if factor == 2.0:  # voxel centres of the repeated slices straddle the original centre
            affine[:3, 3] -= 0.25 * labels.affine[:3, axis]
        vol = Volume(np.ascontiguousarray(array), affine, labels.meta)
        t0 = time.perf_counter()
        m = measure_labels(vol, schema)
        total = time.perf_counter() - t0
        thick = m.timings_s["thickness"]  # all plates (measured concurrently)
        spacing = "x".join(f"{s:.3g}" for s in vol.spacing)
        print(f"  {array.size:12,d} {spacing:>22s} {total:8.2f} {thick:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="?", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-scaling", action="store_true")
    args = parser.parse_args()
    labels = args.labels or min(DEFAULT_DIR.glob("zib_*_labels.nii.gz"))
    print(f"{labels} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            runs.append(run_command(labels, Path(tmp) / f"run{i}"))
    wall, cpu, rss = (statistics.median(r[i] for r in runs) for i in range(3))
    print("\n1. Whole command `bml-pipeline measure` (child process, median of "
          f"{args.repeats}): wall {wall:.2f} s, CPU {cpu:.2f} s, peak RSS {rss:.0f} MiB")
    in_process(labels, args.repeats)
    if not args.no_scaling:
        scaling(labels)


if __name__ == "__main__":
    main()
