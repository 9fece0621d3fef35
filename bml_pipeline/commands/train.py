"""``bml-pipeline train --config configs/models/<name>.yaml``: train a segmentation network on images
synthesized on the fly from label maps (resumable; stop with SIGTERM, Ctrl-C or ``<run_dir>/STOP``)."""

from __future__ import annotations

import argparse

from bml_pipeline.commands import Command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (configs/models/<name>.yaml)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--minutes", type=float, help="stop (saving everything) after this many minutes")
    parser.add_argument("--device", help="override training.device (cpu, cuda, cuda:N, auto)")
    parser.add_argument("--workers", type=int, help="override training.data_workers (sample-making processes)")
    parser.add_argument("--export", metavar="PATH",
                        help="do not train: write the run's latest local checkpoint as a safetensors weights file")


def _run(args: argparse.Namespace) -> int:
    from bml_pipeline.segment.config import load_train_config
    from bml_pipeline.segment.training import export_checkpoint, train

    if args.export:
        info = export_checkpoint(load_train_config(args.config), args.export)
        print(f"exported step {info['step']} to {args.export}")
        return 0
    import dataclasses

    config = load_train_config(args.config)
    overrides = {k: v for k, v in (("device", args.device), ("data_workers", args.workers)) if v is not None}
    config = dataclasses.replace(config, training=dataclasses.replace(config.training, **overrides))
    ckpt = train(config, resume=not args.fresh, minutes=args.minutes)
    print(f"checkpoint: {ckpt}")
    return 0


COMMAND = Command("train", "train a segmentation network on synthesized images", _add_arguments, _run)
