"""``bml-pipeline train --config configs/models/<name>.yaml``: train a segmentation network on images
synthesized on the fly from label maps (resumable; stop with SIGTERM, Ctrl-C or ``<run_dir>/STOP``)."""

from __future__ import annotations

import argparse

from bml_pipeline.commands import Command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (configs/models/<name>.yaml)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--export", metavar="PATH",
                        help="do not train: write the run's latest local checkpoint as a safetensors weights file")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.segment.config import load_train_config
    from bml_pipeline.segment.training import export_checkpoint, train

    if args.export:
        info = export_checkpoint(load_train_config(args.config), args.export)
        print(f"exported step {info['step']} to {args.export}")
        return 0
    ckpt = train(load_train_config(args.config), resume=not args.fresh)
    print(f"checkpoint: {ckpt}")
    return 0


COMMAND = Command("train", "train a segmentation network on synthesized images", _add_arguments, _run)
