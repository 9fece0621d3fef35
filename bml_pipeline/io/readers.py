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

# Limits checked against a file's header before any voxel data is read or allocated. A knee MRI is
# well under 10**8 voxels and 1 GiB; a header claiming more than this is refused as corrupt.
MAX_VOXELS = 2**31
"""Most voxels (times components per voxel) a header may claim."""
MAX_BYTES = 4 * 2**30
"""Most bytes of voxel data (4 GiB) a header may claim."""

# Sanity range for the voxel spacing (affine column norms), in mm, checked on every load.
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 50.0
SINGULAR_RTOL = 1e-6
"""The affine's 3x3 part is singular when |det| <= SINGULAR_RTOL * product of its column norms."""

# DICOM series geometry tolerances.
SLICE_STEP_RTOL, SLICE_STEP_ATOL_MM = 0.01, 0.01
"""Slice steps are uniform when each is within max(1 % of the median step, 0.01 mm) of the median."""
ORIENTATION_ATOL = 1e-3
"""Largest difference between two slices' direction cosines still counted as the same orientation."""
PIXEL_SPACING_RTOL = 1e-3
"""Largest relative difference between two slices' pixel spacings still counted as equal."""
SHEAR_FRACTION = 0.1
"""Largest in-plane drift of slice positions off the slice normal, as a fraction of the pixel spacing."""

_GZIP_CHUNK = 1 << 20

# DICOM tags read from the first slice of a series (SimpleITK keys "gggg|eeee").
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_ECHO_TIME = "0018|0081"
TAG_LATERALITY = "0020|0060"
TAG_IMAGE_LATERALITY = "0020|0062"
TAG_ACQUISITION_DATE = "0008|0022"
TAG_STUDY_DATE = "0008|0020"
TAG_POSITION = "0020|0032"
TAG_ORIENTATION = "0020|0037"
TAG_ROWS = "0028|0010"
TAG_COLUMNS = "0028|0011"
TAG_PIXEL_SPACING = "0028|0030"
TAG_NUMBER_OF_FRAMES = "0028|0008"


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    """Array, RAS affine and metadata of a ``.nii``/``.nii.gz`` file (array in file order).

    The header is checked before any voxel data is read: spacing, claimed size against
    :data:`MAX_VOXELS`/:data:`MAX_BYTES` and against the data actually present. A ``.nii.gz`` is
    decompressed whole, so its gzip CRC32 and length are verified. The affine is checked from the header
    before the data is read, and again once loaded (:func:`check_affine`).
    """
    import nibabel as nib

    compressed = path.name.lower().endswith(".gz")
    header, image_class = _read_nifti_header(path, compressed)
    _check_nifti_header_spacing(path, header)
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = max(int(header.get_data_offset()), int(header.sizeof_hdr))
    except Exception as exc:  # noqa: BLE001 - unknown datatype code, nonsense dims
        raise InputError(path, f"not a readable NIfTI file ({_short(exc)})") from None
    nbytes = _check_claimed_size(path, shape, dtype.itemsize, f"{dtype} voxels")
    needed = offset + nbytes
    try:
        header_affine = header.get_best_affine()
    except Exception:  # noqa: BLE001 - e.g. a bad qfac nibabel fixes on load; the loaded affine is checked below
        header_affine = None
    if header_affine is not None:
        check_affine(header_affine, path)
    try:
        if compressed:
            img = image_class.from_stream(_read_gzip_verified(path, needed, _describe(shape, dtype, nbytes)))
        else:
            size = path.stat().st_size
            if size < needed:
                raise InputError(path, f"file is truncated or corrupt: header describes {_describe(shape, dtype, nbytes)}"
                                       f" from byte {offset}, but the file holds only {size} bytes")
            img = nib.load(str(path))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for unreadable headers
        raise InputError(path, f"not a readable NIfTI file ({_short(exc)})") from None
    try:
        array = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(path, f"file is truncated or corrupt ({_short(exc)})") from None
    array = _squeeze_to_3d(array, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, path)
    return array, affine, VolumeMeta(source=str(path))


