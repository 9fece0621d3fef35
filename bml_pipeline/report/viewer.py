"""The report's interactive viewer: NiiVue, inlined from the installed ``ipyniivue`` wheel, with the scan.

The per-scan report stays one self-contained file. When ``ipyniivue`` (BSD-2-Clause; it ships NiiVue's
ES-module build as ``ipyniivue/static/widget.js``) is installed, :func:`viewer_context` returns what the
report template needs to embed a three-plane viewer:

- the library: the installed bundle, read at report-writing time (never copied into this repository),
  with one line appended that hands NiiVue's class to the report's own script, gzipped and base64-encoded
  (the browser inflates it with ``DecompressionStream``; about 2 MB instead of 5 MB of text);
- the volumes as gzipped NIfTI, base64-encoded: the image windowed to uint8 and block-averaged to about
  :data:`VIEWER_SPACING_MM` in-plane, the labels on the same grid (the most frequent label of each block)
  and, when the run has them, the cartilage thickness maps (largest value of each block). Affines are
  adjusted so the geometry stays exact; the grid is coarsened further until the volumes fit
  :data:`MAX_VOLUME_BYTES`;
- the label lookup table (colours of the key images, names from the label schema) as JSON.

Nothing is fetched by the page: the volumes are handed to NiiVue as byte arrays. Without ``ipyniivue``,
or with a bundle whose layout is not recognised, the report is written without the viewer and says why.
"""

from __future__ import annotations

import base64
import gzip
import importlib.metadata
import importlib.util
import logging
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bml_pipeline.labels import LabelSchema
from bml_pipeline.report import render
from bml_pipeline.report.tables import pretty
from bml_pipeline.volume import Volume

if TYPE_CHECKING:
    from bml_pipeline.report.rundir import RunData

log = logging.getLogger(__name__)

PACKAGE = "ipyniivue"
BUNDLE = "static/widget.js"
"""NiiVue's bundle inside the ``ipyniivue`` package (an ES module, the Jupyter widget's front end)."""
VIEWER_SPACING_MM = 0.7
"""Target in-plane voxel size of the viewer's copy of the scan (finer axes are block-averaged)."""
MAX_VOLUME_BYTES = 3_000_000
"""Upper bound on the embedded volumes (base64 characters, all volumes together)."""
START_HOOK = "bmlViewerStart"
"""Global function of the report's script that the appended line calls with NiiVue's class."""
BONE_ALPHA = 70
"""Opacity (0..255) of a bone's fill in the label layer: light, so the marrow signal stays readable."""

# How NiiVue's class is named inside the minified bundle: the class that ipyniivue's widget instantiates,
# else the class whose constructor starts with NiiVue's first fields. Checked again in the browser.
_CLASS_PATTERNS = (
    re.compile(r'Creating new Niivue instance"\);.{0,300}?=new ([A-Za-z_$][\w$]*)\('),
    re.compile(r'([A-Za-z_$][\w$]*)=class\{constructor\([^)]*\)\{[\w$]+\(this,"loaders",'),
)
_NIIVUE_VERSION = re.compile(r'name:"@niivue/niivue",version:"([^"]+)"')


class ViewerUnavailable(Exception):
    """The viewer cannot be embedded; the message says why (shown in the report)."""


@dataclass(frozen=True)
class Library:
    """NiiVue as found in the installed ``ipyniivue`` package.

    Attributes:
        package: distribution name (``ipyniivue``).
        version: its installed version.
        niivue_version: NiiVue's version recorded in the bundle, or "unknown".
        path: the bundle's path inside the package (``ipyniivue/static/widget.js``).
        licence: the licence named in the package metadata.
        licence_text: the package's licence file (reproduced in the report, as BSD-2-Clause asks).
        class_name: NiiVue's class inside the minified bundle.
        payload: base64 of the gzipped bundle with the start line appended.
        source_bytes: size of the installed bundle.
    """

    package: str
    version: str
    niivue_version: str
    path: str
    licence: str
    licence_text: str
    class_name: str
    payload: str
    source_bytes: int


