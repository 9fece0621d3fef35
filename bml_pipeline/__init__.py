"""bml_pipeline: bone marrow lesion and cartilage measurement for knee MRI, in physical units."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bml-pipeline")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
