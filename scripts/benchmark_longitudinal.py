"""Speed and memory of ``bml-pipeline longitudinal`` on a real OAI longitudinal pair.

Both visits are measured first (``bml-pipeline measure``, not timed), as a batch does; then the
``longitudinal`` command runs ``--repeats`` times in a child process. Printed: wall time, CPU time and peak
resident memory (from ``wait4``) of each run and their medians, and whether every run wrote the same
``change.json`` (byte for byte). The machine is shared: medians, not minima.

Usage: ``python scripts/benchmark_longitudinal.py [--subject 9031930] [--repeats 3]`` (default: the first
``akoa_*`` subject with two visits in ``../shared/data/oai_labels``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oai_labels"
PATTERN = re.compile(r"akoa_(\d+)_(\d+m)_labels\.nii\.gz$")


def child(*args: str) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of ``python -m bml_pipeline -q ARGS`` in a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bml_pipeline", "-q", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"bml-pipeline {args[0]} failed with status {status}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def visits_of(data: Path, subject: str | None) -> tuple[Path, Path]:
    """The first two visits (by name) of ``subject``, or of the first subject that has two."""
    by_subject: dict[str, list[Path]] = {}
    for path in sorted(data.glob("akoa_*_labels.nii.gz")):
        match = PATTERN.search(path.name)
        if match:
            by_subject.setdefault(match.group(1), []).append(path)
    for name, paths in sorted(by_subject.items()):
        if (subject is None or name == subject) and len(paths) >= 2:
            return paths[0], paths[1]
    raise SystemExit(f"no subject with two visits in {data}" + (f" named {subject}" if subject else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--subject")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    first, second = visits_of(args.data, args.subject)
    print(f"{first.name} -> {second.name} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        base, foll = Path(tmp) / "base", Path(tmp) / "foll"
        child("measure", str(first), "--out", str(base))
        child("measure", str(second), "--out", str(foll))
        runs, outputs = [], []
        for i in range(args.repeats):
            out = Path(tmp) / f"change{i}"
            runs.append(child("longitudinal", "--baseline", str(base), "--followup", str(foll), "--out", str(out)))
            outputs.append((out / "change.json").read_bytes())
            print(f"  run {i}: wall {runs[-1][0]:.2f} s, CPU {runs[-1][1]:.2f} s, peak RSS {runs[-1][2]:.0f} MiB")
    wall, cpu, rss = (statistics.median(r[i] for r in runs) for i in range(3))
    print(f"\n`bml-pipeline longitudinal` (child process, median of {args.repeats}): wall {wall:.2f} s, "
          f"CPU {cpu:.2f} s, peak RSS {rss:.0f} MiB; change.json identical across runs: "
          f"{'yes' if len(set(outputs)) == 1 else 'NO'}")


if __name__ == "__main__":
    main()
