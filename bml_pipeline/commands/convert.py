"""``bml-pipeline convert IN OUT.nii.gz``: read any supported volume, write canonical RAS NIfTI."""

from __future__ import annotations

import argparse

from bml_pipeline.commands import Command
from bml_pipeline.errors import InputError


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="NIfTI/MHA/NRRD file or DICOM directory")
    parser.add_argument("output", help="output .nii or .nii.gz")
    parser.add_argument("--series", help="series instance UID when a DICOM directory holds several")
    parser.add_argument("--labels", metavar="SCHEMA", help="treat the input as a label map of this schema (e.g. oai_zib) and validate its values")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.io import read_labels, read_volume, write_nifti
    from bml_pipeline.labels import load_schema

    if not args.output.endswith((".nii", ".nii.gz")):
        raise InputError(args.output, "output must end in .nii or .nii.gz")
    if args.labels:
        volume = read_labels(args.input, load_schema(args.labels))
    else:
        volume = read_volume(args.input, series_uid=args.series)
    write_nifti(volume, args.output)
    print(f"wrote {args.output}: {' x '.join(map(str, volume.shape))} voxels, "
          f"{' x '.join(f'{s:.4g}' for s in volume.spacing)} mm, {volume.orientation}")
    return 0


COMMAND = Command("convert", "convert a volume (DICOM, MHA, NRRD, NIfTI) to canonical RAS NIfTI", _add_arguments, _run)
