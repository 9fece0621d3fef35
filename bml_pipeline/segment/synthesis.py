"""Training images made on the fly, in torch, from cached generation-label maps (the SynthSeg recipe).

A *generation map* is a label map on an isotropic RAS grid whose values say which tissue a voxel is,
finer than the segmentation labels: the nine oai_zib structures, each bone's cortical rim, and the
unlabelled background split into air, muscle, fat, joint fluid and menisci (from the label geometry,
:func:`bml_pipeline.synth.image.tissue_map`). It is built once per label map and cached.

Every training step draws a fresh sample from one generation map (:meth:`SampleGenerator.sample`):

1. a random pose (rotation, anisotropic scale, medial-lateral mirror, shift) plus a smooth elastic
   displacement, sampled with nearest neighbour onto the network's grid or one ``supersample`` times
   finer;
2. random pseudo-tissues (blobs, sheets, tubes from thresholded anisotropic smooth noise) painted into
   the soft tissue, so the network learns what is *not* bone or cartilage;
3. an intensity per generation label: a clinical preset (jittered) or fully random, with within-tissue
   noise; averaged onto the network grid when supersampled (partial volume), blurred (point spread
   function);
4. a thick-slice acquisition along a random axis (mostly the sagittal x axis), a multiplicative bias
   field, Rician noise at a random SNR, a random gamma, a field of view cut as real scans are;
5. percentile normalisation exactly as at inference.

Targets are one-hot, or soft when supersampled (the fraction of each class in the fine voxels under a
network voxel).
Layout: image (1, D, H, W) float32; target (C, D, H, W) float32; D, H, W = RAS x, y, z.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bml_pipeline.labels import load_schema
from bml_pipeline.synth.image import PRESETS, TISSUES, SynthesisOptions, tissue_map
from bml_pipeline.synth.sdf import rotation_matrix
from bml_pipeline.volume import Volume

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Generation labels: 1..9 are the oai_zib structures, then these.
CORTEX_FEMUR, CORTEX_TIBIA, CORTEX_PATELLA = 10, 11, 12
AIR, MUSCLE, FAT, FLUID, MENISCUS = 13, 14, 15, 16, 17
PSEUDO = (18, 19, 20, 21)
N_GENERATION = 22
SOFT_TISSUE = (MUSCLE, FAT, FLUID)

#: Tissue (index into :data:`bml_pipeline.synth.image.TISSUES`) of each generation label, for presets.
_TISSUE = dict(zip(TISSUES, range(len(TISSUES))))
GENERATION_TISSUE = np.array(
    [_TISSUE["air"], _TISSUE["marrow"], _TISSUE["cartilage"], _TISSUE["marrow"], _TISSUE["cartilage"],
     _TISSUE["marrow"], _TISSUE["cartilage"], _TISSUE["lesion"], _TISSUE["lesion"], _TISSUE["lesion"],
     _TISSUE["cortex"], _TISSUE["cortex"], _TISSUE["cortex"], _TISSUE["air"], _TISSUE["muscle"],
     _TISSUE["fat"], _TISSUE["fluid"], _TISSUE["meniscus"], 0, 0, 0, 0])

#: Coarse classes (bones with their lesions and cortex, three plates); class index == oai_zib id.
COARSE_CLASSES = np.array([0, 1, 2, 3, 4, 5, 6, 1, 3, 5, 1, 3, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0])
#: All ten oai_zib labels (lesions kept apart; cortex belongs to its bone).
FULL_CLASSES = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 3, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def generation_map(labels: Volume, spacing_mm: float, seed: int = 0) -> Volume:
    """The generation map (uint8, values < :data:`N_GENERATION`) of an oai_zib label map, on a
    RAS-aligned isotropic grid of ``spacing_mm`` covering it (nearest-neighbour labels), or on the map's
    own grid when ``spacing_mm`` is 0."""
    from bml_pipeline.segment.resample import labels_to_working_grid

    work = labels_to_working_grid(labels, spacing_mm) if spacing_mm > 0 else labels
    lab = np.asarray(work.array, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    tissue = tissue_map(lab, work.spacing, load_schema("oai_zib"), SynthesisOptions(cortex_mm=0.8), rng)
    gen = lab.copy()
    cortex = tissue == _TISSUE["cortex"]
    for bone_ids, label in (((1, 7), CORTEX_FEMUR), ((3, 8), CORTEX_TIBIA), ((5, 9), CORTEX_PATELLA)):
        gen[cortex & np.isin(lab, bone_ids)] = label
    background = lab == 0
    for name, label in (("air", AIR), ("muscle", MUSCLE), ("fat", FAT), ("fluid", FLUID), ("meniscus", MENISCUS)):
        gen[background & (tissue == _TISSUE[name])] = label
    gen[background & (gen == 0)] = MUSCLE
    return work.with_array(gen)


def cached_generation_maps(label_paths: list[Path], spacing_mm: float, cache_dir: Path) -> list[Volume]:
    """Generation maps of ``label_paths``, read from ``cache_dir`` or built and written there."""
    from bml_pipeline.io import read_volume

    cache_dir.mkdir(parents=True, exist_ok=True)
    maps = []
    for path in label_paths:
        grid = f"{spacing_mm:g}mm" if spacing_mm > 0 else "native"
        cached = cache_dir / f"{path.name.split('.')[0]}_{grid}.npz"
        if cached.exists():
            with np.load(cached) as z:
                maps.append(Volume(z["gen"], z["affine"]))
            continue
        vol = generation_map(read_volume(path), spacing_mm)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, gen=np.asarray(vol.array), affine=vol.affine)
        tmp.replace(cached)
        maps.append(vol)
        log.info("generation map %s: %s", path.name, vol.shape)
    return maps


@dataclass(frozen=True)
class SamplingOptions:
    """Ranges of the random draws of :meth:`SampleGenerator.sample` (angles in degrees, lengths in mm)."""

    spacing_mm: float = 1.5
    shape: tuple[int, int, int] = (80, 96, 96)
    supersample: int = 1
    """Labels and intensities are made on a grid this many times finer per axis, then averaged (partial
    volume, soft targets); 2 costs about 7x the time of 1."""
    rotation_deg: float = 20.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift_mm: float = 20.0
    elastic_mm: float = 3.0
    random_contrast: float = 0.6
    thick_slice: float = 0.5
    thick_mm: tuple[float, float] = (2.0, 5.0)
    snr: tuple[float, float] = (6.0, 40.0)
    bias: tuple[float, float] = (0.0, 0.5)
    fov_cut: float = 0.4
    percentiles: tuple[float, float] = (0.5, 99.5)
    focus: str = "centre"
    """Where a sample is centred (then shifted by up to ``shift_mm``): "centre", the map's centre (the
    whole knee); "surface", a random cartilage, lesion or cortex voxel (crops for the fine stage)."""
    lesion_focus: float = 0.25
    """With ``focus="surface"``: the probability of centring on a lesion voxel (when the map has one)."""
    synthetic_lesions: float = 0.0
    """Probability of painting a random subchondral lesion (a 4-12 mm blob) into a bone's marrow."""
    prior_classes: int = 0
    """When > 0, the image gets this many more channels: a simulated coarse-stage probability map of
    the coarse classes (:data:`COARSE_CLASSES`; the target shifted, pooled to 1.5 mm, blurred, mixed with
    uniform), as the fine stage receives at inference."""


