"""Training loop: a fresh synthesized sample every step, soft Dice + cross-entropy, AdamW with warm-up
and cosine decay, fixed held-out validation volumes, resumable from a local checkpoint or from the
committed weights.

State lives in two places:

- ``run_dir`` (local, not committed): ``checkpoint.pt`` with optimizer state, the generation-map cache;
- ``durable_dir`` (committed about hourly): ``latest.safetensors`` (weights and step, no optimizer) and
  ``log.jsonl`` (one JSON line per event). On a fresh machine training resumes from these, with a short
  learning-rate warm-up for the new optimizer.

Every random draw of step ``n`` comes from a generator seeded with ``(seed, n)``, so a resumed run
draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.segment.config import TrainConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def split_label_maps(label_dir: Path, held_out: tuple[str, ...],
                     cache_dir: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training, validation) label map paths; a map is held out when its name starts with any
    ``held_out`` prefix (a subject id holds out all its visits). Without ``label_dir`` (a GPU machine
    that got only the generation-map cache) the names come from ``cache_dir``."""
    paths = sorted(label_dir.glob("*.nii.gz"))
    if not paths and cache_dir is not None and not label_dir.exists():
        names = sorted({p.name.rsplit("_", 1)[0] for p in cache_dir.glob("*.npz")})
        paths = [label_dir / f"{name}.nii.gz" for name in names]
    if not paths:
        raise InputError(label_dir, "no label maps (*.nii.gz) found")
    val = [p for p in paths if any(p.name.startswith(h) for h in held_out)]
    train = [p for p in paths if p not in val]
    return train, val


def learning_rate(step: int, config: TrainConfig, warmup_from: int = 0) -> float:
    """Linear warm-up over ``warmup_steps`` after ``warmup_from`` (a resume point), then cosine decay
    from ``learning_rate`` to ``min_learning_rate`` at ``max_steps``."""
    tc = config.training
    progress = min(1.0, step / max(tc.max_steps, 1))
    lr = tc.min_learning_rate + 0.5 * (tc.learning_rate - tc.min_learning_rate) * (1 + math.cos(math.pi * progress))
    return lr * min(1.0, (step - warmup_from + 1) / max(tc.warmup_steps, 1))


def soft_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over foreground classes of (1 - soft Dice), smoothed by 1 in numerator and denominator so
    a class absent from both prediction and target costs nothing, plus cross-entropy against the
    (possibly soft) target. Shapes (N, C, D, H, W)."""
    import torch

    probs = torch.softmax(logits, dim=1)
    dims = (2, 3, 4)
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    dice = (2 * inter + 1) / (denom + 1)
    ce = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()
    return (1 - dice[:, 1:]).mean() + ce


def hard_dice(pred: np.ndarray, target: np.ndarray, n_classes: int) -> dict[int, float]:
    """Dice per foreground class of two label arrays (NaN where the class is in neither)."""
    out = {}
    for c in range(1, n_classes):
        a, b = pred == c, target == c
        total = int(a.sum()) + int(b.sum())
        out[c] = float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")
    return out


class _Samples:
    """The training samples of steps ``start``, ``start + 1``, ... (each seeded by its step), split
    round-robin over a DataLoader's workers so the loader yields them in step order."""

    def __init__(self, sampler: Any, seed: int, start: int, stop: int) -> None:
        self.sampler, self.seed, self.start, self.stop = sampler, seed, start, stop

    def __iter__(self) -> Any:
        import torch

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        gen = torch.Generator()
        for step in range(self.start + worker, self.stop, workers):
            gen.manual_seed(self.seed * 1_000_003 + step)
            yield self.sampler.sample(gen)


