"""Exports for viewers and PACS: colour tables beside label maps (3D Slicer, ITK-SNAP), label maps with the
NIfTI label intent, and, for DICOM input, a DICOM Segmentation and a TID 1500 Structured Report.

The DICOM writers need the optional ``highdicom`` package (``pip install "bml-pipeline[dicom]"``); it is
imported only when they are called. See ``docs/export.md``.
"""

from __future__ import annotations

from bml_pipeline.export.colour_table import (
    NIFTI_INTENT_LABEL,
    STRUCTURE_COLOURS,
    structure_colours,
    write_colour_tables,
    write_label_nifti,
)
from bml_pipeline.export.dicom import dicom_export_available, write_dicom_seg, write_dicom_sr

__all__ = [
    "NIFTI_INTENT_LABEL",
    "STRUCTURE_COLOURS",
    "dicom_export_available",
    "structure_colours",
    "write_colour_tables",
    "write_dicom_seg",
    "write_dicom_sr",
    "write_label_nifti",
]
