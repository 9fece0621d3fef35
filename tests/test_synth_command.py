"""``bml-pipeline synth``: writes complete outputs or nothing, and explains bad input in one line."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from bml_pipeline.cli import main


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_phantom_writes_labels_image_and_truth(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["synth", "phantom", str(out), "--spacing", "1.5", "1.2", "1.2", "--rotation", "3", "0", "-4",
                 "--side", "left", "--snr", "15"]) == 0
    assert _files(out) == ["image.nii.gz", "labels.nii.gz", "truth.json"]
    truth = json.loads((out / "truth.json").read_text())
    labels = nib.load(out / "labels.nii.gz")
    image = nib.load(out / "image.nii.gz")
    assert truth["side"] == "left" and truth["pose"]["rotation_deg"] == [3.0, 0.0, -4.0]
    assert labels.shape == image.shape == tuple(truth["shape"])
    np.testing.assert_allclose(labels.header.get_zooms(), (1.5, 1.2, 1.2), rtol=1e-6)
    vox = float(np.prod(labels.header.get_zooms())) / 1000
    arr = np.asarray(labels.dataobj)
    assert np.count_nonzero(arr == 1) * vox == pytest.approx(truth["structures"]["femur"]["rasterized_cm3"])
    assert "femoral_cartilage" in capsys.readouterr().out


def test_pair_writes_two_visits_and_a_manifest(tmp_path):
    out = tmp_path / "pair"
    assert main(["synth", "pair", str(out), "--spacing", "1.5", "1.5", "1.5", "--bml-change", "femur=-2.1",
                 "--thickness-change", "femoral_cartilage=2.4", "--seed", "3"]) == 0
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["visit"] for r in rows] == ["00m", "12m"]
    assert list(rows[0]) == ["subject", "visit", "image", "labels", "side"]
    for row in rows:
        assert (out / row["image"]).is_file() and (out / row["labels"]).is_file()
    change = json.loads((out / "phantom01" / "12m" / "truth.json").read_text())["change"]
    assert change["bml"]["femur"]["delta_cm3"] == pytest.approx(-2.1, abs=1e-9)
    assert change["cartilage"]["femoral_cartilage"]["delta_percent"] == pytest.approx(2.4, abs=1e-9)
    assert len(change["transform"]["matrix"]) == 4
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_image_from_a_label_map_on_a_new_grid(tmp_path):
    from bml_pipeline.io import write_nifti
    from bml_pipeline.synth.phantom import KneeSpec, make_phantom

    src = tmp_path / "labels.nii.gz"
    write_nifti(make_phantom(KneeSpec(), spacing=(1.5, 1.5, 1.5)).labels, src)
    assert main(["synth", "image", str(src), str(tmp_path / "t1.nii.gz"), "--preset", "t1",
                 "--spacing", "3", "1.5", "1.5", "--labels-out", str(tmp_path / "t1_labels.nii.gz")]) == 0
    image, labels = nib.load(tmp_path / "t1.nii.gz"), nib.load(tmp_path / "t1_labels.nii.gz")
    assert image.shape == labels.shape
    np.testing.assert_allclose(image.header.get_zooms(), (3.0, 1.5, 1.5), rtol=1e-6)
    np.testing.assert_allclose(image.affine, labels.affine)


@pytest.mark.parametrize("argv,message", [
    (["synth", "image", "{tmp}/missing.nii.gz", "{tmp}/out/image.nii.gz"], "missing.nii.gz: file not found"),
    (["synth", "change", "{labels}", "{tmp}/out", "--bml-change", "femur"], "must look like NAME=NUMBER"),
    (["synth", "change", "{labels}", "{tmp}/out", "--bml-change", "femur=-5"], "cannot shrink the femur"),
    (["synth", "change", "{labels}", "{tmp}/out", "--thickness-change", "meniscus=3"], "no cartilage plate"),
    (["synth", "change", "{notlabels}", "{tmp}/out"], "not in label schema"),
    (["synth", "image", "{labels}", "{tmp}/out/image.nii.gz", "--spacing", "1", "1", "1"], "--labels-out"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys, argv, message):
    from bml_pipeline.io import write_nifti
    from bml_pipeline.volume import Volume

    arr = np.zeros((20, 20, 20), np.uint16)
    arr[5:15, 5:15, 5:12] = 1
    arr[8:12, 8:12, 6:9] = 7
    arr[5:15, 5:15, 12:14] = 2
    write_nifti(Volume(arr, np.diag([0.5, 0.5, 0.5, 1.0])), tmp_path / "labels.nii.gz")
    write_nifti(Volume((arr * 13).astype(np.uint16), np.eye(4)), tmp_path / "notlabels.nii.gz")
    values = {"tmp": str(tmp_path), "labels": str(tmp_path / "labels.nii.gz"),
              "notlabels": str(tmp_path / "notlabels.nii.gz")}
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "out").exists()


def test_change_command_writes_follow_up_and_truth(tmp_path):
    from bml_pipeline.io import write_nifti
    from bml_pipeline.volume import Volume

    arr = np.zeros((30, 30, 30), np.uint16)
    arr[5:25, 5:25, 5:18] = 1
    arr[10:16, 10:16, 12:16] = 7
    arr[5:25, 5:25, 18:21] = 2
    write_nifti(Volume(arr, np.diag([0.5, 0.4, 0.4, 1.0])), tmp_path / "labels.nii.gz")
    assert main(["synth", "change", str(tmp_path / "labels.nii.gz"), str(tmp_path / "fu"), "--bml-change",
                 "femur=0.01", "--thickness-change", "femoral_cartilage=10", "--rotation", "0", "0", "5"]) == 0
    truth = json.loads((tmp_path / "fu" / "truth.json").read_text())
    assert truth["bml"]["femur"]["delta_cm3"] == pytest.approx(0.01, abs=0.5 * 0.5 * 0.4 * 0.4 / 1000)
    assert truth["cartilage"]["femoral_cartilage"]["achieved_thickness_change_percent"] == pytest.approx(10, abs=0.1)
    assert truth["transform"]["rotation_deg"] == pytest.approx(5.0)
    follow = nib.load(tmp_path / "fu" / "labels.nii.gz")
    assert np.count_nonzero(np.asarray(follow.dataobj) == 7) == np.count_nonzero(arr == 7) + 125
