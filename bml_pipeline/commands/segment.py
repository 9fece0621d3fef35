"""``bml-pipeline segment IMAGE --out DIR``: label bones, cartilage and BMLs (oai_zib schema).

Writes ``DIR/labels.nii.gz`` on the input's grid with its affine and ``DIR/provenance.json`` (model
id, weights SHA-256, device, seconds). Nothing is written when the input or the model is bad.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bml_pipeline.commands import Command

CONTRASTS = ("unknown", "dess", "pd_fs", "t2", "stir", "t1")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="NIfTI/MHA/NRRD file or DICOM directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--series", metavar="UID", help="DICOM series to read when the folder holds several")
    parser.add_argument("--model", help="shipped model name or weights path (default: the shipped default model)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N")
    parser.add_argument("--force", action="store_true", help="replace an earlier result in --out")
    parser.add_argument("--tta", action="store_true", help="average with the medial-lateral mirror")
    parser.add_argument("--contrast", default="unknown", choices=CONTRASTS,
                        help="image contrast; needed by --refine-bml")
    parser.add_argument("--refine-bml", action="store_true",
                        help="add marrow brighter than mean + k SD of normal marrow to the lesions "
                             "(fluid-sensitive contrast only; Nielsen et al. 2014)")


def _run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from bml_pipeline import __version__
    from bml_pipeline.errors import InputError
    from bml_pipeline.export import write_colour_tables, write_label_nifti
    from bml_pipeline.io import read_volume
    from bml_pipeline.io.outdir import check_output_dir, staged_dir
    from bml_pipeline.labels import load_schema
    from bml_pipeline.segment.bml import FLUID_SENSITIVE, refine_lesions
    from bml_pipeline.segment.predictor import Predictor

    if args.refine_bml and args.contrast not in FLUID_SENSITIVE:
        raise InputError(args.image, f"--refine-bml needs --contrast one of {FLUID_SENSITIVE}, got {args.contrast!r}")
    check_output_dir(args.out, force=args.force)
    t0 = time.perf_counter()
    image = read_volume(args.image, series_uid=args.series)
    from bml_pipeline.pipeline import DEFAULT_MODEL

    predictor = Predictor.load(args.model or DEFAULT_MODEL, device=args.device)
    labels = predictor.segment(image, tta=args.tta)
    cfg = predictor.config
    if args.refine_bml:
        labels = refine_lesions(image, labels, load_schema(cfg.schema), cfg.bml_refine, args.contrast)
    out = Path(args.out)
    provenance = {
        "package": "bml-pipeline", "package_version": __version__, "input": str(args.image), "stage": "segment",
        **predictor.provenance, "tta": bool(args.tta), "contrast": args.contrast,
        "bml_refine": {"enabled": bool(args.refine_bml), "k_sd": cfg.bml_refine.k_sd,
                       "erode_mm": cfg.bml_refine.erode_mm,
                       "min_component_mm3": cfg.bml_refine.min_component_mm3},
        "seconds": {**predictor.timings, "wall": round(time.perf_counter() - t0, 3)},
    }
    with staged_dir(out) as staging:
        write_label_nifti(labels, staging / "labels.nii.gz", dtype=np.uint8, intent_name=cfg.schema)
        write_colour_tables(staging / "labels.nii.gz", load_schema(cfg.schema))
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2))
    print(f"labels: {out / 'labels.nii.gz'} ({predictor.timings['total']:.1f} s on {predictor.device})")
    return 0


COMMAND = Command("segment", "segment bones, cartilage and BMLs with a shipped network", _add_arguments, _run)
