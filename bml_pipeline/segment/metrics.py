"""Overlap metrics between label maps on the same grid."""

from __future__ import annotations

import numpy as np


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice coefficient per label id; NaN where the label is absent from both maps."""
    n = int(max(max(labels), pred.max(initial=0), truth.max(initial=0))) + 1  # labels not asked for count too
    idx = truth.astype(np.int64).ravel() * n + pred.astype(np.int64).ravel()
    confusion = np.bincount(idx, minlength=n * n).reshape(n, n)
    out = {}
    for lab in labels:
        tp = confusion[lab, lab]
        denom = confusion[lab, :].sum() + confusion[:, lab].sum()
        out[lab] = float(2 * tp / denom) if denom else float("nan")
    return out
