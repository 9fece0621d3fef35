"""Provisional SynthSeg-style intensity synthesis on the working grid, used only until the shared
synthesizer :mod:`bml_pipeline.synth.image` lands; it will then be deleted.

Per-label random Gaussian intensities (random contrast), background split into smooth random tissue
classes, thick-slice blur along a random axis, smooth multiplicative bias field, Rician noise, gamma.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, coarse: int, channels: int = 1) -> np.ndarray:
    """Random smooth fields (channels, *shape) from a coarse Gaussian grid upsampled linearly."""
    grid = rng.normal(size=(channels, coarse, coarse, coarse)).astype(np.float32)
    zoom = [1.0] + [n / coarse for n in shape]
    return ndimage.zoom(grid, zoom, order=1, grid_mode=True, mode="nearest")[:, :shape[0], :shape[1], :shape[2]]


def synthesize(labels: np.ndarray, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A float32 image of ``labels`` (ids 0..9, oai_zib) with random contrast and artefacts."""
    shape = labels.shape
    n_bg = 3
    means = rng.uniform(0.0, 1.0, size=10 + n_bg).astype(np.float32)
    sds = rng.uniform(0.005, 0.08, size=10 + n_bg).astype(np.float32)
    # lesions differ from their bone's marrow by at least 0.1 (bright or dark)
    for bone, lesion in ((1, 7), (3, 8), (5, 9)):
        delta = rng.uniform(0.1, 0.5) * rng.choice([-1.0, 1.0], p=[0.25, 0.75])
        means[lesion] = np.clip(means[bone] + delta, 0.0, 1.0)
        if abs(means[lesion] - means[bone]) < 0.1:
            means[lesion] = means[bone] - np.sign(delta) * 0.1
    tissue = labels.astype(np.int64)
    bg = tissue == 0
    bg_class = np.argmax(_smooth_field(shape, rng, 6, n_bg), axis=0)
    tissue[bg] = 10 + bg_class[bg]
    image = means[tissue] + sds[tissue] * rng.standard_normal(shape, dtype=np.float32)
    # thick slices: blur along one axis (the sagittal x axis most often), mild in-plane blur
    sigma = np.full(3, rng.uniform(0.0, 0.6))
    axis = 0 if rng.random() < 0.6 else int(rng.integers(3))
    thickness = rng.uniform(spacing_mm, 3.5)
    sigma[axis] = thickness / 2.355 / spacing_mm
    image = ndimage.gaussian_filter(image, sigma, mode="nearest").astype(np.float32)
    image *= np.exp(0.3 * _smooth_field(shape, rng, 4)[0])
    noise = rng.uniform(0.005, 0.06)
    image = np.sqrt((image + noise * rng.standard_normal(shape, dtype=np.float32)) ** 2
                    + (noise * rng.standard_normal(shape, dtype=np.float32)) ** 2)
    gamma = float(np.exp(rng.normal(0.0, 0.25)))
    return np.power(image / max(float(image.max()), 1e-6), gamma).astype(np.float32)