def _sample_stream(sampler: Any, seed: int, start: int, stop: int, workers: int) -> Any:
    """Iterator over the samples of steps ``start .. stop - 1``, made here or by ``workers`` processes."""
    import torch

    samples = _Samples(sampler, seed, start, stop)
    if workers <= 0:
        return iter(samples)

    class _Iterable(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter(samples)

    return iter(torch.utils.data.DataLoader(_Iterable(), batch_size=None, num_workers=workers, prefetch_factor=4,
                                            persistent_workers=False))


def train(config: TrainConfig, resume: bool = True, minutes: float | None = None) -> Path:
    """Train until ``max_steps``, ``minutes`` of wall time, ``<run_dir>/STOP`` or SIGTERM / Ctrl-C;
    returns the local checkpoint path. See the module docstring for where state is kept."""
    import torch

    from bml_pipeline.segment.network import build_network
    from bml_pipeline.segment.predictor import resolve_device
    from bml_pipeline.segment.synthesis import (
        COARSE_CLASSES,
        FULL_CLASSES,
        SampleGenerator,
        SamplingOptions,
        cached_generation_maps,
    )

    tc, mc = config.training, config.model
    torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    run_dir = Path(tc.run_dir)
    durable = Path(tc.durable_dir) if tc.durable_dir else run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    durable.mkdir(parents=True, exist_ok=True)
    (run_dir / "STOP").unlink(missing_ok=True)
    cache = run_dir / "generation_maps"
    train_paths, val_paths = split_label_maps(Path(tc.label_dir), tc.held_out, cache)
    classes = {"coarse": COARSE_CLASSES, "full": FULL_CLASSES}[tc.targets]
    if int(classes.max()) + 1 != mc.num_classes:
        raise InputError(None, f"targets {tc.targets!r} have {int(classes.max()) + 1} classes, model {mc.num_classes}")
    options = SamplingOptions(spacing_mm=mc.working_spacing_mm, shape=tuple(tc.sample_shape),  # type: ignore[arg-type]
                              supersample=tc.supersample, percentiles=tuple(mc.inference.percentiles),  # type: ignore[arg-type]
                              focus=tc.focus, synthetic_lesions=tc.synthetic_lesions, prior_classes=mc.prior_classes)
    sampler = SampleGenerator(cached_generation_maps(train_paths, tc.source_spacing_mm, cache), classes, options)
    validation = _validation_set(cached_generation_maps(val_paths, tc.source_spacing_mm, cache), classes, options,
                                 tc.validation_volumes, tc.seed)

    net = build_network(mc).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    step, best, warmup_from = 0, -1.0, 0
    ckpt_path = run_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, best = int(ckpt["step"]), float(ckpt["best"])
        log.info("resumed at step %d from %s", step, ckpt_path)
    elif resume and (durable / "latest.safetensors").exists():
        step, best = _load_durable(net, durable / "latest.safetensors")
        warmup_from = step
        log.info("resumed at step %d from committed weights (new optimizer, warm-up)", step)
    logf = (durable / "log.jsonl").open("a")

    def emit(**rec: Any) -> None:
        logf.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, **rec}) + "\n")
        logf.flush()

    def save_local() -> None:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step, "best": best},
                   run_dir / "checkpoint.tmp")
        (run_dir / "checkpoint.tmp").replace(ckpt_path)

    def save_durable() -> None:
        from bml_pipeline.segment.weights import save_weights

        save_weights(durable / "latest.safetensors", net, mc, extra={"training_step": str(step), "best": str(best)})

    def validate() -> None:
        nonlocal best
        net.eval()
        scores = []
        with torch.inference_mode():
            for image, target in validation:
                pred = net(image[None].to(device)).argmax(1)[0].cpu().numpy()
                scores.append(hard_dice(pred, target, mc.num_classes))
        net.train()
        per_class = {str(c): round(float(np.nanmean([s[c] for s in scores])), 4) for c in scores[0]}
        main = float(np.mean(list(per_class.values())))
        emit(val_dice=per_class, val_mean=round(main, 4))
        if main > best:
            best = main
            if tc.export_path:
                from bml_pipeline.segment.weights import save_weights

                save_weights(tc.export_path, net, mc, extra={"training_step": str(step),
                                                             "validation_dice": json.dumps(per_class)})

    stop = {"now": False}

    def _terminate(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    emit(event="start", resumed=step > 0, train_maps=len(train_paths), validation_volumes=len(validation))
    stream = _sample_stream(sampler, tc.seed, step, tc.max_steps, tc.data_workers)
    deadline = time.time() + 60 * minutes if minutes else None  # counted from here: set-up is not training
    losses: list[float] = []
    t0 = last_durable = time.time()
    net.train()
    while (step < tc.max_steps and not stop["now"] and not (run_dir / "STOP").exists()
           and (deadline is None or time.time() < deadline)):
        image, target = next(stream)
        lr = learning_rate(step, config, warmup_from)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(image[None].to(device, non_blocking=True))
        loss = soft_dice_ce(logits.float(), target[None].to(device, non_blocking=True))
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            emit(loss=round(float(np.mean(losses)), 4), lr=round(lr, 7), sec_per_step=round((time.time() - t0) / 50, 3))
            losses, t0 = [], time.time()
        if step % tc.checkpoint_every == 0:
            save_local()
        if step % tc.validate_every == 0:
            validate()
            t0 = time.time()
        if time.time() - last_durable > tc.durable_every_s:
            save_durable()
            last_durable = time.time()
    save_local()
    save_durable()
    emit(event="stop")
    logf.close()
    return ckpt_path


def _validation_set(maps: list[Any], classes: np.ndarray, options: Any, count: int,
                    seed: int) -> list[tuple[torch.Tensor, np.ndarray]]:
    """``count`` fixed held-out samples, cycling through the maps and the contrasts (presets, random)."""
    import torch

    from bml_pipeline.segment.synthesis import SampleGenerator

    if not maps:
        return []
    sampler = SampleGenerator(maps, classes, options)
    presets = ["dess", "pd_fs", "t2", "t1", "random"]
    out = []
    gen = torch.Generator()
    for i in range(count):
        gen.manual_seed(10**9 + seed * 1000 + i)
        image, target = sampler.sample(gen, index=i % len(maps), preset=presets[i % len(presets)])
        out.append((image, target.argmax(0).numpy().astype(np.uint8)))
    return out


def _load_durable(net: torch.nn.Module, path: Path) -> tuple[int, float]:
    """Load committed weights into ``net``; returns (step, best validation score) from the metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = dict(fh.metadata() or {})
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    net.load_state_dict(state)
    return int(meta.get("training_step", 0)), float(meta.get("best", -1.0))


def export_checkpoint(config: TrainConfig, out_path: str | Path) -> dict[str, object]:
    """Write the local checkpoint's weights as a shipped safetensors file; returns its step."""
    import torch

    from bml_pipeline.segment.network import build_network
    from bml_pipeline.segment.weights import save_weights

    path = Path(config.training.run_dir) / "checkpoint.pt"
    if not path.exists():
        raise InputError(path, "checkpoint not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = build_network(config.model)
    net.load_state_dict(ckpt["model"])
    save_weights(out_path, net, config.model, extra={"training_step": str(int(ckpt["step"]))})
    return {"step": int(ckpt["step"])}
