"""``measure_labels``: every number of one scan (volumes, lesions, subregions, thickness) in one result,
and ``write_measurements``: its files (``measurements.json``/``.csv``, ``provenance.json``, thickness maps).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema
from bml_pipeline.measure.config import MeasureConfig
from bml_pipeline.measure.frame import bone_point_sets, knee_axes
from bml_pipeline.measure.lesions import LesionSet, find_lesions
from bml_pipeline.measure.side import SideEstimate, estimate_side
from bml_pipeline.measure.subregions import BONE_REGIONS, CARTILAGE_REGIONS, SubregionModel, build_subregions
from bml_pipeline.measure.thickness import ThicknessResult, available_threads, cartilage_thickness
from bml_pipeline.measure.threads import blas_single_threaded
from bml_pipeline.measure.volumes import MM3_PER_CM3, check_label_values, structure_volumes
from bml_pipeline.qc import Check, QcResult, check_labels
from bml_pipeline.volume import Volume

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
BONE_VOLUME_STEP = 2


def moaks_grade(percent: float, volume_cm3: float) -> int:
    """MOAKS BML size grade from the percent of the subregion's bone volume: 0 none, 1 < 33 %,
    2 33-66 %, 3 > 66 %."""
    if volume_cm3 <= 0:
        return 0
    return 1 if percent < 100.0 / 3.0 else 2 if percent <= 200.0 / 3.0 else 3


@dataclass(frozen=True)
class Measurements:
    """Everything measured on one label map.

    ``to_dict()`` is the ``measurements.json`` content (DESIGN.md schema), ``flat_row()`` the CSV row.
    ``thickness`` keeps each plate's per-point thickness and map (not serialised); ``timings_s`` the
    seconds per step (they go to provenance.json, never into measurements).
    """

    side: SideEstimate
    spacing_mm: tuple[float, float, float]
    structures: dict[str, float | None]
    bml: dict[str, dict[str, Any] | None]
    cartilage: dict[str, dict[str, Any] | None]
    anatomy: dict[str, Any] | None
    config: MeasureConfig
    qc: QcResult | None = None
    thickness: dict[str, ThicknessResult] = field(default_factory=dict, compare=False)
    timings_s: dict[str, float] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready measurements, floats rounded to ``config.decimals``."""
        present = [b["volume_cm3"] for b in self.bml.values() if b is not None]
        raw = {
            "schema_version": SCHEMA_VERSION,
            "side": self.side.side,
            "side_source": self.side.source,
            "side_confidence": self.side.confidence,
            "side_conflict": self.side.conflict,
            "spacing_mm": list(self.spacing_mm),
            "structures": {name: {"volume_cm3": v} for name, v in self.structures.items()},
            "bml": {**self.bml, "total_volume_cm3": float(sum(present)) if present else None},
            "cartilage": self.cartilage,
            "anatomy": self.anatomy,
            "qc": self.qc.to_dict() if self.qc is not None else None,
        }
        return _rounded(raw, self.config.decimals)

    def to_json(self) -> str:
        """``measurements.json`` text: sorted keys, fixed rounding, so reruns are byte-identical."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def flat_row(self) -> dict[str, Any]:
        """One flat row (column -> value) of the same numbers; lists (single lesions) and the anatomy
        block are left out, ``None`` stays ``None``."""
        data = self.to_dict()
        data.pop("anatomy", None)
        qc = data.pop("qc", None) or {}
        row: dict[str, Any] = {}
        _flatten(data, "", row)
        row["qc_status"] = qc.get("status")
        row["qc_unreliable"] = ";".join(qc.get("unreliable", []))
        return row

    def to_csv(self) -> str:
        """``measurements.csv`` text: a header and one row."""
        row = self.flat_row()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(list(row))
        writer.writerow(["" if v is None else v for v in row.values()])
        return buffer.getvalue()


def measure_labels(labels: Volume, schema: LabelSchema, *, side: str | None = None, image: Volume | None = None,
                   config: MeasureConfig | None = None,
                   segmentation_quality: dict[str, dict[str, float]] | None = None) -> Measurements:
    """Measure a label map: structure volumes, BML per bone (lesions, MOAKS subregions and grades) and
    cartilage thickness per plate (distribution and subregion means), all in physical units.

    Args:
        labels: label map (values of ``schema``), any orientation and spacing.
        schema: its label schema.
        side: "left"/"right" when known; else taken from the image's or the labels' metadata, else
            inferred from anatomy (see :mod:`~bml_pipeline.measure.side`).
        image: the image the labels belong to (checked to share the grid; its laterality is used).
        config: measure configuration (defaults when None).
        segmentation_quality: the segmentation stage's per-structure ``confidence`` and
            ``tta_agreement`` (see :class:`~bml_pipeline.segment.predictor.Predictor`), for QC.

    Raises:
        InputError: values not in the schema, image on another grid, an empty map, a cartilage plate or
            lesion without its bone, or a lesion that does not touch its bone.
    """
    with blas_single_threaded():  # the stage spreads its work over its own threads (see .threads)
        return _measure_labels(labels, schema, side, image, config, segmentation_quality)


def _measure_labels(labels: Volume, schema: LabelSchema, side: str | None, image: Volume | None,
                    config: MeasureConfig | None,
                    segmentation_quality: dict[str, dict[str, float]] | None) -> Measurements:
    config = config or MeasureConfig()
    source = labels.meta.source
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    if side not in (None, "left", "right"):
        raise InputError(source, f"side must be 'left' or 'right', got {side!r}")
    counts = check_label_values(labels, schema)
    if labels.array.dtype.kind != "u":  # e.g. whole numbers stored as float: index-safe from here on
        labels = labels.with_array(labels.array.astype(np.uint16))
    if image is not None:
        labels.require_same_grid(image, "image and label map")
    volumes = structure_volumes(labels, schema, counts)
    _check_structures(volumes, schema, source)
    lap("volumes")

    # Cartilage thickness needs only the labels: the plates start now, on their own threads, while this
    # thread does QC, anatomy and lesions (the heavy steps of both release the GIL). Every number is
    # the same as when they ran one after the other.
    plates = [p.name for p in schema.of_kind("cartilage")
              if volumes.get(p.name) is not None and p.bone is not None and volumes.get(p.bone) is not None]

    def plate_thickness(name: str) -> tuple[ThicknessResult, float]:
        start = time.perf_counter()
        return cartilage_thickness(labels, schema, name, config=config), time.perf_counter() - start

    thickness_start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=min(available_threads(), max(len(plates), 1)))
    try:
        futures = {name: pool.submit(plate_thickness, name) for name in plates}  # largest plate first
        quality = segmentation_quality or {}
        qc = check_labels(labels, schema, volumes, quality.get("confidence"), quality.get("tta_agreement"),
                          quality.get("not_segmented"))
        lap("qc")

        points = bone_point_sets(labels, schema)
        axes = knee_axes(labels, schema, points)
        side_estimate = estimate_side(labels, schema, side=side, axes=axes, points=points,
                                      metadata_side=image.meta.laterality if image is not None else None)
        if side_estimate.conflict:
            qc = QcResult((*qc.checks, Check("side", "warn", side_estimate.conflict)), qc.metrics)
        model = (build_subregions(axes, side_estimate.side, points)
                 if axes is not None and side_estimate.side else None)
        if model is None:
            log.warning("%s: no anatomical frame or side; subregions are left out", source)
        lap("anatomy")

        bml: dict[str, dict[str, Any] | None] = {}
        for bone in schema.bones:
            lesion = schema.lesion_of(bone.name)
            not_segmented = lesion is not None and lesion.name in (quality.get("not_segmented") or ())
            if volumes.get(bone.name) is None or lesion is None or not_segmented:  # null: not measured
                bml[bone.name] = None
                continue
            if volumes.get(lesion.name) is None:
                found = LesionSet((), np.zeros(labels.shape, dtype=bool), 0.0, (slice(0, 0),) * 3)
            else:
                found = find_lesions(labels, lesion.id, bone.id, min_volume_mm3=config.min_lesion_volume_mm3,
                                     connectivity=config.lesion_connectivity, name=lesion.name)
            bml[bone.name] = _bone_bml(labels, schema, bone.name, found, model)
        lap("lesions")
        results = {name: future.result() for name, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    cartilage: dict[str, dict[str, Any] | None] = {}
    thickness: dict[str, ThicknessResult] = {}
    for plate in schema.of_kind("cartilage"):
        if plate.name not in results:
            cartilage[plate.name] = None
            continue
        result, seconds = results[plate.name]
        thickness[plate.name] = result
        cartilage[plate.name] = _plate_entry(result, volumes[plate.name], plate.bone, model)
        timings[f"thickness_{plate.name}"] = seconds  # each plate's own wall time (plates run concurrently)
    lap("thickness_wait")  # thickness left to finish after the lesions
    timings["thickness"] = time.perf_counter() - thickness_start  # all plates, alongside qc/anatomy/lesions

    anatomy = None
    if axes is not None:
        anatomy = {"side_votes_mm": side_estimate.votes, **(model.to_dict() if model else {"axes": axes.to_dict()})}
    return Measurements(side=side_estimate, spacing_mm=labels.spacing, structures=volumes, bml=bml,
                        cartilage=cartilage, anatomy=anatomy, config=config, qc=qc, thickness=thickness,
                        timings_s=timings)


def _check_structures(volumes: dict[str, float | None], schema: LabelSchema, source: str | None) -> None:
    if all(v is None for v in volumes.values()):
        raise InputError(source, "label map is empty: it holds no labelled structure")
    for s in schema.structures:
        if s.bone is not None and volumes.get(s.name) is not None and volumes.get(s.bone) is None:
            raise InputError(source, f"{s.name} (label {s.id}) is present but its bone {s.bone} "
                                     f"(label {schema.by_name(s.bone).id}) is not")


def _bone_bml(labels: Volume, schema: LabelSchema, bone: str, found: LesionSet,
              model: SubregionModel | None) -> dict[str, Any]:
    voxel_mm3 = labels.voxel_volume_mm3
    entry: dict[str, Any] = {
        "volume_cm3": found.volume_mm3 / MM3_PER_CM3,
        "lesion_count": len(found.lesions),
        "ignored_volume_cm3": found.ignored_volume_mm3 / MM3_PER_CM3,
        "lesions": [{"volume_cm3": les.volume_mm3 / MM3_PER_CM3, "centroid_mm": list(les.centroid_mm),
                     "diameter_mm": les.diameter_mm} for les in found.lesions],
        "subregions": {},
    }
    if model is None or bone not in model.bounds:
        return entry
    names = BONE_REGIONS[bone]
    lut = np.zeros(max(schema.ids) + 1, dtype=bool)
    lut[list(schema.bone_ids(bone))] = True
    # Subregion bone volumes from every second voxel along each axis (x 8): the MOAKS grade only
    # needs the percentage, and this is 8 times less work than every voxel (error well below 1 %).
    step = BONE_VOLUME_STEP
    sub_ijk = np.nonzero(lut[labels.array[::step, ::step, ::step]])
    bone_region = model.classify_voxels(bone, labels.affine, tuple(i * step for i in sub_ijk))
    bone_counts = step ** 3 * np.bincount(bone_region[bone_region >= 0], minlength=len(names))
    lesion_region = model.classify_voxels(bone, labels.affine, found.mask_indices())
    lesion_counts = np.bincount(lesion_region[lesion_region >= 0], minlength=len(names))
    entry["outside_subregions_cm3"] = float(np.count_nonzero(lesion_region < 0) * voxel_mm3 / MM3_PER_CM3)
    for i, name in enumerate(names):
        volume = lesion_counts[i] * voxel_mm3 / MM3_PER_CM3
        percent = min(100.0, 100.0 * lesion_counts[i] / bone_counts[i]) if bone_counts[i] else 0.0
        entry["subregions"][name] = {"volume_cm3": float(volume), "percent_of_subregion": float(percent),
                                     "grade": moaks_grade(percent, volume),
                                     "bone_volume_cm3": float(bone_counts[i] * voxel_mm3 / MM3_PER_CM3)}
    return entry


def _plate_entry(result: ThicknessResult, volume_cm3: float | None, bone: str,
                 model: SubregionModel | None) -> dict[str, Any]:
    stats = result.stats
    entry: dict[str, Any] = {
        "volume_cm3": volume_cm3,
        "interface_area_mm2": stats.area_mm2 if stats else None,
        "thickness_mm": stats.to_dict() if stats else None,
        "subregions": {},
    }
    if model is None or bone not in model.bounds or stats is None:
        return entry
    region = model.classify(bone, result.points_mm, clip_height=False)
    names = BONE_REGIONS[bone]
    for name, parts in CARTILAGE_REGIONS[bone].items():
        select = np.isin(region, [names.index(p) for p in parts])
        entry["subregions"][name] = {"thickness_mean_mm": result.mean_in(select)}
    return entry


def _rounded(value: Any, decimals: int) -> Any:
    """Floats rounded (NaN/Inf -> None), numpy scalars made plain, containers recursed."""
    if isinstance(value, dict):
        return {str(k): _rounded(v, decimals) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, decimals) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            return None
        r = round(f, decimals)
        return 0.0 if r == 0 else r  # no "-0.0"
    return value


def _flatten(value: Any, prefix: str, row: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), row)
    elif isinstance(value, list):
        if prefix.endswith("lesions"):
            return
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}.{i}", row)
    else:
        row[prefix] = value


def write_measurements(out_dir: str | Path, measurements: Measurements, provenance: dict[str, Any]) -> None:
    """Write ``measurements.json``, ``measurements.csv``, ``provenance.json`` and one thickness map per
    plate (``thickness_<plate>.nii.gz``, mm, float32) into ``out_dir``.

    All text is rendered before anything is written, and each file is written atomically (temporary
    file + rename), so a failure never leaves a half-written file.
    """
    from bml_pipeline.io import write_text_atomic
    from bml_pipeline.measure.mapfile import write_cropped_map

    out = Path(out_dir)
    texts = {
        "measurements.json": measurements.to_json(),
        "measurements.csv": measurements.to_csv(),
        "provenance.json": json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n",
    }
    out.mkdir(parents=True, exist_ok=True)
    # Each map is streamed from its plate's box (the full-grid file write_nifti would write, in a few
    # ms); zlib releases the GIL, so the maps are written on up to available_threads() threads.
    maps = sorted(measurements.thickness.items())

    def write_map(item: tuple[str, ThicknessResult]) -> None:
        name, result = item
        write_cropped_map(out / f"thickness_{name}.nii.gz", result.map_crop, result.map_box, result.grid)

    threads = min(available_threads(), len(maps))
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(write_map, maps))
    else:
        for item in maps:
            write_map(item)
    for name, text in texts.items():
        write_text_atomic(out / name, text)
