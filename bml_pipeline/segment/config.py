"""Configuration of a segmentation model and of its training, as frozen dataclasses.

Loaded from YAML (``configs/models/<name>.yaml``) with ``yaml.safe_load``; unknown keys are errors. The
:class:`ModelConfig` part travels inside every weights file (as JSON in the safetensors metadata), so a
weights file alone says how to run it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bml_pipeline.errors import InputError


@dataclass(frozen=True)
class NetworkConfig:
    """MONAI 3D ``UNet`` hyper-parameters (input layout (N, 1, D, H, W), output (N, classes, D, H, W))."""

    channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    norm: str = "instance"


@dataclass(frozen=True)
class InferenceConfig:
    """Sliding-window settings; sizes in voxels of the working grid."""

    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.25
    sw_batch_size: int = 1
    percentiles: tuple[float, float] = (0.5, 99.5)
    slab_voxels: int = 8_000_000
    """Input-grid voxels resampled back per chunk (bounds memory for large inputs)."""


@dataclass(frozen=True)
class BmlRefineConfig:
    """Classical BML refinement on a fluid-sensitive image (Nielsen et al. 2014 style).

    A bone voxel becomes a lesion voxel when its intensity exceeds that bone's normal-marrow mean by
    ``k_sd`` standard deviations. Only meaningful on fluid-sensitive contrast (DESS, PD/T2 fat-sat,
    STIR), where oedema-like marrow is bright; ``enabled`` is false by default and the refinement refuses
    to run on contrast declared ``t1``.
    """

    enabled: bool = False
    k_sd: float = 3.0
    erode_mm: float = 1.5
    """Bone margin (mm) excluded, so partial-volume cortex and cartilage do not count as lesion."""
    min_component_mm3: float = 20.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to run a trained network on a new image."""

    name: str
    schema: str = "oai_zib"
    num_classes: int = 10
    working_spacing_mm: float = 0.7
    network: NetworkConfig = field(default_factory=NetworkConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    bml_refine: BmlRefineConfig = field(default_factory=BmlRefineConfig)
    prior_classes: int = 0
    """Fine stage of a cascade: the input has this many more channels, the coarse stage's class
    probabilities on the working grid (0: a single-stage or coarse model)."""
    coarse_model: str = ""
    """Fine stage: the shipped coarse model it runs after (by name)."""
    crop_margin_mm: float = 12.0
    """Fine stage: it runs on the box of the coarse stage's foreground plus this margin."""

    def to_json(self) -> str:
        """Canonical JSON of this config (sorted keys)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Any, source: str | Path | None = None) -> ModelConfig:
        """Build from a plain mapping; unknown keys, wrong types and values outside :data:`BOUNDS`
        raise :class:`InputError` naming ``source`` (a weights file's embedded config is untrusted:
        nothing is built from it before it passes)."""
        config = _build(cls, raw, source, "model")
        _check_bounds(config, source)
        return config


@dataclass(frozen=True)
class TrainingConfig:
    """Training on images synthesized on the fly from label maps (:mod:`bml_pipeline.segment.synthesis`);
    paths relative to the working directory."""

    label_dir: str = "../shared/data/oai_labels"
    held_out: tuple[str, ...] = ()
    run_dir: str = "runs/knee"
    """Local, uncommitted state: full checkpoints with optimizer state, the generation-map cache."""
    durable_dir: str = ""
    """Committed state (weights-only ``latest.safetensors`` and ``log.jsonl``): resumes on a fresh machine."""
    export_path: str = ""
    """Where the best weights so far (by validation Dice) are written as a shipped model file."""
    seed: int = 0
    sample_shape: tuple[int, int, int] = (80, 96, 96)
    source_spacing_mm: float = 0.75
    supersample: int = 1
    targets: str = "coarse"
    """"coarse": bones (lesions merged) and plates, 7 classes; "full": all 10 oai_zib labels."""
    focus: str = "centre"
    """"centre": whole-knee samples; "surface": crops centred on cartilage, lesions and bone surfaces."""
    synthetic_lesions: float = 0.0
    """Probability of painting a random subchondral lesion into a sample."""
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-5
    warmup_steps: int = 300
    weight_decay: float = 1e-5
    max_steps: int = 60_000
    checkpoint_every: int = 200
    validate_every: int = 500
    validation_volumes: int = 8
    durable_every_s: float = 1800.0
    threads: int = 1
    device: str = "cpu"
    """Where the network trains: "cpu", "cuda", "cuda:N" or "auto"; samples are made on the CPU."""
    data_workers: int = 0
    """Processes making samples ahead of the trainer (0: made in the training process, one at a time)."""


@dataclass(frozen=True)
class TrainConfig:
    """A ``configs/models/<name>.yaml`` file: the model plus how to train it."""

    model: ModelConfig
    training: TrainingConfig


BOUNDS: dict[str, tuple[float, float]] = {
    # field: (low, high), inclusive; a sequence field bounds each element.
    "num_classes": (2, 64),
    "working_spacing_mm": (0.1, 5.0),
    "network.channels": (1, 512),
    "network.strides": (1, 4),
    "network.num_res_units": (0, 4),
    "inference.roi_size": (8, 512),
    "inference.overlap": (0.0, 0.9),
    "inference.sw_batch_size": (1, 64),
    "inference.percentiles": (0.0, 100.0),
    "inference.slab_voxels": (1_000, 1_000_000_000),
    "bml_refine.k_sd": (0.0, 20.0),
    "bml_refine.erode_mm": (0.0, 20.0),
    "bml_refine.min_component_mm3": (0.0, 1e6),
    "prior_classes": (0, 64),
    "crop_margin_mm": (0.0, 100.0),
}
MAX_NETWORK_LEVELS = 7
MAX_ROI_VOXELS = 256**3
NORMS = ("instance", "batch")


def _check_bounds(config: ModelConfig, source: str | Path | None) -> None:
    """Types and ranges of every numeric field (see :data:`BOUNDS`) and the network's shape."""
    def fail(problem: str) -> None:
        raise InputError(source, f"model config: {problem}")

    for dotted, (low, high) in BOUNDS.items():
        value: Any = config
        for part in dotted.split("."):
            value = getattr(value, part)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                fail(f"{dotted} must be numbers, got {type(item).__name__}")
            if not low <= item <= high:
                fail(f"{dotted} = {item} is outside {low:g}..{high:g}")
    net, inf = config.network, config.inference
    for name, value in (("num_classes", config.num_classes), ("network.num_res_units", net.num_res_units),
                        ("inference.sw_batch_size", inf.sw_batch_size), ("inference.slab_voxels", inf.slab_voxels),
                        ("prior_classes", config.prior_classes),
                        *(("network.channels", c) for c in net.channels), *(("network.strides", c) for c in net.strides),
                        *(("inference.roi_size", c) for c in inf.roi_size)):
        if not isinstance(value, int):
            fail(f"{name} must be whole numbers, got {value}")
    if not 2 <= len(net.channels) <= MAX_NETWORK_LEVELS or len(net.strides) != len(net.channels) - 1:
        fail(f"network needs 2..{MAX_NETWORK_LEVELS} channel levels and one stride fewer, got "
             f"{len(net.channels)} and {len(net.strides)}")
    if net.norm not in NORMS:
        fail(f"network.norm must be one of {', '.join(NORMS)}, got {net.norm!r}")
    if len(inf.roi_size) != 3 or int(np.prod(inf.roi_size)) > MAX_ROI_VOXELS:
        fail(f"inference.roi_size must be 3 sizes of at most {MAX_ROI_VOXELS} voxels in all, got {inf.roi_size}")
    if len(inf.percentiles) != 2 or not inf.percentiles[0] < inf.percentiles[1]:
        fail(f"inference.percentiles must be (low, high) with low < high, got {inf.percentiles}")
    if not isinstance(config.name, str) or not isinstance(config.schema, str) or not isinstance(config.coarse_model, str):
        fail("name, schema and coarse_model must be text")
    if config.prior_classes and not config.coarse_model:
        fail("a model with prior_classes needs coarse_model")


_NESTED = {"network": NetworkConfig, "inference": InferenceConfig, "bml_refine": BmlRefineConfig}


def _build(cls: type, raw: Any, source: str | Path | None, where: str) -> Any:
    if not isinstance(raw, dict):
        raise InputError(source, f"'{where}' must be a mapping")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(source, f"unknown keys in '{where}': {unknown}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _NESTED:
            values[key] = _build(_NESTED[key], value, source, f"{where}.{key}")
        elif isinstance(value, list):
            values[key] = tuple(value)
        else:
            values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise InputError(source, f"bad '{where}' section: {exc}") from None


def load_train_config(path: str | Path) -> TrainConfig:
    """Load a training YAML with top-level keys ``model`` and ``training``."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "config file not found") from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"config is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise InputError(path, "config must be a mapping")
    unknown = sorted(set(raw) - {"model", "training"})
    if unknown:
        raise InputError(path, f"unknown top-level keys: {unknown}")
    model = ModelConfig.from_dict(raw.get("model"), path)
    training = _build(TrainingConfig, raw.get("training") or {}, path, "training")
    return TrainConfig(model, training)
