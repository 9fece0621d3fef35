"""``bml-pipeline run IMAGE --out DIR``: segment (unless labels are given), measure and report one scan."""

from __future__ import annotations

import argparse
import sys
import time

from bml_pipeline.commands import Command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", nargs="?", help="NIfTI/MHA/NRRD file or DICOM directory")
    parser.add_argument("--labels", help="label map on the image's grid (skips segmentation); alone, measures it")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--side", choices=("left", "right"), help="knee side when the file does not say it")
    parser.add_argument("--series", metavar="UID", help="DICOM series to read when the folder holds several")
    parser.add_argument("--date", metavar="YYYY-MM-DD", help="acquisition date (default: the DICOM's own)")
    parser.add_argument("--model", help="segmentation model name or weights path (default: the shipped model)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N")
    parser.add_argument("--tta", action="store_true", help="average with the medial-lateral mirror")
    parser.add_argument("--schema", default="oai_zib", help="label schema name or YAML file")
    parser.add_argument("--config", metavar="YAML", help="config file whose 'measure' section is used")
    parser.add_argument("--no-report", action="store_true", help="skip report.html")
    parser.add_argument("--force", action="store_true", help="replace an earlier run in --out")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.errors import InputError
    from bml_pipeline.io.outdir import check_output_dir
    from bml_pipeline.measure import load_measure_config
    from bml_pipeline.pipeline import process_scan

    if args.image is None and args.labels is None:
        raise InputError(None, "give an IMAGE, --labels, or both")
    check_output_dir(args.out, force=args.force)
    config = load_measure_config(args.config) if args.config else None
    started = time.perf_counter()
    result = process_scan(args.out, image=args.image, labels=args.labels, side=args.side, model=args.model,
                          device=args.device, tta=args.tta, schema=args.schema, config=config, series=args.series,
                          acquisition_date=args.date,
                          report=not args.no_report)
    row = result.row
    if row.get("qc_status") not in (None, "pass"):
        print(f"warning: {args.image or args.labels}: {result.qc_summary}", file=sys.stderr)
    print(f"wrote {result.run_dir}/ ({'segmented, ' if result.segmented else ''}"
          f"{time.perf_counter() - started:.1f} s)")
    for key, label in (("side", "side"), ("bml.total_volume_cm3", "BML total (cm3)"),
                       ("cartilage.femoral_cartilage.thickness_mm.mean", "femoral cartilage mean thickness (mm)")):
        print(f"  {label}: {row.get(key, 'absent')}")
    return 0


COMMAND = Command("run", "segment (unless labels are given), measure and report one scan", _add_arguments, _run)
