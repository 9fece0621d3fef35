"""Pixel-level rendering for report figures: grey windows, label outlines, colour maps, PNG data URIs.

All functions are pure and deterministic (same arrays in, same bytes out). Colours follow the
Okabe-Ito palette, which stays distinguishable for colour-blind readers.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from bml_pipeline.labels import LabelSchema

# One colour per structure kind or plate; "lesion" covers every bone's BML.
PALETTE: dict[str, tuple[int, int, int]] = {
    "bone": (235, 235, 235),
    "femoral_cartilage": (86, 180, 233),    # sky blue
    "tibial_cartilage": (0, 158, 115),      # bluish green
    "patellar_cartilage": (204, 121, 167),  # reddish purple
    "cartilage": (86, 180, 233),
    "lesion": (230, 159, 0),                # orange
}
LABEL_GREY = {"bone": 105, "cartilage": 165, "lesion": 105, "other": 60}
BACKGROUND = (18, 18, 20)


def colour_of(schema: LabelSchema, label_id: int) -> tuple[int, int, int]:
    """Display colour of a label: its own entry in :data:`PALETTE`, else its kind's."""
    s = schema.by_id(label_id)
    return PALETTE.get(s.name) or PALETTE.get(s.kind, (200, 200, 200))


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def window(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Grey levels 0..255 (uint8) of ``image`` between ``lo`` and ``hi``."""
    scale = 255.0 / max(hi - lo, 1e-6)
    return np.clip((image.astype(np.float32) - lo) * scale, 0, 255).astype(np.uint8)


def label_rendering(labels2d: np.ndarray, schema: LabelSchema) -> np.ndarray:
    """A grey pseudo-image of a label slice (bone, cartilage and lesions as flat tones), uint8."""
    lut = np.full(max(schema.ids) + 1, BACKGROUND[0], dtype=np.uint8)
    for s in schema.structures:
        lut[s.id] = LABEL_GREY[s.kind]
    return lut[np.clip(labels2d, 0, len(lut) - 1)]


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Inner boundary band of ``mask``, ``width`` pixels wide."""
    from scipy import ndimage

    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def draw_outlines(rgb: np.ndarray, labels2d: np.ndarray, schema: LabelSchema, *, bones: bool = True,
                  width: int = 2) -> np.ndarray:
    """``rgb`` with the outlines of cartilage plates and lesions (and, if ``bones``, of each bone's full
    extent, half transparent) drawn in their palette colours. Returns a new array."""
    out = rgb.copy()
    if bones:
        for bone in schema.bones:
            edge = outline(np.isin(labels2d, schema.bone_ids(bone.name)), 1)
            out[edge] = (0.45 * out[edge] + 0.55 * np.array(PALETTE["bone"])).astype(np.uint8)
    for s in schema.of_kind("cartilage") + schema.of_kind("lesion"):
        edge = outline(labels2d == s.id, width)
        out[edge] = colour_of(schema, s.id)
    return out


def fill(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    """``rgb`` with ``mask`` blended towards ``colour`` by ``alpha`` (new array)."""
    out = rgb.copy()
    out[mask] = ((1 - alpha) * out[mask] + alpha * np.asarray(colour)).astype(np.uint8)
    return out


def colormap(values: np.ndarray, vmax: float, name: str = "viridis") -> np.ndarray:
    """RGB (uint8) of ``values`` / ``vmax`` through a matplotlib colour map (no figure is made)."""
    from matplotlib import colormaps

    lut = (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    index = np.clip(np.asarray(values, dtype=np.float64) / max(vmax, 1e-6) * 255, 0, 255).astype(np.intp)
    return lut[index]


def png_data_uri(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an RGB uint8 image (deterministic, no timestamps)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buffer, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