def find_library() -> Library:
    """NiiVue from the installed ``ipyniivue`` package.

    Raises:
        ViewerUnavailable: the package is not installed, or its bundle is missing or not recognised.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ViewerUnavailable(f"the interactive viewer needs the {PACKAGE} package (pip install {PACKAGE}), "
                                "which was not installed when this report was written")
    bundle = Path(next(iter(spec.submodule_search_locations))) / BUNDLE
    if not bundle.is_file():
        raise ViewerUnavailable(f"{PACKAGE} is installed but has no {BUNDLE}")
    stat = bundle.stat()
    return _library(str(bundle), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=2)
def _library(path: str, mtime_ns: int, size: int) -> Library:
    """Read, check and encode the bundle at ``path`` (cached per file version)."""
    text = Path(path).read_text(encoding="utf-8")
    name = next((m.group(1) for p in _CLASS_PATTERNS if (m := p.search(text))), None)
    if name is None or f"{name}=class" not in text:
        raise ViewerUnavailable(f"the NiiVue bundle of the installed {PACKAGE} has a layout this version of "
                                "bml-pipeline does not recognise")
    version = _NIIVUE_VERSION.search(text)
    hook = f'\n;if(typeof globalThis.{START_HOOK}==="function")globalThis.{START_HOOK}({name});\n'
    payload = base64.b64encode(gzip.compress((text + hook).encode("utf-8"), compresslevel=9, mtime=0))
    try:
        dist = importlib.metadata.distribution(PACKAGE)
        meta = dist.metadata
        package_version = dist.version
        licence = meta["License-Expression"] or meta["License"] or ""
        licence_file = next((f for f in dist.files or [] if Path(str(f)).name.upper().startswith("LICENSE")), None)
        licence_text = Path(str(dist.locate_file(licence_file))).read_text(encoding="utf-8") if licence_file else ""
    except (importlib.metadata.PackageNotFoundError, OSError, UnicodeDecodeError):
        package_version, licence, licence_text = "unknown", "", ""
    return Library(PACKAGE, package_version, version.group(1) if version else "unknown", f"{PACKAGE}/{BUNDLE}",
                   licence or "BSD-2-Clause", licence_text, name, payload.decode("ascii"), size)


# ---- volumes ------------------------------------------------------------------------------------------

def block_factors(spacing: tuple[float, ...], target_mm: float = VIEWER_SPACING_MM) -> tuple[int, int, int]:
    """Integer block size per axis that brings voxels finer than ``target_mm`` close to it."""
    return tuple(max(1, int(np.floor(target_mm / s + 0.5))) for s in spacing)  # type: ignore[return-value]


def block_affine(affine: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Affine of the grid whose voxel (i, j, k) is the block starting at ``factors * (i, j, k)``: axes
    scaled by the factors, origin at the centre of the first block."""
    f = np.asarray(factors, dtype=np.float64)
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = affine[:3, :3] * f
    out[:3, 3] = affine[:3, :3] @ ((f - 1) / 2) + affine[:3, 3]
    return out


