"""Segmentation stage: a MONAI network trained on synthesized images, run through :class:`Predictor`.

``Predictor.load(name_or_path, device="auto").segment(image, tta=False)`` -> oai_zib label ``Volume``
on the image's grid. Torch and MONAI are imported only when a network is built or run.
"""

from bml_pipeline.segment.predictor import Predictor, resolve_device

__all__ = ["Predictor", "resolve_device"]
