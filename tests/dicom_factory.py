"""Writes tiny synthetic DICOM MR series with pydicom, for loader tests (no real data needed).

Besides well-formed series it can write broken ones (duplicated, missing or unevenly spaced slices,
slices whose orientation, pixel spacing or size differ) to test that the reader refuses them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Sagittal, LPS: along a row (column index grows) towards -z (inferior), down a column (row index
# grows) towards +y (posterior); slice normal row x col = +x, and slices step along +x.
SAGITTAL_ORIENTATION = (0.0, 0.0, -1.0, 0.0, 1.0, 0.0)


def write_series(folder: Path, *, n_slices: int = 4, rows: int = 6, cols: int = 5, spacing=(0.5, 0.4),
                 slice_step: float = 1.5, series_uid: str = "1.2.826.0.1.3680043.8.498.1",
                 description: str = "Sag test", laterality: str | None = "R", seed: int = 0,
                 positions: Sequence[float] | None = None, duplicate: int | None = None,
                 missing: int | None = None, orientation_of: Mapping[int, Sequence[float]] | None = None,
                 spacing_of: Mapping[int, Sequence[float]] | None = None,
                 shape_of: Mapping[int, tuple[int, int]] | None = None) -> np.ndarray:
    """Write a series into ``folder``; returns the pixel data as (slices, rows, cols).

    Slice ``index`` sits ``positions[index]`` mm (default ``index * slice_step``) along the slice normal
    from (10, -20, 30) mm LPS. Options that break the series (all default off):

    - ``positions``: explicit offsets along the normal, one per slice (sets ``n_slices``);
    - ``duplicate``: write slice ``duplicate`` a second time (new instance UID, same position);
    - ``missing``: do not write slice ``missing`` (its neighbours keep their positions);
    - ``orientation_of`` / ``spacing_of`` / ``shape_of``: per-slice ImageOrientationPatient (6 cosines),
      PixelSpacing (row, column) or (rows, columns) that replace the series' values for that slice.

    The returned array holds every nominal slice, including a ``missing`` one; slices resized with
    ``shape_of`` get their own random pixels, which are not in it.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    offsets = [index * slice_step for index in range(n_slices)] if positions is None else list(positions)
    n_slices = len(offsets)
    orientation_of, spacing_of, shape_of = orientation_of or {}, spacing_of or {}, shape_of or {}
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 1000, (n_slices, rows, cols), dtype=np.uint16)
    writes = [(index, index) for index in range(n_slices) if index != missing]
    if duplicate is not None:
        writes.append((duplicate, n_slices))  # (slice index, file/instance number)
    for index, number in writes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{number + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{series_uid}_{number:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.100"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.200"
        ds.Modality = "MR"
        ds.SeriesDescription = description
        ds.EchoTime = "7.5"
        ds.StudyDate = "20260101"
        if laterality:
            ds.Laterality = laterality
        ds.InstanceNumber = number + 1
        ds.ImagePositionPatient = [10.0 + offsets[index], -20.0, 30.0]
        ds.ImageOrientationPatient = [float(v) for v in orientation_of.get(index, SAGITTAL_ORIENTATION)]
        ds.PixelSpacing = [float(v) for v in spacing_of.get(index, spacing)]
        ds.SliceThickness = slice_step
        slice_rows, slice_cols = shape_of.get(index, (rows, cols))
        ds.Rows, ds.Columns = slice_rows, slice_cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if (slice_rows, slice_cols) == (rows, cols):
            ds.PixelData = pixels[index].tobytes()
        else:
            ds.PixelData = rng.integers(0, 1000, (slice_rows, slice_cols), dtype=np.uint16).tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return pixels
