"""Training loop: patches from the synthesized pool, DiceCE loss, AdamW, resumable checkpoints,
validation Dice per label on held-out maps. Logs one JSON line per event to ``<run_dir>/log.jsonl``.

Layout: patches (N, 1, D, H, W) float32, targets (N, 1, D, H, W) int64 label ids.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import signal
import time
from pathlib import Path

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import load_schema
from bml_pipeline.segment.config import TrainConfig
from bml_pipeline.segment.metrics import dice_per_label
from bml_pipeline.segment.pool import run_pool_generator, sample_patch, synthesize_training_volume

log = logging.getLogger(__name__)


def split_label_maps(label_dir: Path, held_out: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(training, validation) label map paths; a map is held out when its name starts with any
    ``held_out`` prefix (a subject id holds out all its visits)."""
    paths = sorted(label_dir.glob("*.nii.gz"))
    if not paths:
        raise InputError(label_dir, "no label maps (*.nii.gz) found")
    val = [p for p in paths if any(p.name.startswith(h) for h in held_out)]
    train = [p for p in paths if p not in val]
    return train, val


def _pool_worker(args: tuple) -> None:
    import os

    os.nice(5)
    Path(args[1]).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, filename=str(Path(args[1]) / "pool.log"))
    run_pool_generator(*args)


def train(config: TrainConfig, resume: bool = True) -> Path:
    """Train until ``max_steps`` (or until ``<run_dir>/STOP`` exists); returns the checkpoint path.

    The checkpoint ``<run_dir>/checkpoint.pt`` (model, optimiser, step, best validation score) is
    written every ``checkpoint_every`` steps and reloaded with ``weights_only=True`` on resume;
    ``<run_dir>/best.pt`` holds the model with the best mean validation Dice.
    """
    import torch
    from monai.losses import DiceCELoss

    from bml_pipeline.io import read_volume
    from bml_pipeline.segment.inference import predict_probabilities
    from bml_pipeline.segment.network import build_network

    tc, mc = config.training, config.model
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    run_dir = Path(tc.run_dir)
    pool_dir = run_dir / "pool"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "STOP").unlink(missing_ok=True)
    train_paths, val_paths = split_label_maps(Path(tc.label_dir), tc.held_out)
    (run_dir / "split.json").write_text(json.dumps(
        {"train": [p.name for p in train_paths], "validation": [p.name for p in val_paths]}, indent=1))
    schema = load_schema(mc.schema)
    cartilage_ids = tuple(s.id for s in schema.of_kind("cartilage"))
    lesion_ids = tuple(s.id for s in schema.of_kind("lesion"))
    class_ids = sorted(s.id for s in schema.structures)

    ctx = mp.get_context("spawn")
    worker = ctx.Process(target=_pool_worker, daemon=True, args=((
        train_paths, pool_dir, mc.working_spacing_mm, mc.inference.percentiles, tc.seed, tc.pool_size,
        run_dir / "STOP", tc.pool_volumes_max),))
    worker.start()

    val_rng = np.random.default_rng([tc.seed, 10**6])
    validation = [synthesize_training_volume(read_volume(p), mc.working_spacing_mm, val_rng, mc.inference.percentiles)
                  for p in val_paths[::max(1, len(val_paths) // max(tc.validation_volumes, 1))][:tc.validation_volumes]]

    net = build_network(mc)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    step, best = 0, -1.0
    ckpt_path = run_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, best = int(ckpt["step"]), float(ckpt["best"])
        log.info("resumed at step %d (best %.4f)", step, best)
    rng = np.random.default_rng([tc.seed, step])
    logf = (run_dir / "log.jsonl").open("a")

    def emit(**rec: object) -> None:
        logf.write(json.dumps({"time": time.strftime("%H:%M:%S"), "step": step, **rec}) + "\n")
        logf.flush()

    def save_checkpoint() -> None:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step, "best": best},
                   run_dir / "checkpoint.tmp")
        (run_dir / "checkpoint.tmp").replace(ckpt_path)

    def _loop() -> None:
        nonlocal step, best
        pool: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        losses: list[float] = []
        t0 = time.time()
        while step < tc.max_steps and not (run_dir / "STOP").exists():
            if step % tc.pool_refresh_every == 0 or len(pool) < 2:
                files = sorted(pool_dir.glob("vol_*.npz"))
                while len(files) < 2:
                    time.sleep(5)
                    files = sorted(pool_dir.glob("vol_*.npz"))
                pool = []
                for f in files:
                    try:
                        with np.load(f) as z:
                            image, labels = z["image"], z["labels"]
                        flat = labels.ravel()
                        pool.append((image, labels, np.flatnonzero(np.isin(flat, lesion_ids)),
                                     np.flatnonzero(np.isin(flat, cartilage_ids))))
                    except (OSError, ValueError, KeyError):
                        continue
            net.train()
            imgs, labs = [], []
            for _ in range(tc.batch_size):
                image, labels, lesion_idx, cartilage_idx = pool[int(rng.integers(len(pool)))]
                img, lab = sample_patch(image, labels, tc.patch_size, rng, lesion_idx, cartilage_idx,
                                        tc.lesion_patch_fraction, tc.cartilage_patch_fraction)
                imgs.append(img)
                labs.append(lab)
            x = torch.from_numpy(np.stack(imgs)[:, None])
            y = torch.from_numpy(np.stack(labs)[:, None])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % 50 == 0:
                emit(loss=float(np.mean(losses)), sec_per_step=(time.time() - t0) / 50, pool=len(pool))
                losses, t0 = [], time.time()
            if step % tc.checkpoint_every == 0:
                save_checkpoint()
            if step % tc.validate_every == 0 and validation:
                scores = []
                for image, labels in validation:
                    probs = predict_probabilities(net, image.astype(np.float32), mc.inference, torch.device("cpu"))
                    pred = probs.argmax(0).numpy()
                    scores.append(dice_per_label(pred, labels, class_ids))
                per_label = {str(k): float(np.nanmean([s[k] for s in scores])) for k in class_ids}
                main = float(np.nanmean([per_label[str(k)] for k in (1, 2, 3, 4, 5, 6)]))
                emit(val_dice=per_label, val_main=main)
                if main > best:
                    best = main
                    # Written aside and renamed: a run killed mid-write keeps its previous best.
                    torch.save({"model": net.state_dict(), "step": step, "val_dice": per_label}, run_dir / "best.tmp")
                    (run_dir / "best.tmp").replace(run_dir / "best.pt")
                t0 = time.time()

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        _loop()
    except KeyboardInterrupt:
        log.info("interrupted at step %d", step)
        save_checkpoint()
    finally:
        (run_dir / "STOP").touch()
        worker.join(timeout=120)
        logf.close()
    return ckpt_path


def export_checkpoint(config: TrainConfig, out_path: str | Path, which: str = "best") -> dict[str, object]:
    """Write ``<run_dir>/{best,checkpoint}.pt`` as a shipped safetensors weights file; returns the
    checkpoint's step and validation Dice (when recorded)."""
    import torch

    from bml_pipeline.segment.network import build_network
    from bml_pipeline.segment.weights import save_weights

    path = Path(config.training.run_dir) / ("best.pt" if which == "best" else "checkpoint.pt")
    if not path.exists():
        raise InputError(path, "checkpoint not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = build_network(config.model)
    net.load_state_dict(ckpt["model"])
    info = {"step": int(ckpt["step"]), "val_dice": ckpt.get("val_dice")}
    save_weights(out_path, net, config.model, extra={"training_step": str(info["step"]),
                                                      "training_val_dice": json.dumps(info["val_dice"])})
    return info
