"""The predictor: loads a network once, then segments many scans.

``Predictor.load("knee_synth_v1").segment(image)`` returns an oai_zib label :class:`Volume` on the
image's own grid with its affine. Steps: percentile intensity normalisation of the input, resampling to
the RAS-aligned working grid, MONAI sliding-window inference (Gaussian blending, optional
medial-lateral flip TTA), probabilities back to the input grid and argmax, lesions constrained to bone.
"""

from __future__ import annotations

import itertools
import re
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import load_schema
from bml_pipeline.segment.bml import constrain_lesions
from bml_pipeline.segment.cleanup import clean_anatomy
from bml_pipeline.segment.config import ModelConfig
from bml_pipeline.segment.inference import class_confidence, predict_probabilities
from bml_pipeline.segment.intensity import percentile_normalise
from bml_pipeline.segment.resample import image_to_working_grid, probabilities_to_labels, working_grid
from bml_pipeline.segment.weights import load_weights, resolve_model, sha256_file
from bml_pipeline.volume import Volume

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``; CUDA without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise InputError(None, f"unknown device {device!r} (auto, cpu, cuda or cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(None, "device 'cuda' requested but no CUDA GPU is available")
    return torch.device(device)


@dataclass
class Predictor:
    """A loaded segmentation network and where it runs.

    Attributes:
        network: the network in eval mode, on ``device``.
        config: its model config (working spacing, inference settings).
        model_id: the model's name.
        weights_sha256: checksum of the weights file.
        device: torch device the windows run on.
        timings: seconds per step of the last :meth:`segment` call.
        quality: per structure name, the last call's ``confidence`` (mean max-probability of its
            voxels on the working grid) and, with TTA, ``tta_agreement`` (Dice against the mirror).
    """

    network: Any
    config: ModelConfig
    model_id: str
    weights_sha256: str
    weights_path: str
    device: Any
    timings: dict[str, float] = field(default_factory=dict)
    quality: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, name_or_path: str | Path = "knee_synth_v1", device: str = "auto") -> Predictor:
        """Load a shipped model by name or a weights file by path (never downloads anything)."""
        path = resolve_model(name_or_path)
        network, config, _ = load_weights(path)
        dev = resolve_device(device)
        return cls(network.to(dev), config, config.name, sha256_file(path), str(path), dev)

    @property
    def provenance(self) -> dict[str, Any]:
        """Model id, weights checksum and device, JSON-ready."""
        return {"model_id": self.model_id, "weights_sha256": self.weights_sha256,
                "weights_path": self.weights_path, "device": str(self.device),
                "working_spacing_mm": self.config.working_spacing_mm, "quality": self.quality}

    def segment(self, image: Volume, tta: bool = False) -> Volume:
        """Labels (uint8, schema ``config.schema``) on ``image``'s grid, with its affine and metadata.

        Raises:
            InputError: an image with non-finite voxels or no intensity range.
        """
        import torch

        arr = np.asarray(image.array)
        if arr.dtype.kind not in "biuf" or not np.all(np.isfinite(arr)):
            raise InputError(image.meta.source, "image has non-numeric, NaN or Inf voxels")
        cfg = self.config
        torch.manual_seed(0)
        t = {"start": time.perf_counter()}
        shape, work_affine = working_grid(image, cfg.working_spacing_mm)
        normalised = image.with_array(percentile_normalise(arr, cfg.inference.percentiles))
        work = image_to_working_grid(normalised, shape, work_affine)
        t["resample_in"] = time.perf_counter()
        agreement: dict[int, float] = {}
        probs = predict_probabilities(self.network, work, cfg.inference, self.device, tta=tta, agreement=agreement)
        schema = load_schema(cfg.schema)
        names = {s.id: s.name for s in schema.structures}
        self.quality = {"confidence": {names[c]: round(v, 4) for c, v in class_confidence(probs).items()}}
        if tta:
            self.quality["tta_agreement"] = {names[c]: round(v, 4) for c, v in agreement.items()}
        t["inference"] = time.perf_counter()
        labels = probabilities_to_labels(probs, work_affine, image, cfg.inference.slab_voxels)
        del probs
        t["resample_out"] = time.perf_counter()
        result = constrain_lesions(clean_anatomy(Volume(labels, image.affine.copy(), image.meta), schema), schema)
        t["lesions"] = time.perf_counter()
        keys = list(t)
        self.timings = {k: round(t[k] - t[p], 3) for p, k in itertools.pairwise(keys)}
        self.timings["total"] = round(t["lesions"] - t["start"], 3)
        log.info("segmented %s on %s in %.1f s (working grid %s)", image.meta.source, self.device,
                 self.timings["total"], shape)
        return result
