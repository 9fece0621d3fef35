"""Exports: colour tables (3D Slicer, ITK-SNAP), label NIfTI intent, DICOM SEG and TID 1500 SR.

Every export is read back: the colour tables are parsed, the NIfTI intent read with nibabel, the SEG with
highdicom (its frames compared with the label map in the source images' own order: the geometry round
trip), the SR with pydicom and highdicom. ``dciodvfy`` (Debian package dicom3tools) validates the DICOM
objects when it is installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_factory import SAGITTAL_ORIENTATION, write_series

from bml_pipeline.errors import GeometryMismatchError, InputError
from bml_pipeline.export import (
    STRUCTURE_COLOURS,
    write_colour_tables,
    write_dicom_seg,
    write_dicom_sr,
    write_label_nifti,
)
from bml_pipeline.export.dicom import STRUCTURE_CODES
from bml_pipeline.io import read_labels, read_volume
from bml_pipeline.labels import load_schema
from bml_pipeline.volume import Volume

hd = pytest.importorskip("highdicom", reason="DICOM export needs highdicom (pip install -e '.[dicom]')")
pydicom = pytest.importorskip("pydicom")

SCHEMA = load_schema("oai_zib")
SERIES_UID = "1.2.826.0.1.3680043.8.498.1"
N_SLICES, ROWS, COLS = 5, 8, 7
_T = np.radians(20)
ORIENTATIONS = {
    "sagittal": SAGITTAL_ORIENTATION,
    # DESS-like: rows run posterior, columns inferior; slice normal -x.
    "dess_like": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    # in-plane oblique (rotated 20 degrees about x); the RAS-reoriented grid is then oblique too.
    "oblique": (0.0, float(np.sin(_T)), float(-np.cos(_T)), 0.0, float(np.cos(_T)), float(np.sin(_T))),
}
MEASUREMENTS = {  # the parts of Measurements.to_dict() the SR reports
    "schema_version": "1",
    "side": "right",
    "bml": {"femur": {"volume_cm3": 1.234, "lesion_count": 2}, "tibia": {"volume_cm3": 0.0, "lesion_count": 0},
            "patella": None, "total_volume_cm3": 1.234},
    "cartilage": {"femoral_cartilage": {"volume_cm3": 10.5, "thickness_mm": {"mean": 2.15, "median": 2.1}},
                  "tibial_cartilage": {"volume_cm3": 4.25, "thickness_mm": None},
                  "patellar_cartilage": None},
}


def make_series(folder: Path, orientation=SAGITTAL_ORIENTATION) -> tuple[Volume, np.ndarray, list[str]]:
    """(image volume as the pipeline reads it, pixels in file order, SOP instance UIDs in file order)."""
    pixels = write_series(folder, n_slices=N_SLICES, rows=ROWS, cols=COLS,
                          orientation_of={i: orientation for i in range(N_SLICES)})
    uids = [f"{SERIES_UID}.{i + 1}" for i in range(N_SLICES)]
    return read_volume(folder), pixels, uids


def box_labels(image: Volume, values=(1, 2, 3, 4, 5, 6, 7, 8, 9)) -> Volume:
    """A few boxes on the image's grid, one per label value (in RAS array order)."""
    array = np.zeros(image.shape, dtype=np.uint16)
    sx, sy, _ = image.shape
    for n, value in enumerate(values):  # 1x2x2 voxels each, spread over the slices
        i, j = n % sx, (2 * (n // sx)) % (sy - 1)
        array[i, j:j + 2, 1:3] = value
    return image.with_array(array)


def lab_to_rgb(dicom_lab) -> np.ndarray:
    """sRGB (0-255) of a DICOM CIELab triplet (PS3.3 C.10.7.1.1 scaling), via scikit-image (D65)."""
    from skimage.color import lab2rgb

    v = np.asarray([int(x) for x in dicom_lab], dtype=np.float64) / 0xFFFF
    lab = [v[0] * 100.0, v[1] * 255.0 - 128.0, v[2] * 255.0 - 128.0]
    return np.rint(lab2rgb(np.array([[lab]]))[0, 0] * 255.0)


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def sr_items(dataset) -> list:
    """All content items of an SR, depth first."""
    items = []
    for item in getattr(dataset, "ContentSequence", []):
        items.append(item)
        items.extend(sr_items(item))
    return items


def sr_numbers(dataset) -> list[tuple[str, str, float, str]]:
    """(tracking identifier, concept meaning, value, unit code) of every NUM item of a TID 1500 report."""
    out = []

    def walk(node, tracking):
        for item in getattr(node, "ContentSequence", []):
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "TEXT" and name == "Tracking Identifier":
                tracking = item.TextValue
        for item in getattr(node, "ContentSequence", []):
            if item.ValueType == "NUM":
                value = item.MeasuredValueSequence[0]
                out.append((tracking, item.ConceptNameCodeSequence[0].CodeMeaning, float(value.NumericValue),
                            value.MeasurementUnitsCodeSequence[0].CodeValue))
            walk(item, tracking)

    walk(dataset, None)
    return out


# ---- colour tables and NIfTI intent ---------------------------------------------------------------
def test_colour_tables_open_with_names_and_colours(tmp_path: Path) -> None:
    paths = write_colour_tables(tmp_path / "labels.nii.gz", SCHEMA)
    assert [p.name for p in paths] == ["labels.ctbl", "labels_itksnap.txt"]
    expected = {s.id: (s.name, STRUCTURE_COLOURS[s.name]) for s in SCHEMA.structures}

    slicer = paths[0].read_text().splitlines()
    assert slicer[0].startswith("# Color table file")
    rows = [line.split() for line in slicer if not line.startswith("#")]
    assert all(len(r) == 6 for r in rows)
    table = {int(r[0]): (r[1], tuple(int(v) for v in r[2:5]), int(r[5])) for r in rows}
    assert table.pop(0) == ("Background", (0, 0, 0), 0)
    assert {i: (n, c) for i, (n, c, _) in table.items()} == expected
    assert all(a == 255 for _, _, a in table.values())

    itksnap = paths[1].read_text().splitlines()
    assert itksnap[1] == "# ITK-SnAP Label Description File"
    entries = {}
    for line in itksnap:
        if line.startswith("#"):
            continue
        idx, r, g, b, a, vis, msh, label = shlex.split(line)
        entries[int(idx)] = (label, (int(r), int(g), int(b)), float(a), int(vis), int(msh))
    assert entries.pop(0) == ("Clear Label", (0, 0, 0), 0.0, 0, 0)
    assert {i: (e[0], e[1]) for i, e in entries.items()} == expected
    assert all(e[2:] == (1.0, 1, 1) for e in entries.values())
    assert re.search(r'^\s+7\s+230\s+20\s+20\s+1\.00\s+1\s+1\s+"femoral_bml"$', paths[1].read_text(),
                     re.MULTILINE)


def test_colours_are_distinct_and_follow_the_scheme() -> None:
    assert set(STRUCTURE_COLOURS) == {s.name for s in SCHEMA.structures}
    assert len(set(STRUCTURE_COLOURS.values())) == len(STRUCTURE_COLOURS)
    for s in SCHEMA.structures:
        rgb = np.array(STRUCTURE_COLOURS[s.name])
        if s.kind == "bone":  # light
            assert rgb.min() >= 140, s.name
        elif s.kind == "cartilage":  # saturated
            assert rgb.max() - rgb.min() >= 150, s.name
        else:  # lesions: red dominates
            assert rgb[0] >= 200 and rgb[0] > rgb[1] + 100 and rgb[0] > rgb[2] + 50, s.name


def test_label_nifti_has_label_intent(tmp_path: Path) -> None:
    image, _, _ = make_series(tmp_path / "dicom")
    labels = box_labels(image)
    path = write_label_nifti(labels, tmp_path / "labels.nii.gz", intent_name="oai_zib")
    header = nib.load(str(path)).header
    assert int(header["intent_code"]) == 1002
    assert header.get_intent()[0] == "label" and header.get_intent()[2] == "oai_zib"
    back = read_labels(path, SCHEMA)
    np.testing.assert_array_equal(back.array, labels.array)
    np.testing.assert_allclose(back.affine, labels.affine, atol=1e-5)


# ---- DICOM SEG ------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", list(ORIENTATIONS.values()), ids=list(ORIENTATIONS))
def test_seg_frames_match_labels_in_source_frame_order(tmp_path: Path, orientation) -> None:
    """Geometry round trip, independent of the export's own geometry code: the label map is derived from
    the image intensities (value % 10), so in source order each segment must equal pixels % 10 == id."""
    image, pixels, uids = make_series(tmp_path / "dicom", orientation)
    labels = image.with_array((image.array % 10).astype(np.uint16))
    seg_path = write_dicom_seg(labels, tmp_path / "dicom", SCHEMA, tmp_path / "seg.dcm")

    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [SERIES_UID]
    assert seg.FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.200"
    names = {n: seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    assert sorted(names.values()) == sorted(s.name for s in SCHEMA.structures)
    frames = seg.get_pixels_by_source_instance(uids, segment_numbers=list(names))
    for k, (number, name) in enumerate(names.items()):
        np.testing.assert_array_equal(frames[..., k].astype(bool), pixels % 10 == SCHEMA.by_name(name).id,
                                      err_msg=name)
    # The frames' positions are the source images' positions (LPS).
    by_uid = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in sorted((tmp_path / "dicom").glob("*.dcm")))}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position],
                                   [float(v) for v in by_uid[source].ImagePositionPatient], atol=1e-4)


