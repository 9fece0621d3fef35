"""Foundation: readers, writers, geometry, and the bad-input contract (issue 2)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import write_series

from bml_pipeline.cli import main
from bml_pipeline.errors import InputError
from bml_pipeline.io import read_labels, read_volume, write_nifti
from bml_pipeline.io.orientation import LPS_TO_RAS
from bml_pipeline.labels import load_schema
from bml_pipeline.volume import Volume


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = rotation("x", 17) @ rotation("z", -31) @ np.diag([0.3646, 0.3646, 0.7])
OBLIQUE[:3, 3] = [-61.2, 13.7, 104.9]
PERMUTED = np.array([[0, 0, -1.5, 40.0], [0.3125, 0, 0, -80.0], [0, -0.3125, 0, 75.5], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [np.diag([0.7, 0.3646, 0.3646, 1.0]), OBLIQUE, PERMUTED], ids=["ras", "oblique", "permuted"])
def test_nifti_round_trip_preserves_array_and_affine(tmp_path: Path, affine: np.ndarray) -> None:
    array = np.random.default_rng(1).normal(size=(7, 9, 5)).astype(np.float32)
    original = Volume(array, affine)
    write_nifti(original, tmp_path / "a.nii.gz")
    first = read_volume(tmp_path / "a.nii.gz", canonical=False)
    write_nifti(first, tmp_path / "b.nii.gz")
    second = read_volume(tmp_path / "b.nii.gz", canonical=False)
    for volume in (first, second):
        np.testing.assert_array_equal(volume.array, array)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-5)


def test_canonical_reorientation_keeps_world_coordinates(tmp_path: Path) -> None:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    write_nifti(Volume(array, PERMUTED), tmp_path / "p.nii.gz")
    canonical = read_volume(tmp_path / "p.nii.gz")
    assert canonical.orientation == "RAS"
    assert canonical.shape == (6, 4, 5)
    np.testing.assert_allclose(sorted(canonical.spacing), sorted([1.5, 0.3125, 0.3125]))
    native = Volume(array, PERMUTED)
    # The voxel holding a given value sits at the same world position in both.
    for value in (0, 37, 119):
        ijk_native = np.argwhere(native.array == value)[0]
        ijk_canon = np.argwhere(canonical.array == value)[0]
        np.testing.assert_allclose(native.world_coords(ijk_native), canonical.world_coords(ijk_canon), atol=1e-6)


def test_volume_geometry_is_derived_from_affine() -> None:
    volume = Volume(np.zeros((3, 4, 5), np.uint8), OBLIQUE)
    np.testing.assert_allclose(volume.spacing, [0.3646, 0.3646, 0.7], atol=1e-9)
    assert volume.voxel_volume_mm3 == pytest.approx(0.3646 * 0.3646 * 0.7, rel=1e-9)
    xyz = volume.world_coords(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(volume.voxel_coords(xyz), [[1.0, 2.0, 3.0]], atol=1e-9)
    cropped = volume.crop((slice(1, 3), slice(2, 4), slice(0, 5)))
    np.testing.assert_allclose(cropped.world_coords([0, 0, 0]), volume.world_coords([1, 2, 0]), atol=1e-9)


def test_geometry_mismatch_is_refused() -> None:
    a = Volume(np.zeros((3, 4, 5)), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    b = Volume(np.zeros((3, 4, 5)), shifted)
    with pytest.raises(InputError, match="different voxel grids"):
        a.require_same_grid(b)


def test_dicom_echo1_geometry_matches_simpleitk(dess_dicom_dir: Path, capsys) -> None:
    echo1 = dess_dicom_dir / "echo1"
    assert main(["info", str(echo1), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [512, 512, 80]
    np.testing.assert_allclose(info["spacing_mm"], [0.3125, 0.3125, 1.5], atol=1e-4)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(echo1)))
    image = reader.Execute()
    for code, ras in info["corners_ras_mm"].items():
        index = [int(c) * (n - 1) for c, n in zip(code, image.GetSize())]
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(ras, (LPS_TO_RAS[:3, :3] @ lps), atol=1e-3)
    assert info["echo_time_ms"] == pytest.approx(7.48)


def test_oai_label_map_loads_with_its_spacing(oai_labels_dir: Path) -> None:
    path = min(oai_labels_dir.glob("*.nii.gz"))
    labels = read_labels(path, load_schema("oai_zib"))
    np.testing.assert_allclose(labels.spacing, [0.7, 0.3646, 0.3646], atol=1e-4)
    assert labels.shape == (160, 384, 384)
    assert labels.array.dtype == np.uint16


def test_dicom_series_metadata_and_geometry(tmp_path: Path) -> None:
    pixels = write_series(tmp_path / "s", laterality="L")
    volume = read_volume(tmp_path / "s", canonical=False)
    assert volume.meta.laterality == "left"
    assert volume.meta.series_description == "Sag test"
    assert volume.meta.echo_time_ms == pytest.approx(7.5)
    assert volume.shape == (5, 6, 4)  # (columns, rows, slices)
    np.testing.assert_array_equal(volume.array[:, :, 2], pixels[2].T)
    # Voxel (col=1, row=2, slice=3) in LPS: position + col * 0.4 mm * row_dir + row * 0.5 mm * col_dir
    # + 3 slice steps along +x.
    lps = np.array([10.0 + 3 * 1.5, -20.0 + 2 * 0.5, 30.0 - 1 * 0.4])
    np.testing.assert_allclose(volume.world_coords([1, 2, 3]), lps * [-1, -1, 1], atol=1e-4)


def test_side_option_overrides_unknown(tmp_path: Path) -> None:
    write_series(tmp_path / "s", laterality=None)
    assert read_volume(tmp_path / "s").meta.laterality is None
    assert read_volume(tmp_path / "s", laterality="right").meta.laterality == "right"


# ---- bad input: each exits 2, names the file, writes nothing -------------------------------------

def _nifti(path: Path, array: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([0.5, 0.5, 1.0, 1.0]) if affine is None else affine), str(path))
    return path


def _bad_missing(tmp: Path) -> tuple[Path, list[str]]:
    return tmp / "nope.nii.gz", []


def _bad_empty(tmp: Path):
    (tmp / "empty.nii.gz").write_bytes(b"")
    return tmp / "empty.nii.gz", []


def _bad_truncated(tmp: Path):
    good = _nifti(tmp / "good.nii.gz", np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32))
    data = good.read_bytes()
    (tmp / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    return tmp / "trunc.nii.gz", []


def _bad_not_image(tmp: Path):
    path = tmp / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"this is not an image\n" * 50))
    return path, []


def _bad_2d(tmp: Path):
    return _nifti(tmp / "flat.nii.gz", np.zeros((8, 8), np.float32)), []


def _bad_4d(tmp: Path):
    return _nifti(tmp / "series.nii.gz", np.zeros((4, 4, 4, 3), np.float32)), []


def _bad_nan_labels(tmp: Path):
    array = np.zeros((4, 4, 4), np.float32)
    array[1, 1, 1] = np.nan
    return _nifti(tmp / "nan.nii.gz", array), ["--labels", "oai_zib"]


def _bad_inf_labels(tmp: Path):
    array = np.ones((4, 4, 4), np.float32)
    array[0, 1, 2] = np.inf
    return _nifti(tmp / "inf.nii.gz", array), ["--labels", "oai_zib"]


def _bad_unknown_label(tmp: Path):
    return _nifti(tmp / "lab.nii.gz", np.full((4, 4, 4), 42, np.uint16)), ["--labels", "oai_zib"]


def _mha_with_spacing(path: Path, spacing: str) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(path))
    path.write_bytes(path.read_bytes().replace(b"ElementSpacing = 1 1 1", f"ElementSpacing = {spacing}".encode()))
    return path


def _bad_zero_spacing(tmp: Path):
    return _mha_with_spacing(tmp / "zero.mha", "1 0 1"), []


def _bad_negative_spacing(tmp: Path):
    return _mha_with_spacing(tmp / "neg.mha", "1 -0.5 1"), []


def _nifti_with_pixdim(path: Path, pixdim: list[float]) -> Path:
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    image.header["pixdim"][1:4] = pixdim  # written raw: nibabel does not re-check on save
    nib.save(image, str(path))
    return path


def _bad_zero_spacing_nifti(tmp: Path):
    return _nifti_with_pixdim(tmp / "zero.nii", [0.5, 0.0, 1.0]), []


def _bad_negative_spacing_nifti(tmp: Path):
    return _nifti_with_pixdim(tmp / "neg.nii.gz", [0.5, -0.5, 1.0]), []


def _bad_no_dicom(tmp: Path):
    folder = tmp / "empty_dir"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    return folder, []


def _bad_two_series(tmp: Path):
    folder = tmp / "two"
    write_series(folder, series_uid="1.2.826.0.1.3680043.8.498.11", description="echo 1")
    write_series(folder, series_uid="1.2.826.0.1.3680043.8.498.12", description="echo 2", seed=1)
    return folder, []


BAD_INPUTS = {
    "missing": (_bad_missing, "not found"),
    "empty": (_bad_empty, "empty"),
    "truncated": (_bad_truncated, "truncated or corrupt"),
    "not_an_image": (_bad_not_image, "not a readable"),
    "2d": (_bad_2d, "expected a 3D volume"),
    "4d_frames": (_bad_4d, "3 frames|one 3D volume"),
    "nan_labels": (_bad_nan_labels, "NaN or Inf"),
    "inf_labels": (_bad_inf_labels, "NaN or Inf"),
    "unknown_label": (_bad_unknown_label, r"label values \[42\]"),
    "zero_spacing": (_bad_zero_spacing, "zero or negative voxel spacing"),
    "negative_spacing": (_bad_negative_spacing, "zero or negative voxel spacing"),
    "zero_spacing_nifti": (_bad_zero_spacing_nifti, "zero or negative voxel spacing"),
    "negative_spacing_nifti": (_bad_negative_spacing_nifti, "zero or negative voxel spacing"),
    "no_dicom": (_bad_no_dicom, "no DICOM series"),
    "two_series": (_bad_two_series, "2 DICOM series.*echo 1.*echo 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_names_file_and_writes_nothing(case: str, tmp_path: Path, capsys) -> None:
    make, pattern = BAD_INPUTS[case]
    bad_path, extra = make(tmp_path)
    out = tmp_path / "out" / "converted.nii.gz"
    code = main(["convert", str(bad_path), str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert str(bad_path) in err
    import re

    assert re.search(pattern, err), err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_info_reports_labels_and_version(tmp_path: Path, capsys) -> None:
    path = _nifti(tmp_path / "l.nii.gz", np.array([[[0, 1], [3, 7]]] * 2, dtype=np.uint16))
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label_values"] == [0, 1, 3, 7]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "bml-pipeline" in capsys.readouterr().out


def test_atomic_writes_leave_no_temporary_files_and_usual_permissions(tmp_path: Path) -> None:
    import os

    from bml_pipeline.io import atomic_path, write_text_atomic

    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.nii.gz") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_two_series_are_told_apart_and_one_is_chosen(tmp_path: Path, capsys) -> None:
    """Two echoes of one acquisition share a description: the listing gives echo time and file count,
    and --series picks one (run, segment and the manifest's series column)."""
    from bml_pipeline.io import read_volume

    write_series(tmp_path / "d", series_uid="1.2.3.1", description="Sag DESS")
    write_series(tmp_path / "d", series_uid="1.2.3.2", description="Sag DESS", n_slices=5)
    assert main(["info", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "1.2.3.1 (Sag DESS, TE 7.5 ms, 4 files)" in err and "1.2.3.2 (Sag DESS, TE 7.5 ms, 5 files)" in err
    assert read_volume(tmp_path / "d", series_uid="1.2.3.2").shape[0] == 5
    assert main(["run", str(tmp_path / "d"), "--series", "9.9", "--out", str(tmp_path / "o")]) == 2
    assert "no DICOM series '9.9' here" in capsys.readouterr().err