def read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray, VolumeMeta]:
    """Array, RAS affine and metadata of a MetaImage/NRRD file via SimpleITK (array in x, y, z order).

    The header is read first (``ReadImageInformation``): the claimed size is checked against
    :data:`MAX_VOXELS`/:data:`MAX_BYTES` and, for uncompressed data, against the bytes present.
    """
    sitk = _quiet_sitk()

    _check_itk_header_spacing(path)
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    try:
        info.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"not a readable image ({_short(exc)})") from None
    shape = tuple(int(n) for n in info.GetSize())
    components = max(int(info.GetNumberOfComponents()), 1)
    itemsize = _sitk_pixel_bytes(info.GetPixelID()) * components
    pixel = sitk.GetPixelIDValueAsString(info.GetPixelID())
    nbytes = _check_claimed_size(path, shape, itemsize, f"{pixel} voxels")
    _check_itk_data_size(path, nbytes, f"{'x'.join(map(str, shape))} {pixel} voxels ({nbytes} bytes)")
    if info.GetDimension() == 3:  # geometry from the header, before the data is read (4D: checked after)
        check_affine(affine_from_itk(info.GetSpacing(), info.GetDirection(), info.GetOrigin()), path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not a readable image ({_short(exc)})") from None
    return _from_sitk(image, path, VolumeMeta(source=str(path)))


def list_dicom_series(directory: Path) -> list[tuple[str, str]]:
    """(series instance UID, what tells it apart) of every DICOM series directly in ``directory``: its
    description, echo time and number of files (two echoes of one acquisition share a description)."""
    sitk = _quiet_sitk()

    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)) or ():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), uid)
        parts = [_dicom_tag(files[0], TAG_SERIES_DESCRIPTION) or "no description"]
        echo = _dicom_tag(files[0], TAG_ECHO_TIME)
        if echo:
            parts.append(f"TE {echo} ms")
        parts.append(f"{len(files)} files")
        series.append((uid, ", ".join(parts)))
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
            listing = "; ".join(f"{uid} ({desc})" for uid, desc in series)
            raise InputError(directory, f"directory holds {len(series)} DICOM series, choose one with --series: {listing}")
        series_uid = uids[0]
    elif series_uid not in uids:
        raise InputError(directory, f"no DICOM series {series_uid!r} here (found: {', '.join(uids)})")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series_uid))
    files = _check_dicom_geometry(directory, files)
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


