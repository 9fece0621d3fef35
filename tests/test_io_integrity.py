"""Loaders refuse inputs that used to give silent wrong numbers (audit findings, one test per case).

Every refusal is an InputError whose one-line message names the file (or DICOM folder) and the problem.
Fixtures are built in tmp_path at test time.
"""

from __future__ import annotations

import gzip
import io
import re
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import write_series

from bml_pipeline.cli import main
from bml_pipeline.errors import InputError
from bml_pipeline.io import read_labels, read_volume
from bml_pipeline.io.readers import MAX_BYTES, MAX_VOXELS

AFFINE = np.diag([0.7, 0.3646, 0.3646, 1.0])


def _refused(path: Path, pattern: str, **kwargs) -> str:
    """Read ``path``; assert an InputError naming it whose message matches ``pattern``; return the message."""
    with pytest.raises(InputError) as info:
        read_volume(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert re.search(pattern, message), message
    return message


def _label_bytes(shape=(24, 20, 16)) -> bytes:
    """An uncompressed NIfTI-1 label map (uint8, values 0-6) as bytes."""
    labels = (np.arange(np.prod(shape)) % 7).astype(np.uint8).reshape(shape)
    image = nib.Nifti1Image(labels, AFFINE)
    image.set_sform(AFFINE, code=1)
    return image.to_bytes()


def _nifti_with_header(path: Path, **fields) -> Path:
    """A float32 4x4x4 NIfTI whose raw header fields are overwritten (nibabel would refuse to write them)."""
    raw = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.diag([0.5, 0.5, 1.0, 1.0])).to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    for key, value in fields.items():
        header[key] = value
    raw = header.binaryblock + raw[348:]
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _nifti_with_sform(path: Path, affine: np.ndarray) -> Path:
    affine = np.asarray(affine, dtype=np.float64)
    return _nifti_with_header(path, sform_code=1, qform_code=0, srow_x=affine[0], srow_y=affine[1], srow_z=affine[2])


# ---- 1. corrupt or truncated NIfTI ------------------------------------------------------------------

def test_gzip_crc_mismatch_is_refused(tmp_path: Path) -> None:
    """Case 1: a damaged byte that still inflates cleanly (stored deflate block) is caught by the CRC."""
    raw = _label_bytes()
    packed = bytearray(gzip.compress(raw, compresslevel=0))  # stored blocks: data bytes appear verbatim
    at = bytes(packed).find(raw[2000:2064]) + 16
    packed[at] ^= 0xFF
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(bytes(packed))
    inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(packed[10:-8]))  # no zlib error ...
    assert len(inflated) == len(raw) and inflated != raw  # ... same length, changed voxels
    _refused(path, r"truncated or corrupt.*CRC")
    with pytest.raises(InputError):
        read_labels(path)


def test_gzip_damaged_deflate_stream_is_refused(tmp_path: Path) -> None:
    """Case 1: a byte flipped in the middle of an ordinary (compressed) deflate stream."""
    packed = bytearray(gzip.compress(_label_bytes(), compresslevel=6))
    packed[len(packed) // 2] ^= 0x5A
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(bytes(packed))
    _refused(path, "truncated or corrupt")


def test_truncated_uncompressed_nifti_is_refused(tmp_path: Path) -> None:
    """Case 1: a .nii whose voxel data is shorter than the header says."""
    path = tmp_path / "labels.nii"
    path.write_bytes(_label_bytes()[:-100])
    _refused(path, r"truncated or corrupt: header describes 24x20x16 uint8 voxels.*holds only")


def test_gzip_with_valid_crc_but_short_data_is_refused(tmp_path: Path) -> None:
    """Case 1: a well-formed gzip whose content stops before the voxel data the header describes."""
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(gzip.compress(_label_bytes()[:-100]))
    _refused(path, r"truncated or corrupt: header describes 24x20x16 uint8 voxels.*decompressed file holds only")


def test_truncated_gzip_stream_is_refused(tmp_path: Path) -> None:
    """Case 1: a .nii.gz cut short (no gzip trailer)."""
    path = tmp_path / "labels.nii.gz"
    data = gzip.compress(_label_bytes())
    path.write_bytes(data[: len(data) - 20])
    _refused(path, "truncated or corrupt")


def test_intact_files_still_load(tmp_path: Path) -> None:
    """Control for case 1: the same label map, uncompressed, stored-gzip and compressed, loads unchanged."""
    raw = _label_bytes()
    expected = (np.arange(24 * 20 * 16) % 7).astype(np.uint8).reshape(24, 20, 16)
    for name, data in [("a.nii", raw), ("b.nii.gz", gzip.compress(raw, compresslevel=0)), ("c.nii.gz", gzip.compress(raw))]:
        (tmp_path / name).write_bytes(data)
        volume = read_labels(tmp_path / name, canonical=False)
        np.testing.assert_array_equal(volume.array, expected)
        np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-6)


# ---- 2. size checks before allocating ---------------------------------------------------------------

