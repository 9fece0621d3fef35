"""Readers: NIfTI via nibabel; DICOM series, MetaImage and NRRD via SimpleITK.

Every reader returns a validated :class:`~bml_pipeline.volume.Volume` in RAS+ mm, or raises
:class:`~bml_pipeline.errors.InputError` with a one-line message naming the file and the problem.
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from pathlib import Path

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.io.orientation import affine_from_itk
from bml_pipeline.volume import VolumeMeta

NIFTI_SUFFIXES = (".nii", ".nii.gz")
logger = logging.getLogger(__name__)

ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")

# DICOM tags read from the first slice of a series (SimpleITK keys "gggg|eeee").
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_ECHO_TIME = "0018|0081"
TAG_LATERALITY = "0020|0060"
TAG_IMAGE_LATERALITY = "0020|0062"
TAG_ACQUISITION_DATE = "0008|0022"
TAG_STUDY_DATE = "0008|0020"


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    """Array, RAS affine and metadata of a ``.nii``/``.nii.gz`` file (array in file order)."""
    import nibabel as nib

    _check_nifti_header_spacing(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for unreadable headers
        raise InputError(path, f"not a readable NIfTI file ({_short(exc)})") from None
    try:
        array = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(path, f"file is truncated or corrupt ({_short(exc)})") from None
    array = _squeeze_to_3d(array, path)
    return array, np.asarray(img.affine, dtype=np.float64), VolumeMeta(source=str(path))


def read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    """Array, RAS affine and metadata of a MetaImage/NRRD file via SimpleITK (array in x, y, z order)."""
    sitk = _quiet_sitk()

    _check_itk_header_spacing(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not a readable image ({_short(exc)})") from None
    return _from_sitk(image, path, VolumeMeta(source=str(path)))


def list_dicom_series(directory: Path) -> list[tuple[str, str]]:
    """(series instance UID, series description) of every DICOM series directly in ``directory``."""
    sitk = _quiet_sitk()

    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)) or ():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid)
        series.append((uid, _dicom_tag(files[0], TAG_SERIES_DESCRIPTION) or ""))
    return series


def read_dicom_series(directory: Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    """Array, RAS affine and metadata of one DICOM series in ``directory``.

    Args:
        directory: folder holding the series' files (not searched recursively).
        series_uid: which series to read when the folder holds several; required then.
    """
    import SimpleITK as sitk

    series = list_dicom_series(directory)
    if not series:
        raise InputError(directory, "directory contains no DICOM series")
    uids = [uid for uid, _ in series]
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{uid} ({desc or 'no description'})" for uid, desc in series)
            raise InputError(directory, f"directory holds {len(series)} DICOM series, choose one with --series: {listing}")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise InputError(directory, f"no DICOM series {series_uid!r} here (found: {', '.join(uids)})")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(directory, f"DICOM series could not be read ({_short(exc)})") from None
    first = files[0]
    echo = _dicom_tag(first, TAG_ECHO_TIME)
    laterality = (_dicom_tag(first, TAG_LATERALITY) or _dicom_tag(first, TAG_IMAGE_LATERALITY) or "").upper()
    meta = VolumeMeta(
        source=str(directory),
        series_description=_dicom_tag(first, TAG_SERIES_DESCRIPTION),
        echo_time_ms=float(echo) if echo and _is_number(echo) else None,
        laterality={"L": "left", "R": "right"}.get(laterality[:1]) if laterality else None,
        acquisition_date=_dicom_tag(first, TAG_ACQUISITION_DATE) or _dicom_tag(first, TAG_STUDY_DATE),
        extra={"series_uid": series_uid, "n_files": len(files)},
    )
    return _from_sitk(image, directory, meta)


def _from_sitk(image, path: Path, meta: VolumeMeta) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel")
    dim = image.GetDimension()
    if dim == 4:
        if image.GetSize()[3] != 1:
            raise InputError(path, f"4D image with {image.GetSize()[3]} frames; expected one 3D volume")
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0], sitk.ExtractImageFilterDirectionCollapseToSubmatrix)
    elif dim != 3:
        raise InputError(path, f"expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    spacing = image.GetSpacing()
    if any(s <= 0 for s in spacing):
        raise InputError(path, f"zero or negative voxel spacing {spacing}")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z) = ITK index order
    affine = affine_from_itk(spacing, image.GetDirection(), image.GetOrigin())
    return array, affine, meta


def _check_nifti_header_spacing(path: Path) -> None:
    """Refuse zero or negative pixdim before nibabel silently replaces them by their absolute value."""
    import nibabel as nib

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read(348)
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    except Exception as exc:  # unreadable: let nib.load produce the precise message
        logger.debug("raw NIfTI header check skipped for %s: %s", path, exc)
        return
    ndim = int(header["dim"][0])
    pixdim = [float(v) for v in header["pixdim"][1:min(ndim, 3) + 1]]
    if any(not np.isfinite(v) or v <= 0 for v in pixdim):
        raise InputError(path, f"zero or negative voxel spacing {tuple(pixdim)} in the header")


def _check_itk_header_spacing(path: Path) -> None:
    """Refuse zero or negative spacing in MetaImage/NRRD headers (ITK would flip or throw)."""
    keys = {"elementspacing": "=", "spacings": ":"}
    try:
        with open(path, "rb") as handle:
            head = handle.read(8192).decode("latin-1")
    except OSError:
        return
    for line in head.splitlines():
        for key, sep in keys.items():
            name, _, value = line.partition(sep)
            if name.strip().lower() == key and value.strip():
                try:
                    values = [float(v) for v in value.split()]
                except ValueError:
                    continue
                if any(not np.isfinite(v) or v <= 0 for v in values):
                    raise InputError(path, f"zero or negative voxel spacing {tuple(values)} in the header")


def _squeeze_to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim > 3:
        extra = array.shape[3:]
        if int(np.prod(extra)) != 1:
            raise InputError(path, f"{array.ndim}D image with shape {array.shape}; expected one 3D volume")
        array = array.reshape(array.shape[:3])
    if array.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got {array.ndim}D with shape {array.shape}")
    return array


def _dicom_tag(file: str, key: str) -> str | None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    if not reader.HasMetaDataKey(key):
        return None
    value = reader.GetMetaData(key).strip()
    return value or None


def _quiet_sitk():
    """SimpleITK with ITK's warnings silenced: they go to stderr, bypassing logging; we raise instead."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= 160 else text[:157] + "..."
