"""``bml-pipeline synth``: known-truth test data.

Subcommands:

- ``synth phantom OUT``: an analytic knee phantom (labels, image, truth.json) on any spacing and pose.
- ``synth pair OUT``: two visits of a phantom knee with an injected change and repositioning, plus the
  batch manifest (``OUT/manifest.csv``).
- ``synth image LABELS OUT``: an MR-like image synthesized from a label map (real or phantom).
- ``synth change LABELS OUT``: a follow-up label map with a known BML volume / cartilage thickness
  change and a rigid repositioning, and its truth.json.

All computation happens before anything is written; each file is written atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bml_pipeline.commands import Command
from bml_pipeline.errors import InputError

PRESETS = ("dess", "pd_fs", "t2", "t1", "random")


def _key_values(items: list[str] | None, what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise InputError(None, f"{what} must look like NAME=NUMBER, got {item!r}") from None
    return out


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="dess", help="image contrast (default dess)")
    p.add_argument("--snr", type=float, default=30.0, help="signal-to-noise ratio of the Rician noise (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="synth_command", metavar="WHAT", required=True)

    p = sub.add_parser("phantom", help="analytic knee phantom: labels, image and truth.json")
    p.add_argument("out", help="output folder")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.3646, 0.3646), metavar=("I", "J", "K"),
                   help="voxel size in mm along the array axes (R, A, S) (default 0.7 0.3646 0.3646)")
    p.add_argument("--side", choices=("right", "left"), default="right")
    p.add_argument("--rotation", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"),
                   help="knee rotation in degrees about x, then y, then z")
    p.add_argument("--translation", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"),
                   help="knee translation in mm")
    p.add_argument("--no-image", action="store_true", help="labels and truth only")
    _add_image_options(p)

    p = sub.add_parser("pair", help="two visits of a phantom knee with a known change, and a manifest")
    p.add_argument("out", help="output folder (gets SUBJECT/VISIT/... and manifest.csv)")
    p.add_argument("--subject", default="phantom01")
    p.add_argument("--bml-change", action="append", metavar="BONE=CM3",
                   help="lesion volume change, e.g. femur=-2.1 (repeatable)")
    p.add_argument("--thickness-change", action="append", metavar="PLATE=PERCENT",
                   help="cartilage thickness change, e.g. femoral_cartilage=2.4 (repeatable)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 0.5, 0.5), metavar=("I", "J", "K"))
    p.add_argument("--side", choices=("right", "left"), default="right")
    p.add_argument("--max-rotation", type=float, default=6.0, help="degrees, random repositioning between visits")
    p.add_argument("--max-translation", type=float, default=5.0, help="mm, random repositioning between visits")
    _add_image_options(p)

    p = sub.add_parser("image", help="MR-like image synthesized from a label map")
    p.add_argument("labels", help="label map (.nii.gz, ...), oai_zib schema")
    p.add_argument("out", help="output image (.nii.gz, float32)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("I", "J", "K"),
                   help="resample to this voxel size (mm); the labels on that grid go to --labels-out")
    p.add_argument("--labels-out", help="write the label map on the image's grid here")
    _add_image_options(p)

    p = sub.add_parser("change", help="follow-up label map with a known change and repositioning")
    p.add_argument("labels", help="baseline label map, oai_zib schema")
    p.add_argument("out", help="output folder (labels.nii.gz, truth.json)")
    p.add_argument("--bml-change", action="append", metavar="BONE=CM3")
    p.add_argument("--thickness-change", action="append", metavar="PLATE=PERCENT")
    p.add_argument("--rotation", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"),
                   help="rigid repositioning: degrees about x, then y, then z (about the label map's centre)")
    p.add_argument("--translation", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)


def _run(args: argparse.Namespace) -> int:
    return {"phantom": _phantom, "pair": _pair, "image": _image, "change": _change}[args.synth_command](args)


def _phantom(args: argparse.Namespace) -> int:
    from bml_pipeline.io import write_nifti, write_text_atomic
    from bml_pipeline.synth.image import synthesize
    from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom

    spec = KneeSpec(side=args.side, pose=Pose(tuple(args.rotation), tuple(args.translation)))
    try:
        phantom = make_phantom(spec, spacing=_spacing(args.spacing))
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    image = None if args.no_image else synthesize(phantom.labels, preset=args.preset, seed=args.seed, snr=args.snr).image
    out = Path(args.out)
    write_nifti(phantom.labels, out / "labels.nii.gz")
    if image is not None:
        write_nifti(image, out / "image.nii.gz")
    write_text_atomic(out / "truth.json", json.dumps(phantom.truth.to_dict(), indent=2, sort_keys=True) + "\n")
    _summary(out, phantom.truth.to_dict())
    return 0


def _pair(args: argparse.Namespace) -> int:
    import numpy as np

    from bml_pipeline.synth.pair import phantom_visits, write_visits
    from bml_pipeline.synth.phantom import KneeSpec, Pose

    rng = np.random.default_rng(args.seed)
    baseline = KneeSpec(side=args.side, pose=Pose.random(rng, 3.0, 2.0))
    try:
        visits = phantom_visits(baseline, bml_change_cm3=_key_values(args.bml_change, "--bml-change"),
                                thickness_change_percent=_key_values(args.thickness_change, "--thickness-change"),
                                followup_pose=Pose.random(rng, args.max_rotation, args.max_translation),
                                spacing=_spacing(args.spacing), preset=args.preset, snr=args.snr, seed=args.seed)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    paths = write_visits(args.out, args.subject, visits)
    print(f"wrote {len(paths)} files under {args.out} (manifest {Path(args.out) / 'manifest.csv'})")
    change = visits[1].truth["change"]
    for bone, entry in change["bml"].items():
        if entry["delta_cm3"]:
            print(f"  {bone} BML {entry['baseline_cm3']:.4f} -> {entry['followup_cm3']:.4f} cm3")
    for plate, entry in change["cartilage"].items():
        if entry["delta_percent"]:
            print(f"  {plate} mean thickness {entry['thickness_mean_baseline_mm']:.4f} -> "
                  f"{entry['thickness_mean_followup_mm']:.4f} mm ({entry['delta_percent']:+.3f} %)")
    return 0


def _image(args: argparse.Namespace) -> int:
    from bml_pipeline.io import read_labels, write_nifti
    from bml_pipeline.labels import load_schema
    from bml_pipeline.synth.image import synthesize

    schema = load_schema("oai_zib")
    labels = read_labels(args.labels, schema)
    if args.spacing is not None and args.labels_out is None:
        raise InputError(args.labels, "--spacing resamples the image; give --labels-out for the labels on its grid")
    result = synthesize(labels, schema, args.preset, seed=args.seed, snr=args.snr,
                        target_spacing=None if args.spacing is None else _spacing(args.spacing))
    write_nifti(result.image, args.out)
    if args.labels_out:
        write_nifti(result.labels, args.labels_out)
    print(f"wrote {args.out} ({args.preset}, shape {result.image.shape}, spacing "
          f"{' x '.join(f'{s:.4g}' for s in result.image.spacing)} mm)")
    return 0


def _change(args: argparse.Namespace) -> int:
    import numpy as np

    from bml_pipeline.io import read_labels, write_nifti, write_text_atomic
    from bml_pipeline.labels import load_schema
    from bml_pipeline.synth.change import inject_change
    from bml_pipeline.synth.sdf import rotation_matrix

    schema = load_schema("oai_zib")
    labels = read_labels(args.labels, schema)
    centre = labels.world_coords((np.asarray(labels.shape) - 1) / 2)
    motion = np.eye(4)
    motion[:3, :3] = rotation_matrix(tuple(args.rotation))
    motion[:3, 3] = centre + np.asarray(args.translation) - motion[:3, :3] @ centre
    followup, truth = inject_change(labels, schema, bml_change_cm3=_key_values(args.bml_change, "--bml-change"),
                                    thickness_change_percent=_key_values(args.thickness_change, "--thickness-change"),
                                    reposition=motion, seed=args.seed)
    truth["baseline"] = str(args.labels)
    out = Path(args.out)
    write_nifti(followup, out / "labels.nii.gz")
    write_text_atomic(out / "truth.json", json.dumps(truth, indent=2, sort_keys=True) + "\n")
    _summary(out, truth)
    return 0


def _spacing(values: Any) -> tuple[float, float, float]:
    spacing = tuple(float(v) for v in values)
    if min(spacing) <= 0:
        raise InputError(None, f"--spacing must be positive, got {spacing}")
    return spacing  # type: ignore[return-value]


def _summary(out: Path, truth: dict[str, Any]) -> None:
    print(f"wrote {out}")
    for name, entry in sorted(truth.get("structures", {}).items()):
        print(f"  {name:20s} {entry['reference_cm3']:9.4f} cm3 exact, {entry['rasterized_cm3']:9.4f} cm3 in labels")
    for bone, entry in sorted(truth.get("bml", {}).items()):
        if isinstance(entry, dict):
            print(f"  {bone} BML {entry['baseline_cm3']:.4f} -> {entry['followup_cm3']:.4f} cm3")
    for plate, entry in sorted(truth.get("cartilage", {}).items()):
        if "achieved_thickness_change_percent" in entry:
            print(f"  {plate} thickness {entry['achieved_thickness_change_percent']:+.3f} % "
                  f"(requested {entry['requested_thickness_change_percent']:+.3f} %)")


COMMAND = Command("synth", "known-truth test data: analytic phantoms, synthesized images, injected changes",
                  _add_arguments, _run)
