"""Training data for the segmentation network: label maps resampled to the working grid in a random
pose, images synthesized from them, and patches cropped from a pool of such volumes on disk.

The pool generator writes ``pool/vol_XXXXX.npz`` (``image`` float16 normalised intensities, ``labels``
uint8, both indexed (i, j, k) on a RAS-aligned grid of ``working_spacing_mm``) so the trainer never
waits for synthesis. Intensities come from :mod:`bml_pipeline.synth.image`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from bml_pipeline.segment.intensity import percentile_normalise
from bml_pipeline.volume import Volume

log = logging.getLogger(__name__)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A 3x3 rotation with independent angles uniform in [-max_deg, max_deg] about x, y and z."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def labels_to_working_grid(labels: Volume, spacing_mm: float, rng: np.random.Generator | None = None,
                           max_rotation_deg: float = 15.0, scale_range: tuple[float, float] = (0.9, 1.1),
                           flip_x: bool = False) -> Volume:
    """Resample a label map (nearest neighbour) onto a RAS-aligned grid of ``spacing_mm`` covering it.

    With ``rng`` the anatomy gets a random pose: rotation about the map's centre, isotropic scale and,
    with ``flip_x``, a random medial-lateral (RAS x) mirror. Without ``rng`` the pose is unchanged.
    """
    shape_in = np.array(labels.shape)
    centre_ijk = (shape_in - 1) / 2.0
    centre = labels.world_coords(centre_ijk)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * (shape_in - 1)
    extent = np.ptp(labels.world_coords(corners), axis=0)
    shape_out = np.maximum(np.round(extent / spacing_mm).astype(int), 8)
    linear = np.eye(3)
    if rng is not None:
        linear = random_rotation(rng, max_rotation_deg) * rng.uniform(*scale_range)
        if flip_x and rng.random() < 0.5:
            linear = linear @ np.diag([-1.0, 1.0, 1.0])
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


def sample_patch(image: np.ndarray, labels: np.ndarray, size: tuple[int, int, int], rng: np.random.Generator,
                 lesion_idx: np.ndarray, cartilage_idx: np.ndarray, lesion_fraction: float,
                 cartilage_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One (image, labels) patch of ``size``; its centre is drawn on a lesion voxel (flat indices
    ``lesion_idx``) with probability ``lesion_fraction`` (when there are any), on cartilage
    (``cartilage_idx``) with ``cartilage_fraction``, else uniformly, then jittered by up to a quarter
    patch. Volumes smaller than ``size`` are zero-padded."""
    u = rng.random()
    centre = None
    for idx, p in ((lesion_idx, lesion_fraction), (cartilage_idx, lesion_fraction + cartilage_fraction)):
        if u < p:
            if idx.size:
                centre = np.array(np.unravel_index(idx[rng.integers(idx.size)], labels.shape))
            break
    if centre is None:
        centre = np.array([rng.integers(n) for n in labels.shape])
    centre = centre + rng.integers(-size[0] // 4, size[0] // 4 + 1, size=3)
    starts = [int(np.clip(c - s // 2, min(0, n - s), max(0, n - s))) for c, s, n in zip(centre, size, labels.shape)]
    img = np.zeros(size, dtype=np.float32)
    lab = np.zeros(size, dtype=np.int64)
    src = tuple(slice(max(st, 0), min(st + s, n)) for st, s, n in zip(starts, size, labels.shape))
    dst = tuple(slice(sl.start - st, sl.stop - st) for sl, st in zip(src, starts))
    img[dst] = image[src]
    lab[dst] = labels[src]
    return img, lab


ACQUISITION_PRESETS = ("dess", "pd_fs", "t2", "t1", "random")


def synthesize_training_volume(labels: Volume, spacing_mm: float, rng: np.random.Generator,
                               percentiles: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One training pair on the working grid: (normalised float16 image, uint8 labels).

    The label map gets a random pose on the working grid; :func:`bml_pipeline.synth.image.synthesize`
    makes an image of it with a random contrast preset, SNR and bias field, acquired on that grid or
    (half the time) with thick slices (1-3.5 mm) along a random axis, mostly the sagittal x axis. A
    thick-slice image is brought back to the working grid exactly as at inference
    (:func:`~bml_pipeline.segment.resample.image_to_working_grid`).
    """
    from bml_pipeline.segment.resample import image_to_working_grid
    from bml_pipeline.synth.image import synthesize

    work = labels_to_working_grid(labels, spacing_mm, rng, flip_x=True)
    target = None
    if rng.random() < 0.5:
        target = [spacing_mm] * 3
        axis = 0 if rng.random() < 0.6 else int(rng.integers(3))
        target[axis] = float(rng.uniform(1.0, 3.5))
    syn = synthesize(work, preset=str(rng.choice(ACQUISITION_PRESETS)), seed=int(rng.integers(2**31)),
                     snr=float(rng.uniform(8.0, 40.0)), bias=float(rng.uniform(0.0, 0.4)),
                     texture=float(rng.uniform(0.02, 0.1)),
                     target_spacing=None if target is None else tuple(target))
    image = np.asarray(syn.image.array)
    if target is not None:
        image = image_to_working_grid(syn.image, work.shape, work.affine)
    image = percentile_normalise(image, percentiles)
    return image.astype(np.float16), np.asarray(work.array, dtype=np.uint8)


def run_pool_generator(label_paths: list[Path], out_dir: Path, spacing_mm: float, percentiles: tuple[float, float],
                       seed: int, pool_size: int, stop_file: Path | None = None, max_volumes: int = 0) -> None:
    """Write synthesized volumes to ``out_dir``, cycling file names modulo ``pool_size``, until
    ``max_volumes`` have been made in total (0: forever) or ``stop_file`` exists.

    Volume number ``n`` uses seed ``(seed, n)``, so the sequence is reproducible. Stops when
    ``stop_file`` exists. Resumes numbering after the highest index already in ``out_dir/next.txt``.
    """
    from bml_pipeline.io import read_volume

    out_dir.mkdir(parents=True, exist_ok=True)
    counter = out_dir / "next.txt"
    n = int(counter.read_text()) if counter.exists() else 0
    while (stop_file is None or not stop_file.exists()) and (max_volumes <= 0 or n < max_volumes):
        rng = np.random.default_rng([seed, n])
        path = label_paths[int(rng.integers(len(label_paths)))]
        t0 = time.time()
        image, labels = synthesize_training_volume(read_volume(path), spacing_mm, rng, percentiles)
        tmp = out_dir / f".tmp_{os.getpid()}.npz"
        np.savez(tmp, image=image, labels=labels)
        os.replace(tmp, out_dir / f"vol_{n % pool_size:05d}.npz")
        n += 1
        counter.write_text(str(n))
        log.info("pool volume %d from %s in %.1f s", n, path.name, time.time() - t0)
