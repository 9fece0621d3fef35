"""DICOM export for scans that came in as DICOM: a Segmentation (SEG) of the label map and a Structured
Report (TID 1500 Measurement Report) of the key measurements, both referencing the source series.

Needs the optional dependency ``highdicom`` (``pip install "bml-pipeline[dicom]"``).

Geometry: the label :class:`~bml_pipeline.volume.Volume` is in the pipeline's RAS-reoriented array order.
The SEG must hold one frame per source image, in the source images' own pixel order (LPS, their
ImagePositionPatient/ImageOrientationPatient). Every source pixel is therefore mapped through world
coordinates to its label voxel (:func:`source_frame_labels`); a label map that is not on the source
series' voxel grid is refused (:class:`~bml_pipeline.errors.GeometryMismatchError`), never resampled.

Coded concepts (SNOMED CT, "SCT"; DICOM "DCM"; LOINC "LN"; UCUM units) are listed in
:data:`STRUCTURE_CODES` and ``docs/export.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bml_pipeline.errors import GeometryMismatchError, InputError
from bml_pipeline.export.colour_table import structure_colours
from bml_pipeline.io import atomic_path
from bml_pipeline.io.orientation import LPS_TO_RAS
from bml_pipeline.labels import LabelSchema, Structure, load_schema, present_values
from bml_pipeline.volume import Volume

SOFTWARE = "bml-pipeline"
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
GRID_TOLERANCE_VOXELS = 0.25
"""Largest distance (in voxels) between a source pixel centre and its label voxel centre."""

TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "StudyID", "AccessionNumber", "ReferringPhysicianName")
"""Type 2 patient/study attributes copied from the source into SEG and SR; set empty when the source
lacks them (the copies in memory only; source files are never changed)."""


@dataclass(frozen=True)
class Concept:
    """A coded concept: (code value, coding scheme, code meaning)."""

    value: str
    scheme: str
    meaning: str

    def code(self):
        from pydicom.sr.coding import Code

        return Code(self.value, self.scheme, self.meaning)


# ---- coded concepts ---------------------------------------------------------------------------
# Segmentation property categories (CID 7150).
TISSUE = Concept("85756007", "SCT", "Tissue")
ANATOMICAL_STRUCTURE = Concept("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE = Concept("49755003", "SCT", "Morphologically Abnormal Structure")
# Property types and anatomy.
FEMUR = Concept("71341001", "SCT", "Femur")
TIBIA = Concept("12611008", "SCT", "Tibia")
PATELLA = Concept("64234005", "SCT", "Patella")
BONE = Concept("3138006", "SCT", "Bone")  # CID 7166 (for bones of other schemas)
CARTILAGE = Concept("309312004", "SCT", "Cartilage")  # CID 7166 Common Tissue Segmentation Types
EDEMA = Concept("79654002", "SCT", "Edema")  # CID 7159 Lesion Segmentation Types
LESION = Concept("52988006", "SCT", "Lesion")  # CID 7159 (for lesions of bones other than the three)
BONE_MARROW = Concept("14016003", "SCT", "Bone Marrow")
KNEE_JOINT = Concept("49076000", "SCT", "Knee joint")
# Measurements.
VOLUME = Concept("118565006", "SCT", "Volume")
THICKNESS = Concept("59089-3", "LN", "Thickness")
MEAN = Concept("373098007", "SCT", "Mean")
CUBIC_CENTIMETER = Concept("cm3", "UCUM", "cubic centimeter")
MILLIMETER = Concept("mm", "UCUM", "millimeter")
LEFT = Concept("7771000", "SCT", "Left")
RIGHT = Concept("24028007", "SCT", "Right")
IMAGING_PROCEDURE = Concept("363679005", "SCT", "Imaging procedure")  # CID 100

BONE_CONCEPTS = {"femur": FEMUR, "tibia": TIBIA, "patella": PATELLA}


@dataclass(frozen=True)
class StructureCodes:
    """How one structure is described in the SEG and the SR.

    ``category``/``type`` are the SEG's Segmented Property Category/Type; ``region`` its Anatomic Region
    (the SR's finding site); ``structure`` an optional Primary Anatomic Structure.
    """

    category: Concept
    type: Concept
    region: Concept
    structure: Concept | None = None


def structure_codes(structure: Structure) -> StructureCodes:
    """Coded description of ``structure``.

    - bone: Anatomical Structure / Femur|Tibia|Patella (CID 4031 Common Anatomic Regions), region Knee
      joint;
    - cartilage plate: Tissue / Cartilage, region = its bone (the articular surface it covers);
    - bone marrow lesion: Morphologically Abnormal Structure / Edema, region = its bone, primary anatomic
      structure Bone Marrow (a BML is the "bone marrow oedema-like lesion" of MRI; SNOMED CT has no
      pre-coordinated concept that DICOM lists for it, so it is post-coordinated).
    Structures of other schemas fall back to generic Bone / Cartilage / Lesion / Tissue codes.
    """
    bone = BONE_CONCEPTS.get(structure.bone or "", KNEE_JOINT)
    if structure.kind == "bone":
        if structure.name in BONE_CONCEPTS:
            return StructureCodes(ANATOMICAL_STRUCTURE, BONE_CONCEPTS[structure.name], KNEE_JOINT)
        return StructureCodes(TISSUE, BONE, KNEE_JOINT)
    if structure.kind == "cartilage":
        return StructureCodes(TISSUE, CARTILAGE, bone)
    if structure.kind == "lesion":
        lesion_type = EDEMA if structure.bone in BONE_CONCEPTS else LESION
        return StructureCodes(ABNORMAL_STRUCTURE, lesion_type, bone, BONE_MARROW)
    return StructureCodes(TISSUE, TISSUE, KNEE_JOINT)


STRUCTURE_CODES = {name: structure_codes(Structure(0, name, kind, bone)) for name, kind, bone in (
    ("femur", "bone", None), ("tibia", "bone", None), ("patella", "bone", None),
    ("femoral_cartilage", "cartilage", "femur"), ("tibial_cartilage", "cartilage", "tibia"),
    ("patellar_cartilage", "cartilage", "patella"), ("femoral_bml", "lesion", "femur"),
    ("tibial_bml", "lesion", "tibia"), ("patellar_bml", "lesion", "patella"))}
"""The codes of the ``oai_zib`` structures (for documentation and tests)."""


def dicom_export_available() -> bool:
    """True when the optional ``highdicom`` package is installed (``pip install "bml-pipeline[dicom]"``)."""
    import importlib.util

    return importlib.util.find_spec("highdicom") is not None


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError:
        raise ModuleNotFoundError('DICOM SEG/SR export needs the optional package highdicom: '
                                  'pip install "bml-pipeline[dicom]"') from None
    return highdicom


# ---- source series ------------------------------------------------------------------------------
def read_source_series(source_series_dir: str | Path, series_uid: str | None = None) -> list[Any]:
    """Headers (pydicom datasets without pixel data) of the single-frame images of one series in
    ``source_series_dir`` (not recursive), sorted along the slice normal.

    Raises:
        InputError: no DICOM images, several series and no ``series_uid``, unknown ``series_uid``,
            multi-frame (enhanced) images, images without position/orientation.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    directory = Path(source_series_dir)
    if not directory.is_dir():
        raise InputError(directory, "source DICOM series folder not found")
    by_series: dict[str, list[Any]] = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds or "Rows" not in ds:
            continue  # DICOMDIR, SR, presentation states ...
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if not by_series:
        raise InputError(directory, "no DICOM images found")
    if series_uid is None:
        if len(by_series) > 1:
            raise InputError(directory, f"folder holds {len(by_series)} DICOM series; say which one "
                                        f"(series_uid): {', '.join(sorted(by_series))}")
        series_uid = next(iter(by_series))
    if series_uid not in by_series:
        raise InputError(directory, f"no DICOM series {series_uid!r} here (found: {', '.join(sorted(by_series))})")
    datasets = by_series[series_uid]
    for ds in datasets:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise InputError(directory, "multi-frame (enhanced) source images are not supported for DICOM export")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
            raise InputError(directory, f"DICOM image {ds.SOPInstanceUID} has no position, orientation or "
                                        f"pixel spacing")
    for ds in datasets:
        for keyword in TYPE2_PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")  # empty Type 2 value (anonymised sources often drop them)
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda d: float(np.asarray(d.ImagePositionPatient, dtype=np.float64) @ normal))


