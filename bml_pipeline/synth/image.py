"""MR-like images synthesized from any label map (phantom or real), in the spirit of SynthSeg.

Each voxel gets a tissue class: the labelled structures map through the schema (bone -> marrow, with a
dark cortical rim at the bone surface; cartilage; lesion), and the unlabelled background is filled with
soft tissue derived from the label geometry: dark menisci in the joint gap where femoral and tibial
cartilage come close, joint fluid close to the cartilage, muscle around the
bones with islands of intermuscular fat, a band of subcutaneous fat under the skin, and air outside the
leg (the leg's outline is a smoothly perturbed distance from the bones). Each class gets a mean
intensity (a preset mimicking a clinical contrast, jittered, or random), a smooth multiplicative
texture and a smooth multiplicative bias field (both in one log-field, interpolated once), a point
spread function, optional resampling to an
acquisition grid with thick slices, and Rician noise at a chosen SNR.

Everything random comes from one ``numpy.random.Generator`` seeded by ``seed``: the same inputs give
the same image bit for bit. Intensities are float32 in arbitrary units (about 0..1000).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bml_pipeline.labels import LabelSchema, load_schema
from bml_pipeline.synth.fields import smooth_log_field, smooth_noise
from bml_pipeline.synth.sdf import rotation_matrix
from bml_pipeline.volume import Volume, VolumeMeta

log = logging.getLogger(__name__)

TISSUES = ("air", "muscle", "fat", "fluid", "marrow", "cortex", "cartilage", "lesion", "meniscus")
AIR, MUSCLE, FAT, FLUID, MARROW, CORTEX, CARTILAGE, LESION, MENISCUS = range(len(TISSUES))

PRESETS: dict[str, dict[str, float]] = {
    # Water-excitation 3D DESS (OAI): cartilage and fluid bright, fatty marrow and fat dark.
    "dess": {"air": 0.0, "muscle": 0.28, "fat": 0.07, "fluid": 0.85, "marrow": 0.13, "cortex": 0.03,
             "cartilage": 0.55, "lesion": 0.30, "meniscus": 0.05},
    # Intermediate-weighted / proton-density fat-suppressed TSE: BML and fluid bright, marrow dark.
    "pd_fs": {"air": 0.0, "muscle": 0.22, "fat": 0.08, "fluid": 0.95, "marrow": 0.12, "cortex": 0.03,
              "cartilage": 0.42, "lesion": 0.65, "meniscus": 0.05},
    # T2-weighted TSE without fat suppression: fluid brightest, fatty marrow and fat intermediate-bright.
    "t2": {"air": 0.0, "muscle": 0.18, "fat": 0.55, "fluid": 1.0, "marrow": 0.48, "cortex": 0.03,
           "cartilage": 0.22, "lesion": 0.78, "meniscus": 0.04},
    # T1-weighted: fat and marrow bright, BML and fluid dark.
    "t1": {"air": 0.0, "muscle": 0.33, "fat": 0.92, "fluid": 0.18, "marrow": 0.82, "cortex": 0.03,
           "cartilage": 0.42, "lesion": 0.30, "meniscus": 0.08},
}
PRESET_NAMES = (*PRESETS, "random")

_KIND_TISSUE = {"bone": MARROW, "cartilage": CARTILAGE, "lesion": LESION, "other": MUSCLE}


@dataclass(frozen=True)
class SynthesisOptions:
    """How an image is synthesized (everything but the label map and the seed).

    Attributes:
        preset: "dess", "pd_fs", "t2", "t1" or "random".
        snr: mean foreground signal over the noise standard deviation (Rician noise); None for none.
        bias: strength of the multiplicative bias field (log-amplitude standard deviation).
        texture: relative amplitude of the smooth within-tissue texture.
        jitter: relative random change of each preset mean (ignored for "random").
        target_spacing: voxel size (mm, array axes) of the acquisition grid; None keeps the input grid.
        rotation_deg, translation_mm: limits of a random rigid repositioning of the anatomy within the
            grid (0 = none); labels are moved with nearest-neighbour interpolation.
        cortex_mm: thickness of the dark cortical rim inside bones.
    """

    preset: str = "dess"
    snr: float | None = 25.0
    bias: float = 0.2
    texture: float = 0.06
    jitter: float = 0.08
    target_spacing: tuple[float, float, float] | None = None
    rotation_deg: float = 0.0
    translation_mm: float = 0.0
    cortex_mm: float = 0.7

    def __post_init__(self) -> None:
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESET_NAMES)}")
        if self.snr is not None and self.snr <= 0:
            raise ValueError(f"snr must be positive, got {self.snr}")
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise ValueError(f"target spacing must be three positive sizes in mm, got {self.target_spacing}")


@dataclass(frozen=True)
class Synthesis:
    """A synthesized image, the label map on the image's grid, and the parameters that made it."""

    image: Volume
    labels: Volume
    params: dict[str, Any] = field(default_factory=dict)


