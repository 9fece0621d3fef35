"""Writes tiny synthetic DICOM MR series with pydicom, for loader tests (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_series(folder: Path, *, n_slices: int = 4, rows: int = 6, cols: int = 5, spacing=(0.5, 0.4),
                 slice_step: float = 1.5, series_uid: str = "1.2.826.0.1.3680043.8.498.1",
                 description: str = "Sag test", laterality: str | None = "R", seed: int = 0) -> np.ndarray:
    """Write a series into ``folder``; returns the pixel data as (slices, rows, cols)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 1000, (n_slices, rows, cols), dtype=np.uint16)
    # Sagittal, LPS: along a row (column index grows) towards -z (inferior), down a column (row index
    # grows) towards +y (posterior); slice normal row x col = +x, and slices step along +x.
    row_dir, col_dir = [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]
    for index in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{index + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{series_uid}_{index:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
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
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [10.0 + index * slice_step, -20.0, 30.0]
        ds.ImageOrientationPatient = row_dir + col_dir
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = slice_step
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels[index].tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return pixels