def test_seg_has_only_present_segments_with_codes_and_colours(tmp_path: Path) -> None:
    image, _, uids = make_series(tmp_path / "dicom")
    labels = box_labels(image, values=(1, 2, 3, 7))
    seg = hd.seg.segread(write_dicom_seg(labels, tmp_path / "dicom", SCHEMA, tmp_path / "seg.dcm"))
    assert seg.number_of_segments == 4
    for item in seg.SegmentSequence:
        name = item.SegmentLabel
        codes = STRUCTURE_CODES[name]
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.category.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.type.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.AnatomicRegionSequence[0].CodeValue == codes.region.value
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert np.abs(lab_to_rgb(item.RecommendedDisplayCIELabValue) - STRUCTURE_COLOURS[name]).max() <= 1
    described = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert described["femur"].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Femur"
    assert described["femoral_cartilage"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "309312004"
    assert described["femoral_bml"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "79654002"
    assert described["femoral_bml"].PrimaryAnatomicStructureSequence[0].CodeMeaning == "Bone Marrow"
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    assert frames.shape == (N_SLICES, ROWS, COLS)


def test_seg_manual_labels_and_refusals(tmp_path: Path) -> None:
    image, _, _ = make_series(tmp_path / "dicom")
    labels = box_labels(image, values=(3,))
    seg = hd.seg.segread(write_dicom_seg(labels, tmp_path / "dicom", SCHEMA, tmp_path / "seg.dcm", automatic=False))
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    shifted = labels.affine.copy()
    shifted[:3, 3] += 0.5 * labels.affine[:3, 0]  # half a voxel off the source grid
    with pytest.raises(GeometryMismatchError, match="not on the source series"):
        write_dicom_seg(Volume(labels.array, shifted, labels.meta), tmp_path / "dicom", SCHEMA, tmp_path / "x.dcm")
    with pytest.raises(InputError, match="empty"):
        write_dicom_seg(labels.with_array(np.zeros(labels.shape, np.uint16)), tmp_path / "dicom", SCHEMA,
                        tmp_path / "x.dcm")
    with pytest.raises(InputError, match="not in label schema"):
        write_dicom_seg(labels.with_array(np.full(labels.shape, 12, np.uint16)), tmp_path / "dicom", SCHEMA,
                        tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_folder_with_two_series_exports_the_labels_series(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    write_series(folder, n_slices=N_SLICES, rows=ROWS, cols=COLS)
    other = "1.2.826.0.1.3680043.8.498.2"
    write_series(folder, n_slices=3, rows=4, cols=4, series_uid=other, description="Other", seed=1)
    with pytest.raises(InputError, match="2 DICOM series"):  # which one? not said
        write_dicom_sr(MEASUREMENTS, folder, tmp_path / "x.dcm")
    image = read_volume(folder, series_uid=SERIES_UID)  # meta.extra["series_uid"] says which series
    seg_path = write_dicom_seg(box_labels(image), folder, SCHEMA, tmp_path / "seg.dcm")
    assert pydicom.dcmread(seg_path).ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    sr = pydicom.dcmread(write_dicom_sr(MEASUREMENTS, folder, tmp_path / "sr.dcm", seg_path=seg_path))
    evidence = {s.SeriesInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence
                for s in st.ReferencedSeriesSequence}
    assert SERIES_UID in evidence and other not in evidence


# ---- DICOM SR -------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_seg", [False, True], ids=["plain", "referencing_seg"])
def test_sr_holds_measurements_and_references_source_series(tmp_path: Path, with_seg: bool) -> None:
    image, _, uids = make_series(tmp_path / "dicom")
    seg_path = None
    if with_seg:
        seg_path = write_dicom_seg(box_labels(image), tmp_path / "dicom", SCHEMA, tmp_path / "seg.dcm")
    path = write_dicom_sr(MEASUREMENTS, tmp_path / "dicom", tmp_path / "sr.dcm", seg_path=seg_path)

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.100"
    assert ds.VerificationFlag == "UNVERIFIED"
    evidence = {s.SeriesInstanceUID: [i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence]
                for study in ds.CurrentRequestedProcedureEvidenceSequence for s in study.ReferencedSeriesSequence}
    assert sorted(evidence[SERIES_UID]) == sorted(uids)
    numbers = sr_numbers(ds)
    assert ("femoral_bml", "Volume", 1.234, "cm3") in numbers
    assert ("tibial_bml", "Volume", 0.0, "cm3") in numbers
    assert ("femoral_cartilage", "Volume", 10.5, "cm3") in numbers
    assert ("femoral_cartilage", "Thickness", 2.15, "mm") in numbers
    assert ("tibial_cartilage", "Volume", 4.25, "cm3") in numbers
    reported = {t for t, *_ in numbers}
    assert not reported & {"patellar_bml", "patellar_cartilage"}  # absent structures are left out
    items = sr_items(ds)
    sites = {i.ConceptCodeSequence[0].CodeMeaning for i in items
             if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Finding Site"}
    assert sites == {"Femur", "Tibia"}
    assert any(i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning == "Right" for i in items)
    assert any(i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning == "Mean" for i in items)

    sr = hd.sr.srread(path)
    if with_seg:
        seg = pydicom.dcmread(seg_path)
        groups = sr.content.get_volumetric_roi_measurement_groups()
        assert len(groups) == 4
        segments = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
        for group in groups:
            ref = group.referenced_segment
            assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            assert ref.referenced_segment_numbers == [segments[group.tracking_identifier]]
            assert ref.source_series_for_segmentation.value == SERIES_UID
        assert seg.SeriesInstanceUID in evidence
    else:
        groups = sr.content.get_image_measurement_groups()
        assert sorted(g.tracking_identifier for g in groups) == ["femoral_bml", "femoral_cartilage",
                                                                 "tibial_bml", "tibial_cartilage"]


def test_sr_refuses_nothing_to_report(tmp_path: Path) -> None:
    make_series(tmp_path / "dicom")
    empty = {"side": None, "bml": {"femur": None, "tibia": None, "patella": None}, "cartilage": {}}
    with pytest.raises(InputError, match="no bone marrow lesion or cartilage"):
        write_dicom_sr(empty, tmp_path / "dicom", tmp_path / "sr.dcm")


def test_dciodvfy_accepts_seg_and_sr(tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    image, _, _ = make_series(tmp_path / "dicom")
    seg = write_dicom_seg(box_labels(image), tmp_path / "dicom", SCHEMA, tmp_path / "seg.dcm")
    sr = write_dicom_sr(MEASUREMENTS, tmp_path / "dicom", tmp_path / "sr.dcm", seg_path=seg)
    assert dciodvfy_errors(seg) == []
    assert dciodvfy_errors(sr) == []


def test_real_dess_knee_seg_and_sr(tmp_path: Path, dess_dicom_dir: Path) -> None:
    """The real DESS series (80 sagittal 512x512 slices): a mask derived from its intensities goes out as
    SEG and comes back equal to the same threshold of each source image's pixels, in source order."""
    series = dess_dicom_dir / "echo1"
    image = read_volume(series)
    threshold = np.percentile(image.array, 99)
    labels = image.with_array(np.where(image.array > threshold, 1, 0).astype(np.uint16))
    bright = np.argwhere(labels.array == 1)
    labels.array[tuple(bright[len(bright) // 2])] = 7  # one voxel of the mask relabelled as lesion
    seg_path = write_dicom_seg(labels, series, SCHEMA, tmp_path / "seg.dcm")
    sr_path = write_dicom_sr(MEASUREMENTS, series, tmp_path / "sr.dcm", seg_path=seg_path)

    seg = hd.seg.segread(seg_path)
    sources = sorted((pydicom.dcmread(p) for p in series.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))
    series_uid = sources[0].SeriesInstanceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [series_uid]
    numbers = {seg.get_segment_description(n).segment_label: n for n in seg.segment_numbers}
    assert set(numbers) == {"femur", "femoral_bml"}
    frames = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources],
                                               segment_numbers=[numbers["femur"], numbers["femoral_bml"]])
    femur = frames[..., 0].astype(bool)
    expected = np.stack([d.pixel_array > threshold for d in sources])
    assert np.count_nonzero(femur ^ expected) == 1  # all but the voxel relabelled as lesion
    assert np.count_nonzero(frames[..., 1]) == 1
    sr = pydicom.dcmread(sr_path)
    assert series_uid in {s.SeriesInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence
                          for s in st.ReferencedSeriesSequence}
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(seg_path) == []
        assert dciodvfy_errors(sr_path) == []