def _blocks(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """6D view (n0, f0, n1, f1, n2, f2) of ``array`` cropped to whole blocks."""
    n = [max(1, s // f) for s, f in zip(array.shape, factors)]
    f = [min(f, s) for s, f in zip(array.shape, factors)]
    cropped = array[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]]
    return cropped.reshape(n[0], f[0], n[1], f[1], n[2], f[2])


def block_mean(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean of each block (float32)."""
    if factors == (1, 1, 1):
        return array.astype(np.float32)
    return _blocks(array, factors).mean(axis=(1, 3, 5), dtype=np.float32)


def block_max(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Largest value of each block."""
    return array if factors == (1, 1, 1) else _blocks(array, factors).max(axis=(1, 3, 5))


def block_mode(labels: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Most frequent label of each block; a tie goes to the higher label value (lesions and cartilage,
    which are thin, over bone and background)."""
    if factors == (1, 1, 1):
        return labels
    view = _blocks(labels, factors)
    values = sorted(int(v) for v in np.unique(labels))
    best = np.full(view.shape[0::2], values[0], dtype=labels.dtype)
    best_count = np.full(best.shape, -1, dtype=np.int32)
    for value in values:  # ascending, ">=" lets the higher value win ties
        count = np.count_nonzero(view == value, axis=(1, 3, 5)).astype(np.int32)
        better = count >= best_count
        best[better], best_count[better] = value, count[better]
    return best


def window_uint8(image: np.ndarray, sample_step: int | None = None) -> tuple[np.ndarray, float, float]:
    """``image`` mapped to 0..255 between its 0.5th and 99.5th percentiles (the key images' window);
    returns the grey levels and the window (lo, hi) in the image's units."""
    step = sample_step or max(1, round((image.size / 1e6) ** (1 / 3)))
    sample = image[::step, ::step, ::step].astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    hi = hi if hi > lo else lo + 1
    return render.window(image, lo, hi), lo, hi


def nifti_gz(array: np.ndarray, affine: np.ndarray, *, cal: tuple[float, float] | None = None,
             intent: str | None = None, slope: float | None = None) -> bytes:
    """Gzipped NIfTI-1 bytes (sform and qform from ``affine``, mm units); deterministic."""
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    header = image.header
    header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if cal is not None:
        header["cal_min"], header["cal_max"] = cal
    if intent is not None:
        header.set_intent(intent)
    data = bytearray(image.to_bytes())
    if slope is not None:  # nibabel's writer drops a scaling the data does not need: set it in the bytes
        struct.pack_into(f"{header.endianness}ff", data, 112, slope, 0.0)  # scl_slope, scl_inter
    return gzip.compress(bytes(data), compresslevel=6, mtime=0)


def encoded_size(volumes: list[dict[str, Any]]) -> int:
    return sum(len(v["data"]) for v in volumes)


def viewer_volumes(labels: Volume, image: Volume | None, schema: LabelSchema,
                   thickness: dict[str, Volume] | None = None, *, target_mm: float = VIEWER_SPACING_MM,
                   max_bytes: int = MAX_VOLUME_BYTES) -> tuple[list[dict[str, Any]], tuple[int, int, int]]:
    """The viewer's volumes (name, role, base64 gzipped NIfTI) and the block factors used.

    The grid starts at ``target_mm`` in-plane and is coarsened (the finest axis first) until the
    encoded volumes fit ``max_bytes``. Without an image the background is a grey rendering of the
    labels, as in the key images.
    """
    if image is not None:
        image.require_same_grid(labels, "image and labels")
    maps = [v for v in (thickness or {}).values() if v.same_grid(labels)]
    thick = np.maximum.reduce([np.asarray(v.array, dtype=np.float32) for v in maps]) if maps else None
    grey = window_uint8(image.array)[0] if image is not None else render.label_rendering(labels.array, schema)
    label_dtype = np.uint8 if max(schema.ids) < 256 else np.uint16
    factors = block_factors(labels.spacing, target_mm)
    while True:  # the image dominates the size: only it is encoded until it fits
        volumes = [_encode_image(grey, labels.affine, factors)]
        coarser = _coarser(factors, labels)
        if encoded_size(volumes) <= max_bytes or coarser is None:
            volumes += _encode_labels(labels, thick, factors, label_dtype)
            if encoded_size(volumes) <= max_bytes or coarser is None:
                break
        factors = coarser
    if encoded_size(volumes) > max_bytes:
        log.warning("viewer volumes take %.1f MB (more than %.1f MB)", encoded_size(volumes) / 1e6, max_bytes / 1e6)
    return volumes, factors


def _coarser(factors: tuple[int, int, int], labels: Volume) -> tuple[int, int, int] | None:
    """``factors`` with the finest axis of the coarsened grid one block larger; None when none can grow."""
    spacing = [s * f if f < n else np.inf for s, f, n in zip(labels.spacing, factors, labels.shape)]
    if not np.isfinite(min(spacing)):
        return None
    axis = int(np.argmin(spacing))
    return tuple(f + 1 if a == axis else f for a, f in enumerate(factors))  # type: ignore[return-value]


def _b64(name: str, role: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "role": role, "data": base64.b64encode(data).decode("ascii")}


def _encode_image(grey: np.ndarray, affine: np.ndarray, factors: tuple[int, int, int]) -> dict[str, Any]:
    small = np.clip(np.rint(block_mean(grey, factors)), 0, 255).astype(np.uint8)
    return _b64("image.nii.gz", "image", nifti_gz(small, block_affine(affine, factors), cal=(0, 255)))


def _encode_labels(labels: Volume, thick: np.ndarray | None, factors: tuple[int, int, int],
                   label_dtype: type) -> list[dict[str, Any]]:
    affine = block_affine(labels.affine, factors)
    small_labels: np.ndarray = block_mode(np.asarray(labels.array), factors).astype(label_dtype)
    out = [_b64("labels.nii.gz", "labels", nifti_gz(small_labels, affine, intent="label"))]
    if thick is not None and float(thick.max()) > 0:
        small = block_max(thick, factors)
        slope = float(small.max()) / 255.0
        # Quantised so that any thickness above zero keeps a non-zero code (the map stays visible).
        codes = np.where(small > 0, np.clip(np.rint(small / slope), 1, 255), 0).astype(np.uint8)
        out.append(_b64("thickness.nii.gz", "thickness", nifti_gz(codes, affine, slope=slope)))
    return out


def label_table(schema: LabelSchema) -> dict[str, Any]:
    """NiiVue label lookup table (R, G, B, A, I, labels) with the report's colours and the schema's names,
    and the structures for the toggles (id, name, CSS colour)."""
    table: dict[str, list[Any]] = {"R": [0], "G": [0], "B": [0], "A": [0], "I": [schema.background], "labels": [""]}
    structures = []
    for s in schema.structures:
        rgb = render.colour_of(schema, s.id)
        for key, channel in zip("RGB", rgb):
            table[key].append(int(channel))
        table["A"].append(BONE_ALPHA if s.kind == "bone" else 255)
        table["I"].append(s.id)
        name = re.sub(r"\bbml\b", "BML", pretty(s.name))
        table["labels"].append(name)
        structures.append({"id": s.id, "name": name, "kind": s.kind, "colour": render.hex_colour(rgb)})
    return {"lut": table, "structures": structures}


# ---- the report's context --------------------------------------------------------------------------------

def focus_point(labels: Volume, lesions: list[Any] | None = None) -> list[float]:
    """Where the viewer opens (world mm): the largest lesion's centroid, else the centre of the labelled
    voxels' bounding box, else the centre of the grid."""
    found = [lesion for lesion in lesions or [] if getattr(lesion, "centroid_mm", None) is not None]
    if found:
        best = max(found, key=lambda lesion: lesion.volume_cm3 or 0.0)
        return [round(float(v), 2) for v in best.centroid_mm]
    nonzero = [np.flatnonzero(np.asarray(labels.array).any(axis=tuple(b for b in range(3) if b != a)))
               for a in range(3)]
    if all(n.size for n in nonzero):
        centre = np.array([(n[0] + n[-1]) / 2 for n in nonzero])
    else:
        centre = (np.array(labels.shape) - 1) / 2
    return [round(float(v), 2) for v in labels.world_coords(centre)]


def viewer_context(run: RunData, thickness_vmax: float | None = None,
                   lesions: list[Any] | None = None) -> dict[str, Any]:
    """What the report template needs for the viewer: ``available`` and either ``reason`` (shown as a
    note) or the library, the configuration (JSON) and the embedded volumes. ``lesions`` (the report's
    lesion list) picks where the viewer opens. Never raises."""
    try:
        if run.labels is None:
            raise ViewerUnavailable("no interactive viewer: this run has no label map")
        library = find_library()
        volumes, factors = viewer_volumes(run.labels, run.image, run.schema, run.thickness)
    except ViewerUnavailable as exc:
        return {"available": False, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - the viewer is an extra: the report is written without it
        log.warning("interactive viewer left out: %s: %s", exc.__class__.__name__, exc)
        return {"available": False, "reason": f"the interactive viewer could not be prepared "
                                               f"({exc.__class__.__name__})"}
    spacing = tuple(float(s) * f for s, f in zip(run.labels.spacing, factors))
    has_thickness = any(v["role"] == "thickness" for v in volumes)
    config = {
        "background": "image" if run.image is not None else "labels",
        "labels": label_table(run.schema),
        "thickness": {"vmax": float(thickness_vmax or 3.0), "colormap": "viridis"} if has_thickness else None,
        "opacity": 0.5,
        "focus_mm": focus_point(run.labels, lesions),
        "volumes": [{"name": v["name"], "role": v["role"]} for v in volumes],
        "spacing_mm": [round(s, 3) for s in spacing],
    }
    return {
        "available": True,
        "library": library,
        "config": config,
        "volumes": [{"name": v["name"], "role": v["role"], "data": v["data"]} for v in volumes],
        "spacing": " × ".join(f"{s:.2f}" for s in spacing),
        "source_spacing": " × ".join(f"{s:.2f}" for s in run.labels.spacing),
        "downsampled": factors != (1, 1, 1),
        "embedded_mb": (encoded_size(volumes) + len(library.payload)) / 1e6,
    }
