"""Between the input image's grid and the network's working grid.

The working grid is aligned with the world RAS axes, isotropic (``spacing_mm``) and covers the input's
field of view, so the network always sees the same axis order whatever the acquisition orientation
(sagittal, coronal, oblique). Images go there by anti-aliased trilinear interpolation; class
probabilities come back by trilinear interpolation onto the input grid, then argmax.

Why argmax of resampled probabilities rather than nearest-neighbour labels: the working grid (0.7 mm)
is coarser than typical inputs in-plane (0.3-0.4 mm). Nearest neighbour would copy 0.7 mm blocks onto
the fine grid, a staircase that biases thin structures (cartilage of 2 mm is 3 working voxels);
interpolated probabilities place each boundary where the classes' probabilities cross, at sub-voxel
precision, and never invent a label absent from both neighbours' supports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from bml_pipeline.volume import Volume

if TYPE_CHECKING:
    import torch


def working_grid(image: Volume, spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of a RAS-aligned isotropic grid of ``spacing_mm`` covering ``image``'s voxels."""
    shape_in = np.array(image.shape, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    world = image.world_coords(corners * (shape_in - 1))
    lo, hi = world.min(axis=0), world.max(axis=0)
    shape = tuple(int(n) for n in np.floor((hi - lo) / spacing_mm).astype(int) + 1)
    affine = np.eye(4)
    affine[:3, :3] *= spacing_mm
    affine[:3, 3] = (lo + hi) / 2.0 - spacing_mm * (np.array(shape) - 1) / 2.0
    return shape, affine  # type: ignore[return-value]


def labels_to_working_grid(labels: Volume, spacing_mm: float) -> Volume:
    """Resample a label map (nearest neighbour) onto a RAS-aligned grid of ``spacing_mm`` covering it,
    centred on the map's centre (random poses are the training sampler's job: ``segment.synthesis``)."""
    shape_in = np.array(labels.shape)
    centre = labels.world_coords((shape_in - 1) / 2.0)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * (shape_in - 1)
    extent = np.ptp(labels.world_coords(corners), axis=0)
    shape_out = np.maximum(np.round(extent / spacing_mm).astype(int), 8)
    linear = np.eye(3)
    # world point of output voxel o: centre + linear @ ((o - c_out) * spacing)
    c_out = (shape_out - 1) / 2.0
    out_to_world = np.eye(4)
    out_to_world[:3, :3] = linear * spacing_mm
    out_to_world[:3, 3] = centre - out_to_world[:3, :3] @ c_out
    out_to_in = np.linalg.inv(labels.affine) @ out_to_world
    arr = ndimage.affine_transform(np.asarray(labels.array, dtype=np.uint8), out_to_in[:3, :3],
                                   offset=out_to_in[:3, 3], output_shape=tuple(shape_out), order=0,
                                   mode="constant", cval=0)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3) * spacing_mm
    affine[:3, 3] = centre - affine[:3, :3] @ c_out
    return Volume(arr, affine, labels.meta)


