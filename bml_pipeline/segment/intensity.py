"""Intensity normalisation that does not depend on the scanner's units or contrast."""

from __future__ import annotations

import numpy as np


def percentile_normalise(image: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5),
                         clip: tuple[float, float] = (-0.5, 1.5)) -> np.ndarray:
    """Map the ``percentiles`` of ``image`` to 0 and 1 (float32), clipped to ``clip``.

    Percentiles are taken over the whole array, so the result is the same for any linear rescaling of
    the scanner's intensities. A constant image maps to zeros.
    """
    arr = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(arr, percentiles)
    if not hi > lo:
        return np.zeros_like(arr)
    out = (arr - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, clip[0], clip[1], out=out)
