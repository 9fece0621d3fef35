"""``bml-pipeline measure LABELS --out DIR``: volumes, BML, subregions and cartilage thickness of a label map."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from bml_pipeline.commands import Command

log = logging.getLogger(__name__)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", help="label map (.nii/.nii.gz/.mha/.nrrd)")
    parser.add_argument("--image", help="the image the labels belong to (grid check, side from its metadata)")
    parser.add_argument("--side", choices=("left", "right"), help="knee side when known (else metadata, else anatomy)")
    parser.add_argument("--labels-config", default="oai_zib", metavar="NAME|PATH",
                        help="label schema name in configs/labels or a YAML path (default: oai_zib)")
    parser.add_argument("--config", metavar="YAML", help="config file whose 'measure' section is used")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--force", action="store_true", help="replace an earlier run in --out")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.io import read_labels, read_volume
    from bml_pipeline.io.outdir import check_output_dir, staged_dir
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure import load_measure_config, measure_labels, write_measurements
    from bml_pipeline.provenance import provenance_record

    check_output_dir(args.out, force=args.force)
    start = time.perf_counter()
    config = load_measure_config(args.config)
    schema = load_schema(args.labels_config)
    labels = read_labels(args.labels, schema)
    image = read_volume(args.image) if args.image else None
    read_s = time.perf_counter() - start
    measurements = measure_labels(labels, schema, side=args.side, image=image, config=config)
    provenance = provenance_record(
        step="measure",
        inputs={"labels": args.labels, "image": args.image},
        config={"measure": config.to_dict(), "label_schema": schema.name},
        timings_s={"read": read_s, **measurements.timings_s},
        extra={"side": measurements.side.to_dict()},
    )
    with staged_dir(args.out) as staging:
        write_measurements(staging, measurements, provenance)
    if measurements.qc is not None and measurements.qc.status != "pass":
        print(f"warning: {args.labels}: {measurements.qc.summary()}", file=sys.stderr)
    m = measurements.to_dict()
    log.info("side %s (%s, confidence %.2f); BML total %s cm3; wrote %s in %.1f s", m["side"], m["side_source"],
             m["side_confidence"], m["bml"]["total_volume_cm3"], args.out, time.perf_counter() - start)
    return 0


COMMAND = Command("measure", "measure volumes, bone marrow lesions, subregions and cartilage thickness of a label map",
                  _add_arguments, _run)
