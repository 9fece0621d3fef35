"""Weights files: a safetensors state dict whose metadata carries the :class:`ModelConfig` as JSON.

Loading never executes code from the file. Every failure (missing, truncated, corrupt, not
safetensors, no config, weights that do not fit the architecture) is an :class:`InputError` naming the
file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from bml_pipeline.errors import InputError
from bml_pipeline.segment.config import ModelConfig

if TYPE_CHECKING:
    import torch

FORMAT = "bml-pipeline-segmentation/1"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def resolve_model(name_or_path: str | Path) -> Path:
    """A weights path: an existing file as given, else ``bml_pipeline/models/<name>.safetensors``."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists() or "/" in str(name_or_path):
        return path
    shipped = MODELS_DIR / f"{name_or_path}.safetensors"
    if not shipped.exists():
        available = sorted(p.stem for p in MODELS_DIR.glob("*.safetensors"))
        raise InputError(name_or_path, f"no shipped model of this name (available: {available})")
    return shipped


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(path: str | Path, network: torch.nn.Module, config: ModelConfig,
                 extra: dict[str, str] | None = None) -> None:
    """Write ``network``'s state dict and ``config`` to a safetensors file (atomically)."""
    from safetensors.torch import save_file

    from bml_pipeline.io import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    metadata = {"format": FORMAT, "config": config.to_json(), **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_weights(path: str | Path) -> tuple[torch.nn.Module, ModelConfig, dict[str, str]]:
    """(network in eval mode on the CPU, its config, the file's metadata) from a weights file."""
    from safetensors import SafetensorError, safe_open

    from bml_pipeline.segment.network import build_network

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise InputError(path, f"not a readable safetensors weights file ({exc.__class__.__name__}: "
                               f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise InputError(path, f"not a bml-pipeline segmentation weights file (format {metadata.get('format')!r})")
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]), path)
    except json.JSONDecodeError:
        raise InputError(path, "model config in the weights metadata is not valid JSON") from None
    network = build_network(config)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {keys[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise InputError(path, f"weights do not match the model architecture ({detail})")
    network.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    network.eval()
    return network, config, metadata
