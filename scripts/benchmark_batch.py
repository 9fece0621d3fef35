"""Batch throughput: knees per hour for measure-only batches of real label maps, per executor.

Runs the same manifest (the first N single-visit ``zib_*`` maps of the shared OAI label maps, so no visit
pairs) through the local executor with 1 and 2 workers and through the Dask executor (a LocalCluster of
2 workers), each into a fresh folder, and reports wall time, knees per hour, mean seconds per scan and
the executor overhead (wall time minus the scans' own wall time divided by the workers); CPU seconds per
scan tell what a scan costs when other work shares the machine. Per-scan reports
are off (measure only) unless ``--reports``. Checks that every run gives a byte-identical cohort.csv.

    .venv/bin/python scripts/benchmark_batch.py [--maps 6] [--data ../shared/data/oai_labels] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bml_pipeline.batch import BatchSettings, DaskExecutor, LocalExecutor, load_manifest, run_batch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("BML_SHARED_DATA", REPO.parent / "shared" / "data")) / "oai_labels"


def write_manifest(data: Path, n_maps: int, folder: Path) -> Path:
    """A manifest of the first ``n_maps`` single-visit maps (sorted by name)."""
    maps = sorted(data.glob("zib_*_labels.nii.gz"))[:n_maps]
    if len(maps) < n_maps:
        sys.exit(f"only {len(maps)} zib_* label maps in {data}")
    lines = ["subject,visit,labels"] + [f"{p.name.split('_')[1]},00m,{p}" for p in maps]
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run_one(name: str, executor, workers: int, manifest: Path, out: Path, reports: bool) -> dict:
    """One timed batch; returns its numbers."""
    scans = load_manifest(manifest)
    seconds: list[float] = []
    cpu: list[float] = []

    def record(outcome) -> None:  # type: ignore[no-untyped-def]
        seconds.append(outcome.seconds)
        cpu.append(outcome.cpu_seconds)

    start = time.perf_counter()
    summary = run_batch(scans, out, executor, BatchSettings(report=reports), on_outcome=record)
    wall = time.perf_counter() - start
    if summary.failed:
        sys.exit(f"{name}: {summary.failed} scans failed: {summary.failures}")
    busy = sum(seconds)
    return {"executor": name, "workers": workers, "scans": len(scans), "wall_s": round(wall, 1),
            "knees_per_hour": round(len(scans) / wall * 3600, 1), "mean_scan_s": round(busy / len(scans), 1),
            "mean_scan_cpu_s": round(sum(cpu) / len(scans), 1), "overhead_s": round(wall - busy / workers, 1)}


def _commit() -> str:
    """The repository's HEAD commit (short), with ``+dirty`` when the working tree has changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                   else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=6, help="number of label maps (default 6)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"label map folder (default {DEFAULT_DATA})")
    parser.add_argument("--reports", action="store_true", help="also write per-scan and cohort reports")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    load_before, commit_before = os.getloadavg(), _commit()
    results = []
    with tempfile.TemporaryDirectory(prefix="bml_bench_") as tmp:
        folder = Path(tmp)
        manifest = write_manifest(args.data, args.maps, folder)
        runs = [("local", LocalExecutor(1), 1), ("local", LocalExecutor(2), 2),
                ("dask LocalCluster", DaskExecutor(workers=2), 2)]
        for i, (name, executor, workers) in enumerate(runs):
            result = run_one(name, executor, workers, manifest, folder / f"run{i}", args.reports)
            print(f"{name:18s} {workers} worker(s): {result['wall_s']:7.1f} s, {result['knees_per_hour']:7.1f} "
                  f"knees/h, {result['mean_scan_s']:5.1f} s/scan ({result['mean_scan_cpu_s']:.1f} s CPU), "
                  f"overhead {result['overhead_s']:5.1f} s",
                  flush=True)
            results.append(result)
        tables = [(folder / f"run{i}" / "cohort.csv").read_bytes() for i in range(len(runs))]
    identical = len(set(tables)) == 1
    differing = [f"{r['executor']} {r['workers']}" for r, t in zip(results, tables) if t != tables[0]]
    info = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                       f"{platform.python_version()}",
            "maps": args.maps, "reports": args.reports, "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "cohort_tables_identical": identical,
            "commit_before": commit_before, "commit_after": _commit(),
            "results": results}
    print(f"load average before {info['load_average_before']}, after {info['load_average_after']}; commit "
          f"{info['commit_before']} -> {info['commit_after']}; cohort.csv identical across executors: {identical}"
          + (f" (differs from the first run: {differing})" if differing else ""))
    print("\n| executor | workers | scans | wall (s) | knees/hour | mean s/scan (wall) | mean s/scan (CPU) "
          "| overhead (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['executor']} | {r['workers']} | {r['scans']} | {r['wall_s']} | {r['knees_per_hour']} | "
              f"{r['mean_scan_s']} | {r['mean_scan_cpu_s']} | {r['overhead_s']} |")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")
    if not identical:
        sys.exit("cohort.csv differs between executors (did the code change during the run?)")


if __name__ == "__main__":
    main()
