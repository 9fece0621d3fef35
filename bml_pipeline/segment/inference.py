"""Sliding-window inference of class probabilities on the working grid (MONAI, Gaussian blending)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bml_pipeline.segment.config import InferenceConfig

if TYPE_CHECKING:
    import torch


def predict_probabilities(network: torch.nn.Module, image: np.ndarray, config: InferenceConfig,
                          device: torch.device, tta: bool = False,
                          agreement: dict[int, float] | None = None) -> torch.Tensor:
    """Softmax probabilities (C, D, H, W) float32 on the CPU for a normalised image (D, H, W), or for
    several input channels (K, D, H, W) (a fine stage's image and coarse probabilities).

    Windows of ``config.roi_size`` overlap by ``config.overlap`` and are blended with Gaussian weights;
    windows run on ``device`` (AMP float16 on CUDA) and are stitched on the CPU, so memory on the
    device stays bounded by one batch of windows. With ``tta`` the prediction is averaged with that of
    the image mirrored along axis 0 (medial-lateral on the RAS-aligned working grid; the oai_zib labels
    have no side-specific classes, so the mirror maps labels to themselves); then ``agreement``, when
    given, receives per class the Dice of the two predictions' argmax labels (a class in neither: 1).
    """
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    x = x[None, None] if x.ndim == 3 else x[None]
    roi = tuple(int(r) for r in config.roi_size)

    def run(inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = sliding_window_inference(
                inp, roi, config.sw_batch_size, network, overlap=config.overlap, mode="gaussian",
                sw_device=device, device=torch.device("cpu"), padding_mode="constant", cval=0.0,
                progress=False)
        assert isinstance(logits, torch.Tensor)
        return torch.softmax(logits.float(), dim=1)[0]

    network.eval()
    with torch.inference_mode():
        probs = run(x)
        if tta:
            mirrored = run(torch.flip(x, dims=(2,))).flip(dims=(1,))
            if agreement is not None:
                agreement.update(_label_dice(probs.argmax(0), mirrored.argmax(0), probs.shape[0]))
            probs += mirrored
            probs *= 0.5
    return probs


def _label_dice(a: torch.Tensor, b: torch.Tensor, n_classes: int) -> dict[int, float]:
    """Dice per foreground class of two label tensors (1.0 where the class is in neither)."""
    out = {}
    for c in range(1, n_classes):
        x, y = a == c, b == c
        total = int(x.sum()) + int(y.sum())
        out[c] = float(2 * int((x & y).sum()) / total) if total else 1.0
    return out


def class_confidence(probs: torch.Tensor) -> dict[int, float]:
    """Mean max-probability over the voxels predicted as each foreground class (classes predicted
    nowhere are left out): how sure the network is of what it labelled."""
    top, labels = probs.max(0)
    out = {}
    for c in range(1, probs.shape[0]):
        mask = labels == c
        if bool(mask.any()):
            out[c] = float(top[mask].mean())
    return out
