"""Colour tables beside label maps, and label maps written with the NIfTI "label" intent.

``write_colour_tables(labels.nii.gz, schema)`` writes, next to the label map,

- ``labels.ctbl``: a 3D Slicer colour table (discrete, ``# Color table file`` header, one line
  ``id name R G B A`` per label, 0-255 integers, names without spaces);
- ``labels_itksnap.txt``: an ITK-SNAP label description file (columns ``IDX R G B A VIS MSH "LABEL"``,
  alpha 0-1, index 0 "Clear Label").

Colours are defined once, here (:data:`STRUCTURE_COLOURS`): bones light, cartilage saturated, lesions
red. The DICOM Segmentation export (:mod:`bml_pipeline.export.dicom`) uses the same colours.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bml_pipeline.io import atomic_path, write_text_atomic
from bml_pipeline.labels import LabelSchema, Structure
from bml_pipeline.volume import Volume

RGB = tuple[int, int, int]

STRUCTURE_COLOURS: dict[str, RGB] = {
    # bones: light, desaturated
    "femur": (241, 214, 145),  # light ochre (Slicer's "bone")
    "tibia": (205, 222, 240),  # light blue-grey
    "patella": (226, 206, 236),  # light lavender
    # cartilage plates: saturated
    "femoral_cartilage": (0, 145, 230),  # blue
    "tibial_cartilage": (0, 190, 80),  # green
    "patellar_cartilage": (150, 40, 220),  # violet
    # bone marrow lesions: reds
    "femoral_bml": (230, 20, 20),  # red
    "tibial_bml": (255, 90, 40),  # orange-red
    "patellar_bml": (200, 0, 110),  # crimson-magenta
}
"""RGB (0-255) of every structure of the ``oai_zib`` schema, by structure name."""

KIND_FALLBACK_COLOURS: dict[str, tuple[RGB, ...]] = {
    "bone": ((235, 225, 200), (215, 215, 200), (200, 215, 225)),
    "cartilage": ((0, 200, 200), (255, 200, 0), (60, 90, 255)),
    "lesion": ((255, 0, 0), (255, 60, 120), (170, 0, 0)),
    "other": ((128, 174, 128), (177, 122, 101), (111, 184, 210)),
}
"""Colours for structures of other schemas that :data:`STRUCTURE_COLOURS` does not name (cycled per kind)."""

LABEL_OPACITY = 255
"""Alpha of every structure in the Slicer table (0-255); ITK-SNAP gets it as 0-1."""

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")


def structure_colours(schema: LabelSchema) -> dict[int, RGB]:
    """RGB colour of every structure of ``schema``, by label id (background excluded)."""
    used: dict[str, int] = {}
    colours: dict[int, RGB] = {}
    for s in schema.structures:
        if s.name in STRUCTURE_COLOURS:
            colours[s.id] = STRUCTURE_COLOURS[s.name]
            continue
        palette = KIND_FALLBACK_COLOURS[s.kind]
        colours[s.id] = palette[used.get(s.kind, 0) % len(palette)]
        used[s.kind] = used.get(s.kind, 0) + 1
    return colours


def label_stem(label_path: str | Path) -> Path:
    """``label_path`` without its image suffix (``labels.nii.gz`` -> ``labels``), in the same folder."""
    path = Path(label_path)
    name = path.name
    for suffix in sorted(LABEL_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path.with_name(path.stem)


def slicer_colour_table(schema: LabelSchema, title: str = "") -> str:
    """Text of a 3D Slicer discrete colour table (``.ctbl``) for ``schema``."""
    colours = structure_colours(schema)
    rows = [(schema.background, "Background", (0, 0, 0), 0)]
    rows += [(s.id, _slicer_name(s), colours[s.id], LABEL_OPACITY) for s in sorted(schema.structures, key=_id)]
    lines = [
        f"# Color table file {title or schema.name}",
        f"# {len(rows)} values",
        f"# bml-pipeline label schema {schema.name}: index name R G B A (0-255)",
    ]
    lines += [f"{i} {name} {r} {g} {b} {a}" for i, name, (r, g, b), a in rows]
    return "\n".join(lines) + "\n"


def itksnap_label_description(schema: LabelSchema) -> str:
    """Text of an ITK-SNAP label description file for ``schema`` (Segmentation > Import Label Descriptions)."""
    colours = structure_colours(schema)
    header = [
        "################################################",
        "# ITK-SnAP Label Description File",
        f"# bml-pipeline label schema {schema.name}",
        "# File format: ",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields: ",
        "#    IDX:   Zero-based index ",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description ",
        "################################################",
    ]
    rows = [_itksnap_row(0, (0, 0, 0), 0.0, 0, "Clear Label")]
    alpha = LABEL_OPACITY / 255.0
    rows += [_itksnap_row(s.id, colours[s.id], alpha, 1, _itksnap_name(s)) for s in sorted(schema.structures, key=_id)]
    return "\n".join(header + rows) + "\n"


def write_colour_tables(label_path: str | Path, schema: LabelSchema) -> list[Path]:
    """Write ``<stem>.ctbl`` (3D Slicer) and ``<stem>_itksnap.txt`` (ITK-SNAP) beside ``label_path``.

    ``<stem>`` is the label map's name without its image suffix (``labels.nii.gz`` -> ``labels``). The
    label map itself need not exist yet. Files are written atomically. Returns both paths.
    """
    stem = label_stem(label_path)
    ctbl = stem.with_name(stem.name + ".ctbl")
    itksnap = stem.with_name(stem.name + "_itksnap.txt")
    write_text_atomic(ctbl, slicer_colour_table(schema, stem.name))
    write_text_atomic(itksnap, itksnap_label_description(schema))
    return [ctbl, itksnap]


NIFTI_INTENT_LABEL = 1002
"""NIfTI intent code of a label map (``NIFTI_INTENT_LABEL``; nibabel's ``'label'``)."""


def write_label_nifti(labels: Volume, path: str | Path, *, dtype: np.dtype | type = np.uint16,
                      intent_name: str = "") -> Path:
    """Write a label map as NIfTI with intent ``NIFTI_INTENT_LABEL`` (1002), atomically; returns the path.

    Same geometry as :func:`bml_pipeline.io.write_nifti` (sform and qform from the affine, code 1,
    units mm); only the intent (and ``intent_name``, at most 15 characters, e.g. the schema name) is added,
    so viewers that honour it (3D Slicer, FSLeyes, ITK-SNAP via ITK) treat the volume as labels.
    """
    import nibabel as nib

    path = Path(path)
    array = np.asarray(labels.array)
    if array.dtype.kind == "f" and np.any(array != np.round(array)):
        raise ValueError("label map holds non-integer values")
    array = array.astype(dtype)
    image = nib.Nifti1Image(array, labels.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(labels.affine, code=1)
    image.set_sform(labels.affine, code=1)
    image.header.set_intent("label", (), name=intent_name[:15])
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path


def _id(s: Structure) -> int:
    return s.id


def _slicer_name(s: Structure) -> str:
    """Slicer names are whitespace-separated fields: spaces become underscores."""
    return re.sub(r"\s+", "_", s.name.strip()) or f"label_{s.id}"


def _itksnap_name(s: Structure) -> str:
    return s.name.replace('"', "'")


def _itksnap_row(index: int, rgb: RGB, alpha: float, visible: int, name: str) -> str:
    r, g, b = rgb
    return f"{index:5d} {r:5d} {g:4d} {b:4d} {alpha:8.2f} {visible:2d} {visible:2d}    \"{name}\""
