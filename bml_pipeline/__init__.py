"""bml_pipeline: bone marrow lesion and cartilage measurement for knee MRI, in physical units.

The Python API (each stage's entry point; heavy modules are imported on first use):

- :func:`read_volume`, :func:`read_labels`: an image or label map as a :class:`Volume` (RAS mm);
- :func:`load_schema`: a label schema (``"oai_zib"``);
- :class:`Predictor`: ``Predictor.load("knee_synth_v1").segment(image)`` -> labels;
- :func:`measure_labels`: volumes, lesions, subregions, thickness and QC of a label map;
- :func:`process_scan`: the whole per-scan job into a run directory;
- :func:`compare_runs`: ``change.json`` content for two run directories of one knee;
- :func:`make_phantom`, :class:`KneeSpec`: a phantom knee whose answers are known.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("bml-pipeline")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

_API = {
    "Volume": "bml_pipeline.volume",
    "read_volume": "bml_pipeline.io",
    "read_labels": "bml_pipeline.io",
    "load_schema": "bml_pipeline.labels",
    "Predictor": "bml_pipeline.segment",
    "measure_labels": "bml_pipeline.measure",
    "process_scan": "bml_pipeline.pipeline",
    "compare_runs": "bml_pipeline.longitudinal.runs",
    "make_phantom": "bml_pipeline.synth.phantom",
    "KneeSpec": "bml_pipeline.synth.phantom",
}
__all__ = ["KneeSpec", "Predictor", "Volume", "__version__", "compare_runs", "load_schema", "make_phantom",
           "measure_labels", "process_scan", "read_labels", "read_volume"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'bml_pipeline' has no attribute {name!r}")
