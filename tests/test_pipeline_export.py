"""What a run leaves for viewers and PACS: colour tables and the label intent beside segmented labels,
and for DICOM input a DICOM SEG and SR referencing the source series (read back with highdicom/pydicom)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bml_pipeline.cli import main

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")


def test_run_on_a_dicom_series_writes_seg_and_sr_referencing_it(tmp_path: Path) -> None:
    from dicom_factory import write_series

    from bml_pipeline.io import read_volume, write_nifti
    from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom

    series = tmp_path / "dicom"
    uid = "1.2.826.0.1.3680043.8.498.7"
    write_series(series, n_slices=116, rows=130, cols=180, spacing=(1.0, 1.0), slice_step=1.0, series_uid=uid)
    image = read_volume(series)
    # The DICOM grid is sagittal LPS, centred away from the origin: place the knee at the grid's centre.
    centre = image.world_coords((np.array(image.shape) - 1) / 2)
    labels = make_phantom(KneeSpec(pose=Pose(translation_mm=tuple(float(c) for c in centre))),
                          shape=image.shape, affine=image.affine).labels
    write_nifti(labels, tmp_path / "labels.nii.gz")
    out = tmp_path / "run"
    assert main(["-q", "run", str(series), "--labels", str(tmp_path / "labels.nii.gz"), "--out", str(out),
                 "--no-report"]) == 0
    seg = pydicom.dcmread(out / "labels_seg.dcm")
    sr = pydicom.dcmread(out / "measurements_sr.dcm")
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert uid in str(sr)
    names = {s.SegmentLabel for s in seg.SegmentSequence}
    assert {"femur", "tibia", "femoral_cartilage"} <= {n.lower().replace(" ", "_") for n in names}


def test_segmented_labels_carry_colour_tables_and_label_intent(tmp_path: Path) -> None:
    import nibabel as nib
    import torch

    from bml_pipeline.io import write_nifti
    from bml_pipeline.segment.config import InferenceConfig, ModelConfig, NetworkConfig
    from bml_pipeline.segment.network import build_network
    from bml_pipeline.segment.weights import save_weights
    from bml_pipeline.volume import Volume

    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", working_spacing_mm=2.0, network=NetworkConfig(channels=(4, 8), strides=(2,),
                      num_res_units=0), inference=InferenceConfig(roi_size=(16, 16, 16), slab_voxels=2000))
    weights = tmp_path / "tiny.safetensors"
    save_weights(weights, build_network(cfg), cfg)
    image = tmp_path / "image.nii.gz"
    write_nifti(Volume(np.random.default_rng(0).normal(100, 10, (20, 20, 20)).astype(np.float32), np.eye(4)), image)
    out = tmp_path / "seg"
    assert main(["-q", "segment", str(image), "--out", str(out), "--model", str(weights), "--device", "cpu"]) == 0
    assert int(nib.load(out / "labels.nii.gz").header["intent_code"]) == 1002
    ctbl = (out / "labels.ctbl").read_text()
    assert any(line.split()[:2] == ["1", "femur"] for line in ctbl.splitlines() if not line.startswith("#"))
    itksnap = [line for line in (out / "labels_itksnap.txt").read_text().splitlines() if not line.startswith("#")]
    assert itksnap[0].split()[0] == "0" and itksnap[0].endswith('"Clear Label"')
    assert len(itksnap) == 10 and all(row.split()[0] == str(i) for i, row in enumerate(itksnap))