def frame_affine_ras(ds: Any) -> np.ndarray:
    """4x3 matrix mapping (column, row, 1) of a single-frame DICOM image to RAS+ mm (pixel centres).

    DICOM: ``P = IPP + row_cosine * PixelSpacing[1] * column + column_cosine * PixelSpacing[0] * row``
    in LPS; x and y are negated for RAS.
    """
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(ds.PixelSpacing, dtype=np.float64)  # (between rows, between columns)
    lps = np.zeros((4, 3))
    lps[:3, 0] = iop[:3] * spacing[1]
    lps[:3, 1] = iop[3:] * spacing[0]
    lps[:3, 2] = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    lps[3, 2] = 1.0
    return LPS_TO_RAS @ lps


def source_frame_labels(labels: Volume, sources: Sequence[Any]) -> np.ndarray:
    """The label map read out onto the source frames, without resampling: array (frames, rows, columns),
    frame ``n`` holding the labels of ``sources[n]``'s pixels.

    Each source pixel's centre is mapped to the label grid through world coordinates; it must fall
    within :data:`GRID_TOLERANCE_VOXELS` of a label voxel centre inside the map.

    Raises:
        GeometryMismatchError: the label map is not on the source series' grid.
    """
    inverse = np.linalg.inv(labels.affine)
    shape = np.asarray(labels.shape)
    first = sources[0]
    rows, cols = int(first.Rows), int(first.Columns)
    if rows * cols * len(sources) != int(np.prod(shape)):
        raise GeometryMismatchError(labels.meta.source, f"label map {tuple(shape)} does not match the source "
                                                        f"series ({len(sources)} images of {rows}x{cols})")
    out = np.empty((len(sources), rows, cols), dtype=labels.array.dtype)
    r_idx, c_idx = np.mgrid[0:rows, 0:cols]
    for n, ds in enumerate(sources):
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise GeometryMismatchError(labels.meta.source, "source images differ in size")
        to_ijk = (inverse @ frame_affine_ras(ds))[:3]  # (column, row, 1) -> (i, j, k)
        ijk = to_ijk[:, 0, None, None] * c_idx + to_ijk[:, 1, None, None] * r_idx + to_ijk[:, 2, None, None]
        nearest = np.rint(ijk)
        off = float(np.max(np.abs(ijk - nearest)))
        if off > GRID_TOLERANCE_VOXELS:
            raise GeometryMismatchError(labels.meta.source, f"label map is not on the source series' voxel grid "
                                                            f"(source image {n + 1} is {off:.2f} voxels off)")
        index = nearest.astype(np.int64)
        if np.any(index < 0) or np.any(index >= shape[:, None, None]):
            raise GeometryMismatchError(labels.meta.source, f"source image {n + 1} lies outside the label map")
        out[n] = labels.array[index[0], index[1], index[2]]
    return out


