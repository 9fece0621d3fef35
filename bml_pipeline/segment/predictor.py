"""The predictor: loads a network once, then segments many scans.

``Predictor.load("knee_coarse_v2").segment(image)`` returns an oai_zib label :class:`Volume` on the
image's own grid with its affine. Steps: percentile intensity normalisation of the input, resampling to
the RAS-aligned working grid, MONAI sliding-window inference (Gaussian blending, optional
medial-lateral flip TTA), probabilities back to the input grid and argmax, lesions constrained to bone.

A cascade's fine model (``config.prior_classes > 0``) runs after its coarse model
(``config.coarse_model``): the coarse model labels the whole knee on its coarse grid; the fine model
runs only on the box of that foreground (plus ``crop_margin_mm``), on the image and the coarse class
probabilities resampled to its finer grid.
"""

from __future__ import annotations

import itertools
import logging
import re
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
from bml_pipeline.segment.resample import (
    image_to_working_grid,
    probabilities_to_labels,
    resample_probabilities,
    working_grid,
)
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
    quality: dict[str, Any] = field(default_factory=dict)
    coarse: Predictor | None = None

    @classmethod
    def load(cls, name_or_path: str | Path = "knee_coarse_v2", device: str = "auto") -> Predictor:
        """Load a shipped model by name or a weights file by path (never downloads anything); a fine
        model loads its coarse model too."""
        path = resolve_model(name_or_path)
        network, config, _ = load_weights(path)
        dev = resolve_device(device)
        coarse = None
        if config.prior_classes:
            coarse = cls.load(config.coarse_model, device)
            if coarse.config.num_classes != config.prior_classes or coarse.config.prior_classes:
                raise InputError(path, f"coarse model {config.coarse_model!r} gives {coarse.config.num_classes} "
                                       f"classes, the fine model expects {config.prior_classes}")
        return cls(network.to(dev), config, config.name, sha256_file(path), str(path), dev, coarse=coarse)

    @property
    def provenance(self) -> dict[str, Any]:
        """Model id, weights checksum and device, JSON-ready."""
        record = {"model_id": self.model_id, "weights_sha256": self.weights_sha256,
                  "weights_path": self.weights_path, "device": str(self.device),
                  "working_spacing_mm": self.config.working_spacing_mm, "quality": self.quality}
        if self.coarse is not None:
            record["coarse"] = {k: v for k, v in self.coarse.provenance.items() if k != "quality"}
        return record

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
        normalised = image.with_array(percentile_normalise(arr, cfg.inference.percentiles))
        if self.coarse is None:
            shape, work_affine = working_grid(image, cfg.working_spacing_mm)
            work = image_to_working_grid(normalised, shape, work_affine)
        else:
            work, work_affine = self._fine_input(normalised)
            shape = work.shape[1:]
            t["coarse"] = time.perf_counter()
        t["resample_in"] = time.perf_counter()
        agreement: dict[int, float] = {}
        probs = predict_probabilities(self.network, work, cfg.inference, self.device, tta=tta, agreement=agreement)
        schema = load_schema(cfg.schema)
        names = {s.id: s.name for s in schema.structures}
        self.quality = {"confidence": {names[c]: round(v, 4) for c, v in class_confidence(probs).items()},
                        "not_segmented": [s.name for s in schema.structures if s.id >= cfg.num_classes]}
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

    def _fine_input(self, normalised: Volume) -> tuple[np.ndarray, np.ndarray]:
        """(image and coarse probabilities, (1 + prior_classes, D, H, W), on the fine grid; its affine).
        The fine grid is RAS-aligned at ``working_spacing_mm`` over the coarse foreground's box plus
        ``crop_margin_mm`` (the whole image when the coarse stage finds nothing)."""
        assert self.coarse is not None
        coarse_cfg = self.coarse.config
        c_shape, c_affine = working_grid(normalised, coarse_cfg.working_spacing_mm)
        c_work = image_to_working_grid(normalised, c_shape, c_affine)
        c_probs = predict_probabilities(self.coarse.network, c_work, coarse_cfg.inference, self.device).numpy()
        shape, affine = working_grid(normalised, self.config.working_spacing_mm)
        found = np.argwhere(c_probs.argmax(0) > 0)
        if len(found):
            corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
            lo_ijk, hi_ijk = found.min(0), found.max(0)
            world = (c_affine[:3, :3] @ (lo_ijk + corners * (hi_ijk - lo_ijk)).T).T + c_affine[:3, 3]
            margin = self.config.crop_margin_mm
            spacing = self.config.working_spacing_mm
            full_lo = affine[:3, 3]
            full_hi = full_lo + spacing * (np.array(shape) - 1)
            lo = np.maximum(world.min(0) - margin, full_lo)
            hi = np.minimum(world.max(0) + margin, full_hi)
            lo = full_lo + np.floor((lo - full_lo) / spacing) * spacing  # stay on the full fine lattice
            shape = tuple(int(n) for n in np.floor((hi - lo) / spacing).astype(int) + 1)  # type: ignore[assignment]
            affine = affine.copy()
            affine[:3, 3] = lo
        image = image_to_working_grid(normalised, shape, affine)
        prior = resample_probabilities(c_probs, c_affine, shape, affine)
        return np.concatenate([image[None], prior]).astype(np.float32), affine
