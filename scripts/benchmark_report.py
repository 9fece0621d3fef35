"""Time the per-scan report on a 512 x 512 x 160 scan and check its size (< 10 MB) and speed (< 10 s).

The scan: a real OAI label map (../shared/data/oai_labels) resampled, nearest neighbour, onto a
160 x 512 x 512 grid of the same field of view (0.7 x 0.273 x 0.273 mm), a DESS-like image synthesized
from it (``bml_pipeline.synth.image``, stored as int16 like scanner data), and
the measure stage's real outputs (measurements.json, provenance, thickness maps). Only
``write_scan_report`` is timed; the preparation is reported separately.

    .venv/bin/python scripts/benchmark_report.py [--labels FILE] [--prior FILE] [--keep DIR] [--repeat N]

Exit status 1 when the report is 10 MB or larger or takes 10 s or more (best of ``--repeat`` runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("BML_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_LABELS = SHARED / "oai_labels" / "akoa_9135902_96m_labels.nii.gz"
DEFAULT_PRIOR = SHARED / "oai_labels" / "akoa_9135902_00m_labels.nii.gz"
SHAPE = (160, 512, 512)
SIZE_LIMIT_MB, TIME_LIMIT_S = 10.0, 10.0


def upsampled_labels(path: Path):
    """The label map at ``path`` on a 160 x 512 x 512 grid covering the same field of view."""
    from bml_pipeline.io import read_labels
    from bml_pipeline.labels import load_schema

    labels = read_labels(path, load_schema("oai_zib"))
    index = [np.minimum((np.arange(n) + 0.5) * (m / n), m - 1).astype(np.intp) for n, m in zip(SHAPE, labels.shape)]
    array = labels.array[np.ix_(*index)]
    scale = np.array(labels.shape, dtype=np.float64) / np.array(SHAPE)
    affine = labels.affine.copy()
    affine[:3, :3] = labels.affine[:3, :3] * scale
    affine[:3, 3] = labels.world_coords((scale - 1) / 2)  # first new voxel centre
    from bml_pipeline.volume import Volume, VolumeMeta

    return Volume(np.ascontiguousarray(array), affine, VolumeMeta(source=str(path)))


def mr_like_image(labels, seed: int = 0) -> np.ndarray:
    """An int16 DESS-like image of ``labels`` from the package's synthesizer (scanner-like range)."""
    from bml_pipeline.synth.image import synthesize

    image = synthesize(labels, seed=seed).image.array
    return np.round(image / max(float(image.max()), 1e-6) * 4000).astype(np.int16)


def prepare_run(labels_path: Path, run_dir: Path, side: str | None = None) -> float:
    """Write a run directory (labels, image, measure outputs) for ``labels_path``; returns seconds."""
    from bml_pipeline.io import write_nifti
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure import measure_labels, write_measurements

    start = time.perf_counter()
    labels = upsampled_labels(labels_path)
    image = labels.with_array(mr_like_image(labels))
    write_nifti(labels, run_dir / "labels.nii.gz", dtype=np.uint16)
    write_nifti(image, run_dir.parent / f"{run_dir.name}_image.nii.gz")
    measurements = measure_labels(labels, load_schema("oai_zib"), side=side)
    provenance = {"version": "benchmark", "config": {"label_schema": "oai_zib"},
                  "inputs": {"image": {"path": str(run_dir.parent / f"{run_dir.name}_image.nii.gz")},
                             "labels": {"path": str(run_dir / "labels.nii.gz")}}}
    write_measurements(run_dir, measurements, provenance)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS, help="label map of the current visit")
    parser.add_argument("--prior", type=Path, default=DEFAULT_PRIOR, help="label map of the prior visit ('' for none)")
    parser.add_argument("--keep", type=Path, help="keep the run directories here (reused when already there)")
    parser.add_argument("--repeat", type=int, default=2, help="timed report runs (the best is judged)")
    args = parser.parse_args(argv)

    from bml_pipeline.report.html import write_scan_report

    with tempfile.TemporaryDirectory(prefix="bml-report-bench-") as tmp:
        root = args.keep or Path(tmp)
        current, prior = root / "current", root / "prior" if str(args.prior) else None
        prep = 0.0
        for labels_path, run_dir in ((args.labels, current), (args.prior, prior)):
            if run_dir is not None and not (run_dir / "measurements.json").is_file():  # --keep reuses them
                prep += prepare_run(labels_path, run_dir)
        print(f"prepared {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} run directories in {prep:.1f} s (not timed below)")
        load = os.getloadavg()[0]
        results = {}
        for label, prior_dir in (("scan", None), ("scan + prior", prior)):
            if label == "scan + prior" and prior_dir is None:
                continue
            times = []
            for _ in range(max(1, args.repeat)):
                cpu, wall = time.process_time(), time.perf_counter()
                path = write_scan_report(current, prior_dir=prior_dir)
                times.append((time.perf_counter() - wall, time.process_time() - cpu))
            size_mb = path.stat().st_size / 1e6
            best = min(times)
            results[label] = (best[0], size_mb)
            print(f"report ({label}): best wall {best[0]:.2f} s (CPU {best[1]:.2f} s) of {len(times)}, "
                  f"{size_mb:.2f} MB")
        print(f"load average at start: {load:.1f} on {os.cpu_count()} CPUs (wall time grows with other work)")
    wall = results["scan"][0]
    ok = wall < TIME_LIMIT_S and all(s < SIZE_LIMIT_MB for _, s in results.values())
    print(f"{'PASS' if ok else 'FAIL'}: one scan {wall:.2f} s (limit {TIME_LIMIT_S:g} s), "
          f"largest report {max(s for _, s in results.values()):.2f} MB (limit {SIZE_LIMIT_MB:g} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