def synthesize(labels: Volume, schema: LabelSchema | None = None, preset: str = "dess", seed: int = 0,
               **options: Any) -> Synthesis:
    """Synthesize an MR-like image of the label map ``labels``.

    Args:
        labels: integer label map (any grid; array axes in any order).
        schema: its label schema (default ``oai_zib``); decides which labels are bone, cartilage, lesion.
        preset: contrast, see :data:`PRESETS` (or "random").
        seed: seed of every random choice.
        **options: fields of :class:`SynthesisOptions` (snr, bias, texture, target_spacing, ...).

    Returns:
        :class:`Synthesis` with the float32 image and the labels on the same grid (the input grid
        unless ``target_spacing`` or a repositioning was asked for).
    """
    return synthesize_with(labels, SynthesisOptions(preset=preset, **options), seed, schema)


def synthesize_with(labels: Volume, opts: SynthesisOptions, seed: int = 0,
                    schema: LabelSchema | None = None) -> Synthesis:
    """:func:`synthesize` with the options as one :class:`SynthesisOptions`."""
    schema = schema or load_schema("oai_zib")
    rng = np.random.default_rng(seed)
    means = _class_means(opts, rng)
    params: dict[str, Any] = {"preset": opts.preset, "seed": seed, "snr": opts.snr, "bias": opts.bias,
                              "texture": opts.texture, "class_means": dict(zip(TISSUES, map(float, means)))}
    lab = np.asarray(labels.array)
    if opts.rotation_deg > 0 or opts.translation_mm > 0:
        lab, motion = _reposition(labels, opts, rng)
        params["reposition_world_mm"] = np.round(motion, 9).tolist()
    spacing = labels.spacing
    tissue = tissue_map(lab, spacing, schema, opts, rng)
    image = np.take(means, tissue)
    # Texture (2 mm, log-normal: exp(a n) ~ 1 + a n) and bias field (60 mm) in one multiplicative field.
    image *= smooth_log_field(lab.shape, spacing, [(2.0, opts.texture), (60.0, opts.bias)], rng)
    target = opts.target_spacing or spacing
    image = _psf(image, spacing, target)
    affine = labels.affine
    if opts.target_spacing is not None:
        image, lab, affine = _resample(image, lab, labels.affine, target)
    if opts.snr is not None:
        sigma = np.float32(foreground_mean(image) / opts.snr)
        real = rng.standard_normal(image.shape, dtype=np.float32)
        real *= sigma
        real += image
        real **= 2
        imag = rng.standard_normal(image.shape, dtype=np.float32)
        imag *= sigma
        imag **= 2
        real += imag
        del imag
        image = np.sqrt(real, out=real)
        params["noise_sigma"] = float(sigma) * 1000.0
    image *= np.float32(1000.0)
    meta = VolumeMeta(source=f"synth:{opts.preset}", series_description=f"synthetic {opts.preset}",
                      laterality=labels.meta.laterality)
    out_labels = Volume(lab.astype(labels.array.dtype, copy=False), affine, labels.meta)
    return Synthesis(Volume(image, affine, meta), out_labels, params)


