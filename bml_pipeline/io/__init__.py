"""Reading and writing volumes. ``read_volume(path)`` dispatches on the kind of file.

Supported: NIfTI (``.nii``, ``.nii.gz``), a DICOM series in a directory, MetaImage (``.mha``/``.mhd``)
and NRRD. Writers: NIfTI, atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.io.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from bml_pipeline.io.orientation import to_closest_canonical
from bml_pipeline.io.readers import (
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    list_dicom_series,
    read_dicom_series,
    read_itk_file,
    read_nifti,
)
from bml_pipeline.volume import Volume

__all__ = [
    "atomic_path",
    "list_dicom_series",
    "read_labels",
    "read_volume",
    "write_bytes_atomic",
    "write_nifti",
    "write_text_atomic",
]


def read_volume(path: str | Path, *, series_uid: str | None = None, canonical: bool = True,
                laterality: str | None = None) -> Volume:
    """Read an image volume from a file or DICOM directory.

    Args:
        path: ``.nii``/``.nii.gz``/``.mha``/``.mhd``/``.nrrd`` file or a directory with one DICOM series.
        series_uid: the series to read from a directory that holds several.
        canonical: reorient to the closest RAS axis order (a permutation/flip, no resampling).
        laterality: ``"left"``/``"right"`` to set the side when the file does not say it.

    Raises:
        InputError: missing, empty, corrupt or truncated files (a ``.nii.gz`` is read to its end, so a
            gzip CRC32/length mismatch is caught), headers claiming more voxel data than the file holds
            or than :data:`~bml_pipeline.io.readers.MAX_VOXELS`/``MAX_BYTES`` allow (checked before
            anything is allocated), wrong dimensionality, NaN/Inf voxels, zero or negative spacing, a
            degenerate affine (NaN/Inf entries, a zero column, singular, or spacing outside 0.01-50 mm),
            folders without DICOM or with several series, and DICOM series that are not one evenly
            spaced stack of at least 2 equal slices (duplicated, missing or unevenly spaced slices;
            orientation, rows/columns or pixel spacing differing between slices).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        array, affine, meta = read_dicom_series(path, series_uid)
    else:
        if path.stat().st_size == 0:
            raise InputError(path, "file is empty")
        name = path.name.lower()
        if name.endswith(NIFTI_SUFFIXES):
            array, affine, meta = read_nifti(path)
        elif name.endswith(ITK_SUFFIXES):
            array, affine, meta = read_itk_file(path)
        elif name.endswith(".dcm"):
            array, affine, meta = read_dicom_series(path.parent, series_uid)
        else:
            raise InputError(path, "unsupported file type (expected .nii, .nii.gz, .mha, .mhd, .nrrd or a DICOM directory)")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError(path, "volume contains NaN or Inf voxels")
    if array.dtype.kind not in "biuf":
        raise InputError(path, f"unsupported voxel type {array.dtype}")
    if laterality is not None:
        from dataclasses import replace

        meta = replace(meta, laterality=laterality)
    if canonical:
        array, affine = to_closest_canonical(array, affine)
    return Volume(array, affine, meta)


def read_labels(path: str | Path, schema=None, *, canonical: bool = True) -> Volume:
    """Read a label map: integer values (float files must hold whole numbers), checked against ``schema``
    (a :class:`~bml_pipeline.labels.LabelSchema`) when given. Returned array dtype is uint16 or int32."""
    volume = read_volume(path, canonical=canonical)
    array = volume.array
    if array.dtype.kind == "f" and np.any(array != np.round(array)):
        raise InputError(path, "label map contains non-integer values")
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise InputError(path, f"label values out of range [{array.min()}, {array.max()}]")
    array = np.asarray(array, dtype=np.uint16)
    if schema is not None:
        schema.check_values(array, path)
    return volume.with_array(array)


def write_nifti(volume: Volume, path: str | Path, dtype: np.dtype | type | None = None) -> Path:
    """Write ``volume`` as NIfTI (sform and qform set from its affine), atomically. Returns the path."""
    import nibabel as nib

    path = Path(path)
    array = np.asarray(volume.array if dtype is None else volume.array.astype(dtype))
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = nib.Nifti1Image(array, volume.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return path