def image_to_working_grid(image: Volume, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """``image`` (float32) resampled trilinearly onto the grid (shape, affine), after a Gaussian
    low-pass along input axes finer than the target (sigma = (ratio - 1) / 2 input voxels, as in
    scikit-image's anti-aliasing). Outside the input's field of view the value is the input's minimum."""
    arr = np.asarray(image.array, dtype=np.float32)
    target = float(np.linalg.norm(affine[:3, :3], axis=0).min())
    ratio = target / np.asarray(image.spacing)
    sigma = np.maximum((ratio - 1.0) / 2.0, 0.0)
    if np.any(sigma > 0):
        arr = ndimage.gaussian_filter(arr, sigma, mode="nearest")
    out_to_in = np.linalg.inv(image.affine) @ affine
    return ndimage.affine_transform(arr, out_to_in[:3, :3], offset=out_to_in[:3, 3], output_shape=shape,
                                    order=1, mode="constant", cval=float(arr.min()))


def resample_probabilities(probs: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                           target_affine: np.ndarray) -> np.ndarray:
    """Class probabilities (C, ...) on the grid ``affine`` trilinearly resampled onto (shape,
    target_affine); outside the source grid everything is background (class 0)."""
    out_to_in = np.linalg.inv(affine) @ target_affine
    out = np.empty((probs.shape[0], *shape), dtype=np.float32)
    for c, channel in enumerate(probs):
        out[c] = ndimage.affine_transform(channel, out_to_in[:3, :3], offset=out_to_in[:3, 3], output_shape=shape,
                                          order=1, mode="constant", cval=1.0 if c == 0 else 0.0)
    return out


FOREGROUND_PROBABILITY = 0.05
"""Working voxels whose background probability is below 1 - this may label an input voxel."""


def probabilities_to_labels(probs: torch.Tensor, work_affine: np.ndarray, image: Volume,
                            slab_voxels: int = 8_000_000, crop: bool = True) -> np.ndarray:
    """Labels (uint8) on ``image``'s grid: argmax over classes of ``probs`` (C, D, H, W) on the working
    grid, trilinearly interpolated at each input voxel centre. Works in slabs along input axis 0 of at
    most ``slab_voxels`` voxels, so memory stays bounded; voxels outside the working grid get 0.

    With ``crop``, only the input voxels inside the box of the working grid's foreground (plus one
    working voxel, the interpolation's reach) are interpolated; every other voxel's neighbours are all
    background beyond doubt, so the labels are the same as without it, at a fraction of the cost.
    """
    import torch
    import torch.nn.functional as F

    out = np.zeros(image.shape, dtype=np.uint8)
    in_to_work = np.linalg.inv(work_affine) @ image.affine
    lo_in, hi_in = np.zeros(3, dtype=int), np.array(image.shape) - 1
    if crop:
        foreground = np.argwhere((probs[0] < 1.0 - FOREGROUND_PROBABILITY).numpy())
        if not len(foreground):
            return out
        lo_w, hi_w = foreground.min(0) - 1, foreground.max(0) + 1
        corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * (hi_w - lo_w) + lo_w
        work_to_in = np.linalg.inv(in_to_work)
        in_corners = corners @ work_to_in[:3, :3].T + work_to_in[:3, 3]
        lo_in = np.maximum(np.floor(in_corners.min(0)).astype(int) - 1, 0)
        hi_in = np.minimum(np.ceil(in_corners.max(0)).astype(int) + 1, np.array(image.shape) - 1)
        if np.any(hi_in < lo_in):
            return out
    js = np.arange(lo_in[1], hi_in[1] + 1, dtype=np.float64)
    ks = np.arange(lo_in[2], hi_in[2] + 1, dtype=np.float64)
    jj, kk = np.meshgrid(js, ks, indexing="ij")
    plane = np.stack([jj, kk], axis=-1) @ in_to_work[:3, 1:3].T + in_to_work[:3, 3]  # (J, K, 3)
    rows = max(1, slab_voxels // (len(js) * len(ks)))
    volume = probs[None].float()
    scale = 2.0 / np.maximum(np.array(probs.shape[1:], dtype=np.float64) - 1, 1)
    box = (slice(lo_in[1], hi_in[1] + 1), slice(lo_in[2], hi_in[2] + 1))
    for start in range(lo_in[0], hi_in[0] + 1, rows):
        ii = np.arange(start, min(start + rows, hi_in[0] + 1), dtype=np.float64)
        coords = ii[:, None, None, None] * in_to_work[:3, 0] + plane[None]  # (I, J, K, 3) working ijk
        grid = torch.from_numpy((coords * scale - 1.0)[..., ::-1].astype(np.float32).copy())[None]
        sampled = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out[(slice(start, start + len(ii)), *box)] = sampled[0].argmax(0).numpy().astype(np.uint8)
    return out