def _huge_header(dtype=np.float32, shape=(1200, 1200, 1200)) -> bytes:
    """352 bytes: a NIfTI-1 header claiming ``shape`` voxels, an empty extension block, and no data."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms((0.5, 0.5, 0.5))
    header["vox_offset"] = 352
    return header.binaryblock + b"\0\0\0\0"


@pytest.mark.parametrize("name, dtype, pattern", [
    ("huge.nii.gz", np.float32, r"header claims 1200x1200x1200 float32 voxels \(6.44 GiB\), over the limit"),
    ("huge.nii", np.float32, r"header claims 1200x1200x1200 float32 voxels \(6.44 GiB\), over the limit"),
    ("huge_u8.nii.gz", np.uint8, r"truncated or corrupt: header describes 1200x1200x1200 uint8"),
    ("huge_u8.nii", np.uint8, r"truncated or corrupt: header describes 1200x1200x1200 uint8"),
], ids=["float32.nii.gz", "float32.nii", "uint8.nii.gz", "uint8.nii"])
def test_header_claiming_1200_cubed_voxels_fails_before_allocating(tmp_path: Path, name, dtype, pattern) -> None:
    """Case 2: a 352-byte header (72 bytes gzipped) claiming 1200^3 voxels; refused with < 64 MiB allocated."""
    raw = _huge_header(dtype)
    assert len(raw) == 352
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    tracemalloc.start()
    try:
        _refused(path, pattern)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak


def test_limits_are_stated() -> None:
    """Case 2: the documented limits."""
    assert MAX_VOXELS == 2**31 and MAX_BYTES == 4 * 2**30


def _metaimage(path: Path, dims: str, **replace: str) -> Path:
    """A float32 4x4x4 MetaImage (.mha, or .mhd + .raw) whose header then claims ``dims`` and ``replace``."""
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(path))
    text = path.read_bytes().replace(b"DimSize = 4 4 4", f"DimSize = {dims}".encode())
    for old, new in replace.items():
        text = text.replace(old.encode(), new.encode())
    path.write_bytes(text)
    return path


def test_metaimage_header_claiming_huge_size_with_tiny_raw_is_refused(tmp_path: Path) -> None:
    """Case 2: .mhd claims 1200^3 floats, its .raw holds 256 bytes: refused from the header alone."""
    path = _metaimage(tmp_path / "huge.mhd", "1200 1200 1200")
    assert (tmp_path / "huge.raw").stat().st_size == 256
    tracemalloc.start()
    try:
        _refused(path, r"header claims 1200x1200x1200 32-bit float voxels \(6.44 GiB\), over the limit")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak


@pytest.mark.parametrize("name", ["short.mhd", "short.mha", "short.nrrd"])
def test_itk_file_with_less_data_than_its_header_is_refused(tmp_path: Path, name: str, capfd) -> None:
    """Case 2: MetaImage (detached and attached) and NRRD whose voxel data is shorter than the header says,
    refused with one message instead of ITK's partial read (which also printed to the terminal)."""
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(path))
    key = b"sizes: 4 4 4" if name.endswith(".nrrd") else b"DimSize = 4 4 4"
    new = b"sizes: 40 40 40" if name.endswith(".nrrd") else b"DimSize = 40 40 40"
    path.write_bytes(path.read_bytes().replace(key, new))
    _refused(path, r"truncated or corrupt: header describes 40x40x40 32-bit float voxels \(256000 bytes\)")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


# ---- 3. DICOM series geometry -----------------------------------------------------------------------

SERIES = "1.2.826.0.1.3680043.8.498.1"


@pytest.mark.parametrize("case, options, pattern", [
    ("duplicate_slice", {"duplicate": 2},
     rf"duplicate slice: {SERIES}_002.dcm and {SERIES}_004.dcm are both at position 13 mm"),
    ("missing_slice", {"n_slices": 5, "missing": 2},
     rf"missing slice between positions 11.5 and 14.5 mm along the slice normal \({SERIES}_001.dcm, {SERIES}_003.dcm\)"),
    ("non_uniform_spacing", {"positions": [0.0, 1.5, 3.2, 4.5]},
     r"slice spacing is not uniform: 1.7 mm between positions 11.5 and 13.2 mm"),
    ("single_slice", {"n_slices": 1}, r"a single DICOM slice is not a volume"),
    ("orientation_differs", {"orientation_of": {3: (0.0, 0.0998, -0.995, 0.0, 0.995, 0.0998)}},
     rf"slice orientation differs between slices: .*{SERIES}_003.dcm has \(0, 0.0998, -0.995"),
    ("pixel_spacing_differs", {"spacing_of": {1: (0.5, 0.45)}},
     rf"pixel spacing differs between slices: {SERIES}_000.dcm has 0.5x0.4 mm, {SERIES}_001.dcm has 0.5x0.45 mm"),
    ("rows_columns_differ", {"shape_of": {1: (7, 5)}}, rf"slices differ in size: .*{SERIES}_001.dcm is 7x5"),
], ids=["duplicate_slice", "missing_slice", "non_uniform_spacing", "single_slice", "orientation_differs",
        "pixel_spacing_differs", "rows_columns_differ"])
