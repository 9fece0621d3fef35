"""Volumetry: structure volumes, bone marrow lesions with MOAKS subregions, cartilage thickness.

Public API (all lengths in mm, volumes in cm3, coordinates world RAS mm):

- ``measure_labels(labels, schema, *, side=None, image=None, config=None) -> Measurements``: every
  number of one label map; ``Measurements.to_dict()`` is the ``measurements.json`` schema of
  DESIGN.md, ``.flat_row()`` the CSV row, ``.thickness[plate]`` the per-point thickness results.
- ``write_measurements(out_dir, measurements, provenance) -> None``: measurements.json/.csv,
  provenance.json and ``thickness_<plate>.nii.gz`` maps, each written atomically.
- ``cartilage_thickness(labels, schema, plate, *, config=None, region=None) -> ThicknessResult``:
  thickness at every bone-cartilage interface point (``thickness_mm``, ``points_mm``, ``areas_mm2``),
  area-weighted ``stats`` and a ``thickness_map`` Volume; ``region`` (bool mask on the label grid)
  restricts which interface points count.
- ``infer_side(labels, schema) -> (side, confidence)``: "left"/"right"/None from anatomy.
- ``MeasureConfig`` / ``load_measure_config(path)``: configuration (YAML ``measure:`` section).
- ``skeleton_edt_thickness(mask, spacing)``: the plain 2 x EDT-on-skeleton reference, for comparison.
"""

from bml_pipeline.measure.config import MeasureConfig, load_measure_config
from bml_pipeline.measure.measurements import Measurements, measure_labels, moaks_grade, write_measurements
from bml_pipeline.measure.side import SideEstimate, infer_side
from bml_pipeline.measure.thickness import (
    ThicknessResult,
    ThicknessStats,
    cartilage_thickness,
    skeleton_edt_thickness,
)

__all__ = [
    "MeasureConfig",
    "Measurements",
    "SideEstimate",
    "ThicknessResult",
    "ThicknessStats",
    "cartilage_thickness",
    "infer_side",
    "load_measure_config",
    "measure_labels",
    "moaks_grade",
    "skeleton_edt_thickness",
    "write_measurements",
]