def foreground_mean(image: np.ndarray) -> float:
    """Mean of the voxels brighter than 5 % of the 99th percentile (the leg, not the air), estimated
    on a regular subsample of about 200 000 voxels."""
    sample = image.ravel()[:: max(1, image.size // 200_000)]
    return float(sample[sample > 0.05 * float(np.percentile(sample, 99))].mean())


def _class_means(opts: SynthesisOptions, rng: np.random.Generator) -> np.ndarray:
    if opts.preset == "random":
        means = rng.uniform(0.02, 1.0, len(TISSUES))
        means[AIR] = rng.uniform(0.0, 0.05)
        means[CORTEX] = rng.uniform(0.0, 0.2)
    else:
        table = PRESETS[opts.preset]
        means = np.array([table[t] for t in TISSUES]) * rng.uniform(1 - opts.jitter, 1 + opts.jitter, len(TISSUES))
    return means.astype(np.float32)


def tissue_map(lab: np.ndarray, spacing: tuple[float, float, float], schema: LabelSchema,
                opts: SynthesisOptions, rng: np.random.Generator) -> np.ndarray:
    """uint8 tissue class per voxel (indices into :data:`TISSUES`)."""

    lut = np.full(max(int(lab.max()), max(schema.ids)) + 1, 255, dtype=np.uint8)
    for s in schema.structures:
        lut[s.id] = _KIND_TISSUE[s.kind]
    tissue = np.take(lut, lab)
    plates = [schema.cartilage_of(b) for b in ("femur", "tibia") if b in {x.name for x in schema.bones}]
    soft = _soft_tissue(tissue, lab, [p.id for p in plates if p is not None], spacing, rng)
    tissue = np.where(tissue == 255, soft, tissue)
    del soft
    # Cortex: bone voxels less than cortex_mm (at least one voxel) from a non-bone voxel.
    bone = (tissue == MARROW) | (tissue == LESION)
    inner = bone.copy()
    for axis, s in enumerate(spacing):
        for k in range(1, max(1, round(opts.cortex_mm / s)) + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, -k), slice(k, None)
            inner[tuple(lo)] &= bone[tuple(hi)]
            inner[tuple(hi)] &= bone[tuple(lo)]
    cortex = (tissue == MARROW) & ~inner
    return np.where(cortex, np.uint8(CORTEX), tissue)


def _soft_tissue(tissue: np.ndarray, lab: np.ndarray, joint_plates: list[int], spacing: tuple[float, float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """Tissue classes for the unlabelled voxels, on the full grid (valid where ``tissue == 255``).

    Distances to the labelled anatomy and to cartilage are computed on a ~2 mm grid, interpolated to a
    ~1 mm grid where the classes are decided, and the classes are repeated onto the full grid."""
    from scipy import ndimage

    factors = tuple(max(1, round(1.0 / s)) for s in spacing)
    small_shape = tuple(-(-n // f) for n, f in zip(tissue.shape, factors))
    small_spacing = tuple(s * f for s, f in zip(spacing, factors))
    step = tuple(slice(0, None, 2 * f) for f in factors)
    coarse = tissue[step]
    coarse_lab = lab[step]
    coarse_spacing = tuple(2 * s for s in small_spacing)
    masks = [coarse != 255, coarse == CARTILAGE] + [coarse_lab == i for i in joint_plates]
    distances = []
    for mask in masks:
        d = ndimage.distance_transform_edt(~mask, sampling=coarse_spacing) if mask.any() else \
            np.full(coarse.shape, 1e3)
        distances.append(upsample_linear(d.astype(np.float32), small_shape, 2))
    d_any, d_cart = distances[:2]
    body = 30.0 + 9.0 * smooth_noise(small_shape, small_spacing, 40.0, rng)
    fat_band = 6.0 + 2.5 * smooth_noise(small_shape, small_spacing, 25.0, rng)
    fluid_width = 1.2 + 1.2 * smooth_noise(small_shape, small_spacing, 10.0, rng)
    islands = smooth_noise(small_shape, small_spacing, 8.0, rng)
    soft = np.full(small_shape, MUSCLE, dtype=np.uint8)
    soft[islands > 1.3] = FAT
    soft[d_any > body - fat_band] = FAT
    soft[d_any > body] = AIR
    soft[(d_cart < fluid_width) & (d_any < 4.0)] = FLUID
    if len(distances) == 4:  # menisci: wedges between the femoral and tibial plates
        soft[(distances[2] + distances[3] < 7.0) & (d_any > 0.5)] = MENISCUS
    for axis, f in enumerate(factors):
        if f > 1:
            soft = np.repeat(soft, f, axis=axis)
    return soft[tuple(slice(0, n) for n in tissue.shape)]


def upsample_linear(coarse: np.ndarray, shape: tuple[int, ...], factor: int) -> np.ndarray:
    """Separable linear interpolation of a grid sampled every ``factor`` voxels of ``shape``."""
    out = coarse
    for axis, n in enumerate(shape):
        x = np.arange(n) / factor
        j0 = np.clip(np.floor(x).astype(int), 0, coarse.shape[axis] - 1)
        j1 = np.minimum(j0 + 1, coarse.shape[axis] - 1)
        w = (x - j0).astype(np.float32)
        a = np.take(out, j0, axis=axis)
        b = np.take(out, j1, axis=axis)
        shape_w = [1] * out.ndim
        shape_w[axis] = n
        out = a + (b - a) * w.reshape(shape_w)
    return out


def _psf(image: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float]) -> np.ndarray:
    """Gaussian point spread function of an acquisition with voxels ``target`` (mm): FWHM of one target
    voxel per axis, expressed in the input grid's voxels."""
    from scipy import ndimage

    sigma = [max(t, s) / 2.355 / s for s, t in zip(spacing, target)]
    return ndimage.gaussian_filter(image, sigma=sigma, truncate=3.0, mode="nearest")


def resampled_grid(shape: tuple[int, int, int], affine: np.ndarray,
                   spacing: tuple[float, float, float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid with voxel size ``spacing`` (mm) covering the same field of view, same axis directions."""
    old = np.linalg.norm(affine[:3, :3], axis=0)
    new = np.asarray(spacing, float)
    new_shape = tuple(int(max(1, round(n * o / s))) for n, o, s in zip(shape, old, new))
    direction = affine[:3, :3] / old
    out = np.eye(4)
    out[:3, :3] = direction * new
    # Keep the field of view's first corner: centre of voxel 0 moves by half the size change.
    out[:3, 3] = affine[:3, 3] + direction @ ((new - old) / 2)
    return new_shape, out


def _resample(image: np.ndarray, lab: np.ndarray, affine: np.ndarray,
              spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy import ndimage

    shape, new_affine = resampled_grid(image.shape, affine, spacing)
    matrix = np.linalg.inv(affine) @ new_affine
    image = ndimage.affine_transform(image, matrix[:3, :3], matrix[:3, 3], output_shape=shape, order=1,
                                     mode="nearest")
    lab = ndimage.affine_transform(lab, matrix[:3, :3], matrix[:3, 3], output_shape=shape, order=0, mode="constant")
    return image, lab, new_affine


def _reposition(labels: Volume, opts: SynthesisOptions, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels moved by a random rigid transform about the grid centre (nearest neighbour, same grid);
    returns the array and the 4x4 world transform applied to the anatomy."""
    from scipy import ndimage

    rot = rotation_matrix(tuple(rng.uniform(-opts.rotation_deg, opts.rotation_deg, 3)))
    shift = rng.uniform(-opts.translation_mm, opts.translation_mm, 3)
    centre = labels.world_coords((np.asarray(labels.shape) - 1) / 2)
    motion = np.eye(4)
    motion[:3, :3] = rot
    motion[:3, 3] = centre + shift - rot @ centre
    # Output voxel v shows the anatomy found at world point motion^-1 (A v) in the input.
    matrix = np.linalg.inv(labels.affine) @ np.linalg.inv(motion) @ labels.affine
    moved = ndimage.affine_transform(np.asarray(labels.array), matrix[:3, :3], matrix[:3, 3], order=0,
                                     mode="constant")
    return moved, motion


def synthesize_patch(labels: Volume, centre_ijk: tuple[int, int, int], patch_shape: tuple[int, int, int],
                     schema: LabelSchema | None = None, seed: int = 0, margin_mm: float = 12.0,
                     **options: Any) -> Synthesis:
    """Synthesize only a patch (for on-the-fly training): the label map is cropped around
    ``centre_ijk`` to ``patch_shape`` plus ``margin_mm`` of context (for the soft-tissue distances and
    the filters), synthesized, and trimmed back to ``patch_shape`` on the input grid.

    The patch is a valid synthesis of its own, not a crop of the full-volume synthesis with the same
    seed (random fields are drawn for the cropped grid). ``target_spacing`` and repositioning are not
    supported here; resample or move the label map first.
    """
    opts = SynthesisOptions(**options)
    if opts.target_spacing is not None or opts.rotation_deg or opts.translation_mm:
        raise ValueError("synthesize_patch keeps the input grid; resample or reposition the label map first")
    margin = [int(np.ceil(margin_mm / s)) for s in labels.spacing]
    starts = [int(c) - p // 2 for c, p in zip(centre_ijk, patch_shape)]
    if any(s < 0 or s + p > n for s, p, n in zip(starts, patch_shape, labels.shape)):
        raise ValueError(f"patch {tuple(patch_shape)} at {tuple(centre_ijk)} does not fit the grid {labels.shape}")
    outer = tuple(slice(max(0, s - m), min(n, s + p + m)) for s, p, m, n in zip(starts, patch_shape, margin, labels.shape))
    result = synthesize_with(labels.crop(outer), opts, seed, schema)
    inner = tuple(slice(s - o.start, s - o.start + p) for s, o, p in zip(starts, outer, patch_shape))
    return Synthesis(result.image.crop(inner), result.labels.crop(inner), result.params)
