"""QC on the real DESS knee (slow: segments it): the shipped early model ``knee_synth_v1`` mislabels it
(a "patella" in the thigh, femur stopping part-way), and QC must say so."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_qc_fails_on_the_early_models_labels_of_the_real_knee(dess_dicom_dir: Path) -> None:
    from bml_pipeline.io import read_volume
    from bml_pipeline.labels import load_schema
    from bml_pipeline.measure.volumes import check_label_values, structure_volumes
    from bml_pipeline.qc import check_labels
    from bml_pipeline.segment import Predictor

    schema = load_schema("oai_zib")
    predictor = Predictor.load("knee_synth_v1", device="cpu")
    labels = predictor.segment(read_volume(dess_dicom_dir / "echo1"))
    volumes = structure_volumes(labels, schema, check_label_values(labels, schema))
    qc = check_labels(labels, schema, volumes, predictor.quality.get("confidence"))
    assert qc.status == "fail"
    assert "patella" in qc.unreliable
    assert "the patella is" in qc.summary()