# ---- SEG ----------------------------------------------------------------------------------------
def write_dicom_seg(labels: Volume, source_series_dir: str | Path, schema: LabelSchema, out_path: str | Path, *,
                    series_uid: str | None = None, automatic: bool = True, algorithm_name: str = SOFTWARE,
                    series_number: int = SEG_SERIES_NUMBER) -> Path:
    """Write a DICOM Segmentation (binary, one segment per non-empty structure) of ``labels``.

    Args:
        labels: label map on the source series' grid (any axis order, e.g. as read by
            :func:`bml_pipeline.io.read_labels` or produced by segmentation of ``read_volume(dir)``).
        source_series_dir: folder of the source DICOM series.
        schema: the label map's schema (segment names, codes, colours).
        out_path: the ``.dcm`` file to write (atomically).
        series_uid: the source series, when the folder holds several (default: ``labels.meta.extra
            ['series_uid']`` when the volume was read from DICOM, else the folder's only series).
        automatic: the labels come from the segmentation model (SegmentAlgorithmType AUTOMATIC, with
            Segmentation Algorithm Identification); False for user-supplied label maps (MANUAL).
        algorithm_name: algorithm name recorded when ``automatic`` (e.g. the model id).
        series_number: Series Number of the new SEG series.

    Returns ``out_path``. Frames that hold no segment are left out (highdicom's default).

    Raises:
        InputError: no source images, label values outside ``schema``, an empty label map.
        GeometryMismatchError: labels not on the source series' grid.
    """
    hd = _highdicom()
    from bml_pipeline import __version__

    out_path = Path(out_path)
    schema.check_values(labels.array, labels.meta.source)
    sources = read_source_series(source_series_dir, series_uid or labels.meta.extra.get("series_uid"))
    frames = source_frame_labels(labels, sources)
    present = set(present_values(frames)) - {schema.background}
    structures = [s for s in sorted(schema.structures, key=lambda s: s.id) if s.id in present]
    if not structures:
        raise InputError(labels.meta.source, "label map is empty: no segment to export to DICOM SEG")
    lut = np.zeros(max(schema.ids) + 1, dtype=np.uint8 if len(structures) < 256 else np.uint16)
    for number, s in enumerate(structures, start=1):
        lut[s.id] = number
    pixel_array = lut[frames]

    colours = structure_colours(schema)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64], version=__version__[:64],
        family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence")) if automatic else None
    descriptions = []
    for number, s in enumerate(structures, start=1):
        codes = structure_codes(s)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=s.name[:64],
            segmented_property_category=codes.category.code(),
            segmented_property_type=codes.type.code(),
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if automatic
                            else hd.seg.SegmentAlgorithmTypeValues.MANUAL),
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=s.name[:64],
            anatomic_regions=[codes.region.code()],
            primary_anatomic_structures=[codes.structure.code()] if codes.structure else None,
            display_color=hd.color.CIELabColor(*rgb_to_cielab(colours[s.id])),
        ))
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=SOFTWARE,
        software_versions=__version__[:64],
        device_serial_number="1",
        content_label="KNEE_LABELS",
        content_description="Knee bones, cartilage plates and bone marrow lesions",
        content_creator_name=None,
        series_description=f"{SOFTWARE} segmentation"[:64],
    )
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return out_path


