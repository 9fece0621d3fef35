"""``bml-pipeline info PATH``: geometry, side and value range of a volume."""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import numpy as np

from bml_pipeline.commands import Command


def describe(path: str, series_uid: str | None = None) -> dict[str, Any]:
    """A JSON-ready description of the volume at ``path``, in the file's own axis order."""
    from bml_pipeline.io import read_volume

    volume = read_volume(path, series_uid=series_uid, canonical=False)
    arr = volume.array
    corners = [volume.world_coords(np.array(c) * (np.array(volume.shape) - 1))
               for c in itertools.product((0, 1), repeat=3)]
    canonical_order = np.argsort(np.abs(volume.direction).argmax(axis=0))
    info: dict[str, Any] = {
        "path": str(path),
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "orientation": volume.orientation,
        "canonical_shape": [volume.shape[i] for i in canonical_order],
        "voxel_volume_mm3": round(volume.voxel_volume_mm3, 6),
        "affine": np.round(volume.affine, 6).tolist(),
        "corners_ras_mm": {"".join(map(str, c)): np.round(x, 4).tolist()
                           for c, x in zip(itertools.product((0, 1), repeat=3), corners)},
        "dtype": str(arr.dtype),
        "intensity_range": [float(arr.min()), float(arr.max())],
        "laterality": volume.meta.laterality,
        "series_description": volume.meta.series_description,
        "echo_time_ms": volume.meta.echo_time_ms,
        "acquisition_date": volume.meta.acquisition_date,
    }
    if arr.dtype.kind in "iub":
        values = np.unique(arr) if arr.dtype.kind == "i" else np.flatnonzero(np.bincount(arr.ravel().astype(np.int64)))
        if len(values) <= 256:
            info["label_values"] = [int(v) for v in values]
    return info


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="NIfTI/MHA/NRRD file or DICOM directory")
    parser.add_argument("--series", help="series instance UID when a DICOM directory holds several")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _run(args: argparse.Namespace) -> int:
    info = describe(args.path, args.series)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    fmt = lambda v: " x ".join(f"{x:g}" for x in v)
    print(f"{info['path']}")
    print(f"  shape        {fmt(info['shape'])} voxels ({info['dtype']})")
    print(f"  spacing      {fmt(info['spacing_mm'])} mm")
    print(f"  orientation  {info['orientation']} (canonical RAS shape {fmt(info['canonical_shape'])})")
    print(f"  laterality   {info['laterality'] or 'unknown'}")
    print(f"  intensities  {info['intensity_range'][0]:g} .. {info['intensity_range'][1]:g}")
    if "label_values" in info:
        print(f"  labels       {info['label_values']}")
    if info["series_description"]:
        print(f"  series       {info['series_description']!r}, TE {info['echo_time_ms']} ms")
    return 0


COMMAND = Command("info", "print shape, spacing, orientation, side and value range of a volume", _add_arguments, _run)
