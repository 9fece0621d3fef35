"""Speed and memory of ``bml-pipeline measure`` on real OAI label maps.

Prints:

1. a table, one row per map: the whole command (``python -m bml_pipeline -q measure LABELS --out DIR``)
   in a child process, median over ``--repeats`` runs of its wall time, CPU time (user + system, all
   threads) and peak resident memory (from ``wait4``), and a median row over the maps. With
   ``--baseline REPO`` the same runs of another checkout (e.g. an older commit, ``git worktree add``)
   are interleaved with these (run i of this checkout, then run i of the baseline, map by map, so a
   shared machine's load hits both alike) and a second table and the ratios follow;
2. with ``--steps``: per-step times inside ``measure_labels`` on the first map (the plates run
   concurrently beside QC, anatomy and lesions: each plate's own wall time, ``thickness`` for all of
   them) and the plain reference, 2 x EDT on the skeleton of the femoral cartilage, in this process;
3. with ``--scaling``: how the cost grows with voxel count (the first map resampled along its slice
   axis: every second slice, as is, every slice twice; nearest neighbour, so the anatomy is the same).

The machine is often shared: the load average is printed, medians (not minima) are reported, and CPU
seconds are the figure to compare across runs when the load differs. ``--threads N`` sets
``OMP_NUM_THREADS`` for the children (the measure stage's own thread count; unset: all CPUs).

Usage: ``python scripts/benchmark_measure.py [LABELS ...] [--repeats 3] [--threads N]
[--baseline REPO] [--steps] [--scaling]``. Default maps: the six used for the measure stage's
equivalence checks, from ``$BML_SHARED_DATA/oai_labels`` (default ``../shared/data/oai_labels``).
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
DEFAULT_MAPS = ("akoa_9031930_00m", "akoa_9031930_36m", "zib_9002430", "zib_9016403", "akoa_9255535_00m",
                "zib_9036770")


def run_command(labels: Path, out: Path, repo: Path, threads: int | None) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one ``measure`` command of checkout ``repo`` in a child process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bml_pipeline", "-q", "measure", str(labels.resolve()),
                             "--out", str(out)], cwd=repo, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"measure failed with status {status} ({repo}, {labels})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def print_table(title: str, rows: dict[str, tuple[float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'map':28s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MB':>12s}")
    for name, (wall, cpu, rss) in rows.items():
        print(f"  {name:28s} {wall:8.2f} {cpu:8.2f} {rss:12.0f}")
    med = [statistics.median(r[i] for r in rows.values()) for i in range(3)]
    print(f"  {'median':28s} {med[0]:8.2f} {med[1]:8.2f} {med[2]:12.0f}")


def whole_command(maps: list[Path], repeats: int, threads: int | None, baseline: Path | None) -> None:
    checkouts = [("this checkout", REPO)] + ([("baseline", baseline)] if baseline else [])
    runs: dict[str, dict[str, list[tuple[float, float, float]]]] = {name: {} for name, _ in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for labels in maps:
            for i in range(repeats):
                for name, repo in checkouts:
                    out = Path(tmp) / f"{name.replace(' ', '_')}_{labels.name}_{i}"
                    runs[name].setdefault(map_name(labels), []).append(run_command(labels, out, repo, threads))
    tables = {}
    for name, repo in checkouts:
        rows = {m: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for m, rs in runs[name].items()}
        tables[name] = rows
        print_table(f"1. Whole command `bml-pipeline measure`, {name} ({repo}), median of {repeats} "
                    f"(OMP_NUM_THREADS={threads if threads is not None else 'unset'})", rows)  # type: ignore[arg-type]
    if baseline:
        print("\n  ratio this / baseline (median over maps): "
              + ", ".join(f"{label} {statistics.median(tables['this checkout'][m][i] / tables['baseline'][m][i] for m in tables['baseline']):.2f}"
                          for i, label in enumerate(("wall", "CPU", "peak RSS"))))


def map_name(path: Path) -> str:
    return path.name.removesuffix(".nii.gz").removesuffix("_labels")


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
    print(f"\n2. Steps inside one process, {map_name(labels_path)} (median s; the plates run beside qc, "
          "anatomy and lesions)")
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
    parser.add_argument("labels", nargs="*", type=Path, help="label maps (default: the six named in the doc)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
    parser.add_argument("--baseline", type=Path, help="another checkout to time the same way, interleaved")
    parser.add_argument("--steps", action="store_true", help="per-step times in this process (first map)")
    parser.add_argument("--scaling", action="store_true", help="cost against voxel count (first map)")
    args = parser.parse_args()
    maps = args.labels or [DEFAULT_DIR / f"{m}_labels.nii.gz" for m in DEFAULT_MAPS]
    missing = [str(p) for p in maps if not p.is_file()]
    if missing:
        raise SystemExit(f"label maps not found: {', '.join(missing)} (set BML_SHARED_DATA or name the maps)")
    if args.baseline and not (args.baseline / "bml_pipeline").is_dir():
        raise SystemExit(f"--baseline {args.baseline}: not a checkout (no bml_pipeline folder)")
    print(f"{len(maps)} maps, {args.repeats} runs each; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs at the start")
    whole_command(maps, args.repeats, args.threads, args.baseline.resolve() if args.baseline else None)
    print(f"\n  load average {os.getloadavg()[0]:.1f} at the end")
    if args.steps:
        in_process(maps[0], args.repeats)
    if args.scaling:
        scaling(maps[0])


if __name__ == "__main__":
    main()