# ---- SR -----------------------------------------------------------------------------------------
def write_dicom_sr(measurements: dict[str, Any], source_series_dir: str | Path, out_path: str | Path, *,
                   schema: LabelSchema | None = None, series_uid: str | None = None,
                   seg_path: str | Path | None = None, series_number: int = SR_SERIES_NUMBER) -> Path:
    """Write a Comprehensive 3D SR holding a TID 1500 Measurement Report of the key measurements.

    One measurement group per bone with a lesion label (bone marrow lesion volume, cm3, also when 0) and
    per cartilage plate (volume, cm3; mean thickness, mm), each with its finding site (the bone, with the
    knee's laterality when known). Structures that are absent (``None`` in ``measurements``) are left out.

    Args:
        measurements: ``Measurements.to_dict()`` (the ``measurements.json`` content).
        source_series_dir: folder of the source DICOM series (evidence and image library).
        out_path: the ``.dcm`` file to write (atomically).
        schema: label schema (default ``oai_zib``): which lesion and plate belong to which bone.
        series_uid: the source series, when the folder holds several (default: the series the SEG at
            ``seg_path`` references, else the folder's only series).
        seg_path: a SEG written by :func:`write_dicom_seg`: groups then reference their segment (TID 1411
            volumetric ROI groups) and the SEG is part of the evidence.
        series_number: Series Number of the new SR series.

    Raises:
        InputError: no source images, nothing to report.
    """
    hd = _highdicom()
    import pydicom

    from bml_pipeline import __version__

    out_path = Path(out_path)
    schema = schema or load_schema("oai_zib")
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True) if seg_path is not None else None
    if series_uid is None and seg is not None and "ReferencedSeriesSequence" in seg:
        series_uid = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    sources = read_source_series(source_series_dir, series_uid)
    source_series = str(sources[0].SeriesInstanceUID)
    segments = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence} if seg else {}

    laterality = {"left": LEFT, "right": RIGHT}.get(str(measurements.get("side")))
    algorithm = hd.sr.AlgorithmIdentification(name=SOFTWARE, version=__version__[:64])

    def finding_site(bone: str) -> Any:
        region = BONE_CONCEPTS.get(bone, KNEE_JOINT)
        return hd.sr.FindingSite(region.code(), laterality=laterality.code() if laterality else None)

    def group(structure: Structure, bone: str, items: list[Any]) -> Any:
        codes = structure_codes(structure)
        common: dict[str, Any] = {
            "tracking_identifier": hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=structure.name),
            "finding_type": codes.type.code(), "finding_category": codes.category.code(),
            "algorithm_id": algorithm, "finding_sites": [finding_site(bone)], "measurements": items,
        }
        if seg is not None and structure.name in segments:
            referenced = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=segments[structure.name],
                source_series=hd.sr.SourceSeriesForSegmentation(source_series))
            return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=referenced, **common)
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)

    def volume_item(value: float) -> Any:
        return hd.sr.Measurement(name=VOLUME.code(), value=float(value), unit=CUBIC_CENTIMETER.code())

    groups = []
    bml = measurements.get("bml") or {}
    for bone in schema.bones:
        lesion = schema.lesion_of(bone.name)
        entry = bml.get(bone.name)
        volume = _number(entry.get("volume_cm3")) if isinstance(entry, dict) else None
        if lesion is None or volume is None:
            continue
        groups.append(group(lesion, bone.name, [volume_item(volume)]))
    cartilage = measurements.get("cartilage") or {}
    for plate in schema.of_kind("cartilage"):
        entry = cartilage.get(plate.name)
        if not isinstance(entry, dict):
            continue
        items = []
        volume = _number(entry.get("volume_cm3"))
        if volume is not None:
            items.append(volume_item(volume))
        mean = _number((entry.get("thickness_mm") or {}).get("mean"))
        if mean is not None:
            items.append(hd.sr.Measurement(name=THICKNESS.code(), value=mean, unit=MILLIMETER.code(),
                                           derivation=MEAN.code()))
        if items:
            groups.append(group(plate, plate.bone or "", items))
    if not groups:
        raise InputError(out_path, "no bone marrow lesion or cartilage measurement to report")

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=pydicom.uid.generate_uid(entropy_srcs=[SOFTWARE]), name=SOFTWARE, model_name=SOFTWARE,
            manufacturer_name=SOFTWARE))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE.code(),
        imaging_measurements=groups,
        referenced_images=sources,
    )
    evidence = list(sources) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"{SOFTWARE} measurements"[:64],
    )
    with atomic_path(out_path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return out_path


def rgb_to_cielab(rgb: Sequence[int]) -> tuple[float, float, float]:
    """CIE L*a*b* (D65 white) of an sRGB colour with 0-255 components, for Recommended Display CIELab
    Value (highdicom before 0.25 has no ``CIELabColor.from_rgb``)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                    [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) @ linear
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return (float(np.clip(lab[0], 0.0, 100.0)), float(np.clip(lab[1], -128.0, 127.0)),
            float(np.clip(lab[2], -128.0, 127.0)))


def _number(value: Any) -> float | None:
    """``value`` as a finite float; None for None, NaN, Inf, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