def test_broken_dicom_series_is_refused(tmp_path: Path, case: str, options: dict, pattern: str) -> None:
    """Case 3: duplicated, missing, unevenly spaced or single slices; slices that disagree on orientation,
    pixel spacing or size. The message names the folder (and the offending files)."""
    folder = tmp_path / case
    write_series(folder, **options)
    _refused(folder, pattern)
    # Pointing at one file of the series reads the whole series, and is refused the same way.
    with pytest.raises(InputError, match=re.escape(str(folder))):
        read_volume(min(folder.glob("*.dcm")))


def test_missing_several_slices_says_how_many(tmp_path: Path) -> None:
    """Case 3: a gap of three steps is two missing slices."""
    write_series(tmp_path / "s", positions=[0.0, 1.5, 3.0, 7.5, 9.0])
    _refused(tmp_path / "s", r"missing 2 slices between positions 13 and 17.5 mm.*gap of 4.5 mm, slice spacing 1.5 mm")


def test_sound_dicom_series_still_load(tmp_path: Path) -> None:
    """Control for case 3: evenly spaced series, written in either order, load with the right spacing."""
    for name, positions in [("up", [0.0, 1.5, 3.0, 4.5]), ("down", [4.5, 3.0, 1.5, 0.0]), ("two", [0.0, 0.8])]:
        write_series(tmp_path / name, positions=positions)
        volume = read_volume(tmp_path / name, canonical=False)
        np.testing.assert_allclose(sorted(volume.spacing), sorted([0.4, 0.5, 0.8 if name == "two" else 1.5]), atol=1e-6)


# ---- 4. degenerate affine ---------------------------------------------------------------------------

PARALLEL = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1]])
ZERO_COLUMN = np.diag([0.5, 0.5, 0.0, 1.0])
NAN_ENTRY = np.diag([0.5, 0.5, 1.0, 1.0])
NAN_ENTRY[0, 3] = np.nan
INF_ENTRY = np.diag([0.5, 0.5, 1.0, 1.0])
INF_ENTRY[1, 1] = np.inf


@pytest.mark.parametrize("case, affine, pattern", [
    ("singular", PARALLEL, r"affine is singular \(voxel axes are parallel"),
    ("zero_column", ZERO_COLUMN, r"affine is singular \(zero column 2"),
    ("nan", NAN_ENTRY, r"affine has NaN or infinite entries"),
    ("inf", INF_ENTRY, r"affine has NaN or infinite entries"),
    ("tiny_spacing", np.diag([1e-6, 0.5, 1.0, 1.0]), r"voxel spacing 1e-06 mm along axis i is outside 0.01-50 mm"),
    ("huge_spacing", np.diag([0.5, 0.5, 100.0, 1.0]), r"voxel spacing 100 mm along axis k is outside 0.01-50 mm"),
], ids=["singular", "zero_column", "nan", "inf", "tiny_spacing", "huge_spacing"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_degenerate_nifti_affine_is_refused(tmp_path: Path, case: str, affine: np.ndarray, pattern: str,
                                            suffix: str) -> None:
    """Case 4: singular, zero-column, NaN/Inf and absurd-spacing sforms (the header's pixdim is sane)."""
    _refused(_nifti_with_sform(tmp_path / f"{case}{suffix}", affine), pattern)


@pytest.mark.parametrize("case, replace, pattern", [
    ("tiny_spacing", {"ElementSpacing = 1 1 1": "ElementSpacing = 1 0.001 1"},
     r"voxel spacing 0.001 mm along axis j is outside 0.01-50 mm"),
    ("huge_spacing", {"ElementSpacing = 1 1 1": "ElementSpacing = 1 1 80"},
     r"voxel spacing 80 mm along axis k is outside 0.01-50 mm"),
    ("singular", {"TransformMatrix = 1 0 0 0 1 0 0 0 1": "TransformMatrix = 1 0 0 1 0 0 0 0 1"},
     r"affine is singular \(voxel axes are parallel"),
], ids=["tiny_spacing", "huge_spacing", "singular"])
def test_degenerate_metaimage_geometry_is_refused(tmp_path: Path, case: str, replace: dict, pattern: str) -> None:
    """Case 4, MetaImage: absurd spacing and a singular direction matrix are refused from the header."""
    _refused(_metaimage(tmp_path / f"{case}.mha", "4 4 4", **replace), pattern)


# ---- CLI --------------------------------------------------------------------------------------------

def test_cli_info_on_corrupt_gzip_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    """Case 1 through the CLI: exit code 2, exactly one line on stderr naming the file, nothing on stdout."""
    raw = _label_bytes()
    packed = bytearray(gzip.compress(raw, compresslevel=0))
    packed[bytes(packed).find(raw[2000:2064]) + 16] ^= 0xFF
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(bytes(packed))
    assert main(["info", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"bml-pipeline: error: {path}: file is truncated or corrupt"), lines[0]