def check_affine(affine: np.ndarray, path: Path | str | None) -> None:
    """Refuse an affine that cannot describe a real scan: non-finite entries, a zero column, a singular
    3x3 part, or a voxel spacing (column norm) outside MIN_SPACING_MM-MAX_SPACING_MM.

    Raises:
        InputError: naming ``path`` and the problem.
    """
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise InputError(path, f"affine must be 4x4, got shape {aff.shape}")
    if not np.all(np.isfinite(aff)):
        raise InputError(path, "affine has NaN or infinite entries")
    linear = aff[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    for axis, norm in enumerate(norms):
        if norm == 0:
            raise InputError(path, f"affine is singular (zero column {axis}: voxel axis {'ijk'[axis]} has no extent)")
    for axis, norm in enumerate(norms):
        if not MIN_SPACING_MM <= norm <= MAX_SPACING_MM:
            raise InputError(path, f"voxel spacing {norm:.6g} mm along axis {'ijk'[axis]} is outside "
                                   f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm")
    det = abs(float(np.linalg.det(linear)))
    if det <= SINGULAR_RTOL * float(np.prod(norms)):
        raise InputError(path, f"affine is singular (voxel axes are parallel or nearly so: |det| {det:.3g} mm3 for "
                               f"spacing {'x'.join(f'{n:.4g}' for n in norms)} mm)")


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
    check_affine(affine, path)
    return array, affine, meta


def _read_nifti_header(path: Path, compressed: bool):
    """(header, image class) of a NIfTI-1 or NIfTI-2 file, parsed raw (nibabel's fixes not applied)."""
    import nibabel as nib

    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            raw = handle.read(540)
    except gzip.BadGzipFile as exc:
        raise InputError(path, f"not a readable NIfTI file ({_short(exc)})") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(path, f"file is truncated or corrupt ({_short(exc)})") from None
    sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")} if len(raw) >= 4 else set()
    if 348 in sizes:
        header_class, image_class, size = nib.Nifti1Header, nib.Nifti1Image, 348
    elif 540 in sizes:
        header_class, image_class, size = nib.Nifti2Header, nib.Nifti2Image, 540
    else:
        raise InputError(path, "not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header at the start)")
    if len(raw) < size:
        raise InputError(path, f"file is truncated or corrupt: {len(raw)} bytes, shorter than a {size}-byte NIfTI header")
    try:
        header = header_class.from_fileobj(io.BytesIO(raw[:size]), check=False)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad headers
        raise InputError(path, f"not a readable NIfTI file ({_short(exc)})") from None
    return header, image_class


def _check_nifti_header_spacing(path: Path, header) -> None:
    """Refuse zero or negative pixdim before nibabel silently replaces them by their absolute value."""
    ndim = int(header["dim"][0])
    pixdim = [float(v) for v in header["pixdim"][1:min(ndim, 3) + 1]]
    if any(not np.isfinite(v) or v <= 0 for v in pixdim):
        raise InputError(path, f"zero or negative voxel spacing {tuple(pixdim)} in the header")


def _check_claimed_size(path: Path | str, shape: tuple[int, ...], itemsize: int, what: str) -> int:
    """Bytes of voxel data a header claims; refuses nonsense shapes and sizes over the limits."""
    if any(n < 0 for n in shape):
        raise InputError(path, f"header claims a negative image size {'x'.join(map(str, shape))}")
    voxels = int(np.prod(shape, dtype=object)) if shape else 1
    nbytes = voxels * int(itemsize)
    if voxels > MAX_VOXELS or nbytes > MAX_BYTES:
        raise InputError(path, f"header claims {'x'.join(map(str, shape))} {what} ({_gib(nbytes)}), over the limit "
                               f"({MAX_VOXELS} voxels, {_gib(MAX_BYTES)}); the file is corrupt or not a knee MRI")
    return nbytes


def _read_gzip_verified(path: Path, needed: int, describe: str) -> io.BytesIO:
    """The decompressed bytes of a gzip file, read to the end so that CRC32 and length are verified.

    Keeps at most ``needed`` bytes (the header, extensions and voxel data); anything beyond is read,
    checked and dropped. Raises InputError when the stream is corrupt or shorter than ``needed``.
    """
    out = io.BytesIO()
    kept = extra = 0
    try:
        with gzip.open(path, "rb") as handle:
            while kept < needed:
                chunk = handle.read(min(_GZIP_CHUNK, needed - kept))
                if not chunk:
                    break
                out.write(chunk)
                kept += len(chunk)
            while chunk := handle.read(_GZIP_CHUNK):  # to the end: gzip checks CRC32 and ISIZE there
                extra += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(path, f"file is truncated or corrupt (gzip stream: {_short(exc)})") from None
    if kept < needed:
        raise InputError(path, f"file is truncated or corrupt: header describes {describe} but the "
                               f"decompressed file holds only {kept} bytes, {needed} needed")
    if extra:
        logger.warning("%s: %d bytes after the voxel data the header describes were ignored", path, extra)
    out.seek(0)
    return out


def _describe(shape: tuple[int, ...], dtype, nbytes: int) -> str:
    return f"{'x'.join(map(str, shape))} {dtype} voxels ({nbytes} bytes)"


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


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


def _sitk_pixel_bytes(pixel_id: int) -> int:
    """Bytes per component of a SimpleITK pixel type (8, the largest common one, when unknown)."""
    import SimpleITK as sitk

    sizes = {"Int8": 1, "UInt8": 1, "Int16": 2, "UInt16": 2, "Int32": 4, "UInt32": 4, "Int64": 8, "UInt64": 8,
             "Float32": 4, "Float64": 8, "LabelUInt8": 1, "LabelUInt16": 2, "LabelUInt32": 4, "LabelUInt64": 8,
             "ComplexFloat32": 8, "ComplexFloat64": 16}
    for name, size in sizes.items():
        for prefix in ("sitk", "sitkVector"):
            if getattr(sitk, prefix + name, None) == pixel_id:
                return size
    return 8


def _check_itk_data_size(path: Path, nbytes: int, describe: str) -> None:
    """Refuse an uncompressed MetaImage/NRRD whose data (attached or in a detached file) is shorter than
    its header claims; ITK would allocate the whole image first and fail with a message on stdout."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
    except OSError:
        return
    if path.name.lower().endswith((".nrrd", ".nhdr")):
        found = _nrrd_data_location(path, head)
    else:
        found = _metaimage_data_location(path, head)
    if found is None:  # compressed, a file list, a pattern, or a layout not worth guessing: ITK checks it
        return
    data_file, start = found
    if not data_file.is_file():
        raise InputError(path, f"data file {data_file.name} named in the header does not exist")
    available = data_file.stat().st_size - start
    if available < nbytes:
        where = "the file" if data_file == path else f"data file {data_file.name}"
        raise InputError(path, f"file is truncated or corrupt: header describes {describe} but {where} holds only "
                               f"{max(available, 0)} bytes of voxel data")


def _metaimage_data_location(path: Path, head: bytes) -> tuple[Path, int] | None:
    fields: dict[str, str] = {}
    position = 0
    for line in head.splitlines(keepends=True):
        position += len(line)
        name, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            continue
        key, value = name.strip().lower(), value.strip()
        fields[key] = value
        if key == "elementdatafile":
            break
    else:
        return None
    if fields.get("compresseddata", "false").lower() in ("true", "1") or fields.get("headersize", "0") not in ("0", ""):
        return None
    name = fields["elementdatafile"]
    if name.upper() == "LOCAL":
        return path, position
    if name.upper().startswith("LIST") or "%" in name or " " in name:
        return None
    data_file = Path(name)
    return (data_file if data_file.is_absolute() else path.parent / data_file), 0


def _nrrd_data_location(path: Path, head: bytes) -> tuple[Path, int] | None:
    if not head.startswith(b"NRRD"):
        return None
    fields: dict[str, str] = {}
    position = 0
    lines = head.splitlines(keepends=True)
    for line in lines[1:]:
        position += len(line)
        text = line.decode("latin-1").strip()
        if not text:
            break
        if text.startswith("#"):
            continue
        name, sep, value = text.partition(":")
        if sep:
            fields[name.strip().lower()] = value.lstrip("=").strip()
    else:
        return None
    position += len(lines[0])
    if fields.get("encoding", "").lower() != "raw" or fields.get("line skip", fields.get("lineskip", "0")) != "0":
        return None
    skip = fields.get("byte skip", fields.get("byteskip", "0"))
    if not skip.isdigit():
        return None
    detached = fields.get("data file", fields.get("datafile"))
    if detached is None:
        return None if path.name.lower().endswith(".nhdr") else (path, position + int(skip))
    if detached.upper().startswith("LIST") or " " in detached or "%" in detached:
        return None
    data_file = Path(detached)
    return (data_file if data_file.is_absolute() else path.parent / data_file), int(skip)


def _check_dicom_geometry(directory: Path, files: list[str]) -> list[str]:
    """Refuse a DICOM series that is not one evenly spaced stack of equal slices; return its files in
    stacking order.

    Every slice's ImagePositionPatient is projected on the slice normal (row x column direction
    cosines). Refused: fewer than 2 slices, slices missing position/orientation, slices that differ in
    rows/columns, pixel spacing or orientation, two slices at the same position, gaps (missing
    slices), uneven spacing, and slices not stacked along the normal. A series of multi-frame files is
    left to ITK.
    """
    if len(files) < 2:
        frames = _dicom_tag(files[0], TAG_NUMBER_OF_FRAMES) if files else None
        if frames and _is_number(frames) and float(frames) > 1:
            return files
        raise InputError(directory, f"a single DICOM slice is not a volume (the series has {len(files)} file"
                                    f"{'' if len(files) == 1 else 's'}{': ' + Path(files[0]).name if files else ''})")
    slices = [_dicom_slice_geometry(directory, file) for file in files]
    if any(s["frames"] > 1 for s in slices):
        return files
    first = slices[0]
    for other in slices[1:]:
        if other["size"] != first["size"]:
            raise InputError(directory, f"slices differ in size: {first['name']} is {_x(first['size'])} pixels, "
                                        f"{other['name']} is {_x(other['size'])}")
        if not np.allclose(other["spacing"], first["spacing"], rtol=PIXEL_SPACING_RTOL, atol=1e-6):
            raise InputError(directory, f"pixel spacing differs between slices: {first['name']} has "
                                        f"{_x(first['spacing'])} mm, {other['name']} has {_x(other['spacing'])} mm")
        if not np.allclose(other["orientation"], first["orientation"], rtol=0, atol=ORIENTATION_ATOL):
            raise InputError(directory, f"slice orientation differs between slices: {first['name']} has "
                                        f"{_cosines(first['orientation'])}, {other['name']} has "
                                        f"{_cosines(other['orientation'])}")
    row, col = first["orientation"][:3], first["orientation"][3:]
    normal = np.cross(row, col)
    positions = np.array([s["position"] for s in slices])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    depth_sorted = depth[order]
    names = [slices[i]["name"] for i in order]
    steps = np.diff(depth_sorted)
    median = float(np.median(steps))
    tol = max(SLICE_STEP_RTOL * median, SLICE_STEP_ATOL_MM)
    for k, step in enumerate(steps):
        if step <= tol:
            raise InputError(directory, f"duplicate slice: {names[k]} and {names[k + 1]} are both at position "
                                        f"{depth_sorted[k]:.4g} mm along the slice normal")
    for k, step in enumerate(steps):
        if abs(step - median) <= tol:
            continue
        lo, hi = depth_sorted[k], depth_sorted[k + 1]
        between = f"between positions {lo:.4g} and {hi:.4g} mm along the slice normal ({names[k]}, {names[k + 1]})"
        multiple = round(step / median)
        if multiple >= 2 and abs(step - multiple * median) <= tol * multiple:
            count = "slice" if multiple == 2 else f"{multiple - 1} slices"
            raise InputError(directory, f"missing {count} {between}: gap of {step:.4g} mm, slice spacing "
                                        f"{median:.4g} mm")
        raise InputError(directory, f"slice spacing is not uniform: {step:.4g} mm {between}, "
                                    f"{median:.4g} mm (median) elsewhere")
    # Positions must lie on one line along the normal; ITK would take the in-plane drift as spacing.
    offsets = positions - positions[order[0]]
    drift = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    limit = max(SHEAR_FRACTION * min(first["spacing"]), SLICE_STEP_ATOL_MM)
    worst = int(np.argmax(drift))
    if drift[worst] > limit:
        raise InputError(directory, f"slices are not stacked along the slice normal: {slices[worst]['name']} is "
                                    f"{drift[worst]:.3g} mm off it in-plane (tilted or mixed stacks)")
    if np.all(np.diff(depth) > 0) or np.all(np.diff(depth) < 0):
        return files  # GDCM's order, already a monotonic stack
    return [files[i] for i in order]


def _dicom_slice_geometry(directory: Path, file: str) -> dict:
    """Position, orientation, size and pixel spacing of one DICOM file (header only)."""
    import SimpleITK as sitk

    name = Path(file).name
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(directory, f"DICOM file {name} could not be read ({_short(exc)})") from None

    def numbers(key: str, label: str, count: int) -> list[float]:
        text = reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""
        if not text:
            raise InputError(directory, f"DICOM file {name} has no {label}; its place in the volume is unknown")
        try:
            values = [float(v) for v in text.replace("\x00", "").split("\\")]
        except ValueError:
            values = []
        if len(values) != count or not all(np.isfinite(values)):
            raise InputError(directory, f"DICOM file {name} has an unreadable {label} {text!r}")
        return values

    orientation = np.array(numbers(TAG_ORIENTATION, "ImageOrientationPatient", 6))
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(row @ col) > 0.01:
        raise InputError(directory, f"DICOM file {name} has an ImageOrientationPatient that is not two "
                                    f"orthogonal unit vectors: {_cosines(orientation)}")
    frames = reader.GetMetaData(TAG_NUMBER_OF_FRAMES).strip() if reader.HasMetaDataKey(TAG_NUMBER_OF_FRAMES) else "1"
    return {
        "name": name,
        "position": np.array(numbers(TAG_POSITION, "ImagePositionPatient", 3)),
        "orientation": orientation,
        "size": (int(numbers(TAG_ROWS, "Rows", 1)[0]), int(numbers(TAG_COLUMNS, "Columns", 1)[0])),
        "spacing": tuple(numbers(TAG_PIXEL_SPACING, "PixelSpacing", 2)),
        "frames": int(float(frames)) if _is_number(frames) else 1,
    }


def _x(values) -> str:
    return "x".join(f"{v:.6g}" for v in values)


def _cosines(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


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