class SampleGenerator:
    """Fresh (image, soft target) pairs from generation maps; see the module docstring.

    ``classes`` maps generation labels to target classes (:data:`COARSE_CLASSES` or
    :data:`FULL_CLASSES`). All randomness comes from the ``torch.Generator`` passed to :meth:`sample`.
    """

    def __init__(self, maps: list[Volume], classes: np.ndarray, options: SamplingOptions) -> None:
        import torch

        self.maps = [(torch.from_numpy(np.ascontiguousarray(m.array, dtype=np.uint8)), m.affine) for m in maps]
        self.classes = torch.from_numpy(classes.astype(np.int64))
        self.n_classes = int(classes.max()) + 1
        self.opt = options
        self.surface: list[tuple[np.ndarray, np.ndarray]] = []
        if options.focus == "surface":
            for m in maps:
                arr = np.asarray(m.array)
                step = max(1, round(2.0 / min(m.spacing)))  # candidates on a ~2 mm lattice
                sub = arr[::step, ::step, ::step]
                surface = np.argwhere(np.isin(sub, (2, 4, 6, CORTEX_FEMUR, CORTEX_TIBIA, CORTEX_PATELLA))) * step
                lesion = np.argwhere(np.isin(sub, (7, 8, 9))) * step
                self.surface.append((m.world_coords(surface.astype(np.float64)), m.world_coords(lesion.astype(np.float64))))

    def sample(self, gen: torch.Generator, index: int | None = None,
               preset: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One pair: image (1, D, H, W) normalised, soft target (C, D, H, W). ``index`` picks the
        generation map (default: random); ``preset`` forces a contrast ("random" or a preset name)."""
        import torch
        import torch.nn.functional as F

        o = self.opt
        if index is None:
            index = int(torch.randint(len(self.maps), (1,), generator=gen))
        labels = self._warp(index, gen)
        self._paint_pseudo_tissues(labels, gen)
        if o.synthetic_lesions > 0 and _uniform(gen, 0, 1) < o.synthetic_lesions:
            _paint_lesion(labels, o.spacing_mm / o.supersample, gen)
        fine = self._intensities(labels, gen, preset)
        k = o.supersample
        image = F.avg_pool3d(fine[None, None], k)[0, 0] if k > 1 else fine
        cls = self.classes[labels.long()]
        target = torch.stack([F.avg_pool3d((cls == c).float()[None, None], k)[0, 0] if k > 1 else (cls == c).float()
                              for c in range(self.n_classes)])
        del fine, cls, labels
        image = _blur(image, [_uniform(gen, 0.0, 0.6)] * 3)
        if _uniform(gen, 0, 1) < o.thick_slice:
            axis = 0 if _uniform(gen, 0, 1) < 0.6 else int(torch.randint(3, (1,), generator=gen))
            image = _thick_slices(image, axis, _uniform(gen, *o.thick_mm) / o.spacing_mm)
        image = image * _smooth_field(image.shape, 4, gen).mul(_uniform(gen, *o.bias)).exp()
        image = _rician(image, _uniform(gen, *o.snr), gen)
        image = image / image.max().clamp_min(1e-6)
        image = image.clamp_min(0).pow(float(np.exp(0.25 * float(torch.randn(1, generator=gen)))))
        if _uniform(gen, 0, 1) < o.fov_cut:
            _cut_field_of_view(image, target, gen)
        image = _normalise(image, o.percentiles)[None]
        if o.prior_classes:
            image = torch.cat([image, self._simulated_prior(target, gen)])
        return image, target

    def _simulated_prior(self, target: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Coarse-class probabilities as an imperfect coarse stage would give them (see ``prior_classes``)."""
        import torch
        import torch.nn.functional as F

        o = self.opt
        merge = torch.zeros((o.prior_classes, self.n_classes))
        merge[torch.from_numpy(COARSE_CLASSES[FULL_CLASSES_INDEX[: self.n_classes]]), torch.arange(self.n_classes)] = 1
        coarse = torch.einsum("pc,cdhw->pdhw", merge, target)[None]
        factor = max(1, round(1.5 / o.spacing_mm))
        pooled = F.avg_pool3d(coarse, factor, ceil_mode=True)
        shifts = [int(torch.randint(-1, 2, (1,), generator=gen)) for _ in range(3)]
        pooled = torch.roll(pooled, shifts=shifts, dims=(2, 3, 4))
        pooled = torch.stack([_blur(c, [_uniform(gen, 0.3, 1.2)] * 3) for c in pooled[0]])[None]
        prior = F.interpolate(pooled, size=tuple(target.shape[1:]), mode="trilinear", align_corners=False)[0]
        mix = _uniform(gen, 0.0, 0.3)
        prior = (1 - mix) * prior / prior.sum(0, keepdim=True).clamp_min(1e-6) + mix / o.prior_classes
        return prior

    def _warp(self, index: int, gen: torch.Generator) -> torch.Tensor:
        """The generation map in a random pose on the fine output grid (float labels)."""
        import torch
        import torch.nn.functional as F

        o = self.opt
        source, affine = self.maps[index]
        fine_shape = np.array(o.shape) * o.supersample
        fine_mm = o.spacing_mm / o.supersample
        ax, ay, az = (_uniform(gen, -o.rotation_deg, o.rotation_deg) for _ in range(3))
        linear = rotation_matrix((ax, ay, az)) @ np.diag([_uniform(gen, *o.scale) for _ in range(3)])
        if _uniform(gen, 0, 1) < 0.5:
            linear = linear @ np.diag([-1.0, 1.0, 1.0])
        centre_src = affine[:3, :3] @ ((np.array(source.shape) - 1) / 2) + affine[:3, 3]
        if o.focus == "surface":
            surface, lesions = self.surface[index]
            pool = lesions if len(lesions) and _uniform(gen, 0, 1) < o.lesion_focus else surface
            if len(pool):
                centre_src = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        centre = centre_src + np.array([_uniform(gen, -o.shift_mm, o.shift_mm) for _ in range(3)])
        # world(o) = centre + linear @ ((o - c_out) * fine_mm); source ijk = A^-1 world
        out_to_world = np.eye(4)
        out_to_world[:3, :3] = linear * fine_mm
        out_to_world[:3, 3] = centre - out_to_world[:3, :3] @ ((fine_shape - 1) / 2)
        out_to_src = np.linalg.inv(affine) @ out_to_world
        # The sampling grid (affine + elastic) is built on a lattice a quarter of the network grid and
        # upsampled trilinearly: exact for the affine part, and the elastic part is smooth anyway.
        lattice = np.maximum(np.array(o.shape) // 4, 2)
        theta = _normalised_theta(out_to_src, fine_shape, np.array(source.shape))
        base = F.affine_grid(torch.from_numpy(theta)[None], [1, 1, *lattice.tolist()], align_corners=True)
        base = base[0].permute(3, 0, 1, 2)[None]
        if o.elastic_mm > 0:
            sd = _uniform(gen, 0, o.elastic_mm) / (fine_mm * (np.array(source.shape)[::-1] - 1) / 2)
            coarse = torch.randn((1, 3, 5, 5, 5), generator=gen) * torch.from_numpy(sd.astype(np.float32))[None, :, None, None, None]
            base = base + F.interpolate(coarse, size=tuple(lattice.tolist()), mode="trilinear", align_corners=True)
        grid = F.interpolate(base, size=tuple(fine_shape.tolist()), mode="trilinear", align_corners=True)
        grid = grid[0].permute(1, 2, 3, 0)[None]
        warped = F.grid_sample(source[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=True)[0, 0]
        warped[warped == 0] = AIR
        return warped

    def _paint_pseudo_tissues(self, labels: torch.Tensor, gen: torch.Generator) -> None:
        """Paint up to four random shapes (thresholded anisotropic smooth noise) into the soft tissue."""
        import torch
        import torch.nn.functional as F

        soft = (labels == MUSCLE) | (labels == FAT) | (labels == FLUID)
        half = tuple(n // 2 for n in labels.shape)
        for label in PSEUDO:
            if _uniform(gen, 0, 1) < 0.3:
                continue
            lattice = [int(torch.randint(2, 12, (1,), generator=gen)) for _ in range(3)]
            shape = (_smooth_field(half, lattice, gen) > _uniform(gen, 1.0, 2.2)).float()
            shape = F.interpolate(shape[None, None], size=tuple(labels.shape), mode="nearest")[0, 0] > 0
            labels[soft & shape] = label

    def _intensities(self, labels: torch.Tensor, gen: torch.Generator, preset: str | None) -> torch.Tensor:
        """Image on the fine grid: a mean and a within-tissue spread per generation label."""
        import torch

        if preset is None:
            preset = "random" if _uniform(gen, 0, 1) < self.opt.random_contrast else \
                list(PRESETS)[int(torch.randint(len(PRESETS), (1,), generator=gen))]
        if preset == "random":
            means = torch.rand(N_GENERATION, generator=gen)
            means[AIR] = means[AIR] * 0.05
        else:
            table = torch.tensor([PRESETS[preset][t] for t in TISSUES])
            means = table[torch.from_numpy(GENERATION_TISSUE)] * (1 + 0.15 * (2 * torch.rand(N_GENERATION, generator=gen) - 1))
            for label in PSEUDO:
                means[label] = float(torch.rand(1, generator=gen))
        spread = torch.rand(N_GENERATION, generator=gen) * 0.12 * means
        idx = labels.long()
        image = means[idx] + spread[idx] * torch.randn(labels.shape, generator=gen)
        return image.clamp_min(0)


FULL_CLASSES_INDEX = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
"""Generation labels 0..9 are the oai_zib ids: a full class ``c`` is generation label ``c``."""


def _paint_lesion(labels: torch.Tensor, spacing_mm: float, gen: torch.Generator) -> None:
    """Turn a random blob of one bone's marrow, centred on that bone's cortex (subchondral), into the
    bone's lesion label (in place)."""
    import torch

    bones = [(bone, cortex, lesion) for bone, cortex, lesion in
             ((1, CORTEX_FEMUR, 7), (3, CORTEX_TIBIA, 8), (5, CORTEX_PATELLA, 9)) if bool((labels == cortex).any())]
    if not bones:
        return
    bone, cortex, lesion = bones[int(torch.randint(len(bones), (1,), generator=gen))]
    where = torch.nonzero(labels == cortex)
    centre = where[int(torch.randint(len(where), (1,), generator=gen))].float()
    radii = torch.tensor([_uniform(gen, 4.0, 12.0) for _ in range(3)]) / spacing_mm
    r = int(torch.ceil(radii.max()))
    lo = (centre - r).clamp_min(0).long()
    hi = torch.minimum(centre + r + 1, torch.tensor(labels.shape, dtype=torch.float32)).long()
    box: tuple[slice, ...] = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = torch.meshgrid(*[torch.arange(int(a), int(b), dtype=torch.float32) for a, b in zip(lo, hi)], indexing="ij")
    d2 = sum(((g - c) / rad) ** 2 for g, c, rad in zip(grids, centre, radii))
    wobble = _smooth_field(tuple(d2.shape), 3, gen) * 0.25
    inside = (d2 + wobble < 1.0) & (labels[box] == bone)
    labels[box][inside] = lesion


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    import torch

    return float(lo + (hi - lo) * torch.rand(1, generator=gen))


def _normalised_theta(out_to_src: np.ndarray, out_shape: np.ndarray, src_shape: np.ndarray) -> np.ndarray:
    """``affine_grid``'s theta (3x4, coordinates ordered (k, j, i) in [-1, 1]) of a voxel-to-voxel map."""
    def to_norm(shape: np.ndarray) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = np.diag(2.0 / np.maximum(shape - 1, 1))
        m[:3, 3] = -1.0
        return m

    perm = np.eye(4)[[2, 1, 0, 3]]
    full = perm @ to_norm(src_shape) @ out_to_src @ np.linalg.inv(to_norm(out_shape)) @ perm
    return full[:3].astype(np.float32)


def _smooth_field(shape: tuple[int, ...], lattice: int | list[int], gen: torch.Generator) -> torch.Tensor:
    """Smooth unit-variance-ish noise of ``shape`` from a random lattice, trilinearly upsampled."""
    import torch
    import torch.nn.functional as F

    size = [lattice] * 3 if isinstance(lattice, int) else lattice
    coarse = torch.randn((1, 1, *size), generator=gen)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]


def _blur(image: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Separable Gaussian blur (sigma in voxels per axis; below 0.2 an axis is left alone)."""
    import torch
    import torch.nn.functional as F

    out = image[None, None]
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.2:
            continue
        radius = max(1, int(np.ceil(3 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.reshape(shape))
    return out[0, 0]


def _thick_slices(image: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    """Acquired with slices ``factor`` voxels thick along ``axis`` (Gaussian slice profile), then
    brought back by linear interpolation, as the inference resampling does."""
    import torch.nn.functional as F

    if factor <= 1.05:
        return image
    sigmas = [0.0, 0.0, 0.0]
    sigmas[axis] = factor / 2.355
    blurred = _blur(image, sigmas)
    size = list(image.shape)
    size[axis] = max(2, round(size[axis] / factor))
    low = F.interpolate(blurred[None, None], size=tuple(size), mode="trilinear", align_corners=True)
    return F.interpolate(low, size=tuple(image.shape), mode="trilinear", align_corners=True)[0, 0]


def _rician(image: torch.Tensor, snr: float, gen: torch.Generator) -> torch.Tensor:
    import torch

    fg = image[image > 0.05 * image.max()]
    sigma = float(fg.mean()) / snr if fg.numel() else 0.01
    real = image + sigma * torch.randn(image.shape, generator=gen)
    imag = sigma * torch.randn(image.shape, generator=gen)
    return torch.sqrt(real * real + imag * imag)


def _cut_field_of_view(image: torch.Tensor, target: torch.Tensor, gen: torch.Generator) -> None:
    """Blank a slab of up to a quarter of the grid at one end of a random axis (in place): the image
    takes its minimum, the target becomes background, as outside a real scan's field of view."""
    import torch

    axis = int(torch.randint(3, (1,), generator=gen))
    n = image.shape[axis]
    width = int(_uniform(gen, 0.05, 0.25) * n)
    sl: list[slice] = [slice(None)] * 3
    sl[axis] = slice(0, width) if _uniform(gen, 0, 1) < 0.5 else slice(n - width, n)
    image[tuple(sl)] = image.min()
    target[:, sl[0], sl[1], sl[2]] = 0
    target[0, sl[0], sl[1], sl[2]] = 1


def _normalise(image: torch.Tensor, percentiles: tuple[float, float]) -> torch.Tensor:
    """As :func:`bml_pipeline.segment.intensity.percentile_normalise`, in torch."""
    import torch

    flat = image.flatten()
    if flat.numel() > 4_000_000:
        flat = flat[:: flat.numel() // 4_000_000 + 1]
    lo, hi = torch.quantile(flat, torch.tensor([percentiles[0] / 100, percentiles[1] / 100]))
    if not hi > lo:
        return torch.zeros_like(image)
    return ((image - lo) / (hi - lo)).clamp(-0.5, 1.5)
