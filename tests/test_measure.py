"""Volumetry stage: volumes from the affine, lesions, subregions, side, outputs, bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from bml_pipeline.cli import main
from bml_pipeline.errors import GeometryMismatchError, InputError
from bml_pipeline.io import read_labels, write_nifti
from bml_pipeline.labels import load_schema
from bml_pipeline.measure import (
    MeasureConfig,
    infer_side,
    load_measure_config,
    measure_labels,
    moaks_grade,
    write_measurements,
)
from bml_pipeline.measure.config import DEFAULT_CONFIG_PATH
from bml_pipeline.measure.lesions import find_lesions
from bml_pipeline.provenance import provenance_record, sha256_path
from bml_pipeline.synth.plates import lesion_block
from bml_pipeline.volume import Volume, VolumeMeta

SCHEMA = load_schema("oai_zib")
# Oblique, anisotropic grid: 0.4 x 0.5 x 0.8 mm voxels rotated 30 degrees about z.
_C, _S = np.cos(np.radians(30)), np.sin(np.radians(30))
OBLIQUE = np.array([[0.4 * _C, -0.5 * _S, 0, 10], [0.4 * _S, 0.5 * _C, 0, -20], [0, 0, 0.8, 5], [0, 0, 0, 1.0]])


def toy_knee(source: str = "toy.nii.gz") -> Volume:
    """Femur (with a lesion) above tibia, cartilage on both, a patella in front: boxes on OBLIQUE."""
    a = np.zeros((60, 50, 70), dtype=np.uint16)
    a[5:55, 10:40, 38:68] = 1    # femur
    a[5:55, 10:40, 35:38] = 2    # femoral cartilage
    a[5:55, 10:40, 31:34] = 4    # tibial cartilage
    a[5:55, 10:40, 2:31] = 3     # tibia
    a[20:40, 43:48, 40:55] = 5   # patella
    a[20:40, 41:43, 40:55] = 6   # patellar cartilage
    a[20:30, 15:25, 45:52] = 7   # femoral lesion, 700 voxels
    return Volume(a, OBLIQUE, VolumeMeta(source=source))


def test_structure_volumes_come_from_the_affine_and_absent_ones_are_null() -> None:
    labels = toy_knee()
    m = measure_labels(labels, SCHEMA, side="right").to_dict()
    voxel_cm3 = abs(np.linalg.det(OBLIQUE[:3, :3])) / 1000.0
    counts = np.bincount(labels.array.ravel(), minlength=10)
    assert m["structures"]["femur"]["volume_cm3"] == pytest.approx((counts[1] + counts[7]) * voxel_cm3, abs=1e-6)
    assert m["structures"]["tibial_cartilage"]["volume_cm3"] == pytest.approx(counts[4] * voxel_cm3, abs=1e-6)
    assert m["structures"]["tibial_bml"]["volume_cm3"] is None
    assert m["bml"]["femur"]["volume_cm3"] == pytest.approx(700 * voxel_cm3, abs=1e-6)
    assert m["bml"]["femur"]["lesion_count"] == 1
    assert m["bml"]["tibia"]["volume_cm3"] == 0.0 and m["bml"]["tibia"]["lesion_count"] == 0
    assert m["bml"]["total_volume_cm3"] == pytest.approx(700 * voxel_cm3, abs=1e-6)
    # Flat 3-voxel slabs along the 0.8 mm axis: 2.4 mm thick.
    assert m["cartilage"]["femoral_cartilage"]["thickness_mm"]["mean"] == pytest.approx(2.4, abs=0.05)


def test_plate_without_any_cartilage_is_null_not_zero() -> None:
    labels = toy_knee()
    m = measure_labels(labels.with_array(np.where(labels.array == 6, 0, labels.array).astype(np.uint16)), SCHEMA,
                       side="right").to_dict()
    assert m["cartilage"]["patellar_cartilage"] is None
    assert m["structures"]["patellar_cartilage"]["volume_cm3"] is None


@pytest.mark.parametrize("spacing,angles", [((0.365, 0.365, 0.7), (25, -10, 40)), ((0.3125, 0.3125, 1.5), (60, 20, -30))])
def test_lesion_volume_centroid_and_diameter_in_physical_space(spacing, angles) -> None:
    ph = lesion_block([((-4, 2, 1), (5, 3.5, 3)), ((5, -4, -3), (3.5, 3, 2.5))], spacing, angles_deg=angles,
                      block_mm=22, supersample=3)
    found = find_lesions(ph.labels, 7, 1, min_volume_mm3=0.5)
    assert len(found.lesions) == 2
    for lesion, volume, centre, diameter in zip(found.lesions, ph.volumes_mm3, ph.centres_mm, ph.diameters_mm):
        assert lesion.volume_mm3 == pytest.approx(volume, rel=0.01)
        assert np.linalg.norm(np.subtract(lesion.centroid_mm, centre)) < 0.25
        assert abs(lesion.diameter_mm - diameter) < 0.5 * max(spacing)


def test_lesions_below_the_minimum_volume_are_ignored_and_reported() -> None:
    a = np.ones((20, 20, 20), dtype=np.uint16)
    a[2:6, 2:6, 2:6] = 7           # 64 voxels = 8 mm3 at 0.5 mm isotropic
    a[12, 12, 12] = 7              # one voxel = 0.125 mm3
    labels = Volume(a, np.diag([0.5, 0.5, 0.5, 1.0]))
    found = find_lesions(labels, 7, 1, min_volume_mm3=0.5)
    assert [les.voxel_count for les in found.lesions] == [64]
    assert found.ignored_volume_mm3 == pytest.approx(0.125)
    assert found.mask.sum() == 64
    assert len(find_lesions(labels, 7, 1, min_volume_mm3=0.0).lesions) == 2


def test_moaks_grades() -> None:
    assert [moaks_grade(p, v) for p, v in [(0, 0), (1, 0.01), (32.9, 1), (33.4, 1), (66.6, 1), (66.7, 1)]] == [0, 1, 1, 2, 2, 3]


def test_outputs_are_byte_identical_between_runs_and_csv_matches_json(tmp_path) -> None:
    labels = toy_knee()
    outputs = []
    for run in ("a", "b"):
        m = measure_labels(labels, SCHEMA, side="left")
        write_measurements(tmp_path / run, m, provenance_record(step="measure", inputs={}, config={}, timings_s=m.timings_s))
        outputs.append(((tmp_path / run / "measurements.json").read_bytes(), (tmp_path / run / "measurements.csv").read_bytes()))
    assert outputs[0] == outputs[1]
    data = json.loads(outputs[0][0])
    header, row = outputs[0][1].decode().splitlines()
    flat = dict(zip(header.split(","), row.split(",")))
    assert float(flat["bml.total_volume_cm3"]) == data["bml"]["total_volume_cm3"]
    assert float(flat["cartilage.femoral_cartilage.thickness_mm.mean"]) == data["cartilage"]["femoral_cartilage"]["thickness_mm"]["mean"]
    assert data["schema_version"] == "1" and data["side"] == "left" and data["side_source"] == "input"
    assert (tmp_path / "a" / "thickness_femoral_cartilage.nii.gz").exists()
    assert set(data["bml"]["femur"]["subregions"]) == {"trochlea_medial", "trochlea_lateral", "central_medial",
                                                        "central_lateral", "posterior_medial", "posterior_lateral"}


# ---- bad input: InputError naming the file, nothing written ------------------------------------

def _bad(array: np.ndarray) -> Volume:
    return Volume(array.astype(np.uint16), OBLIQUE, VolumeMeta(source="bad_labels.nii.gz"))


@pytest.mark.parametrize("edit,problem", [
    (lambda a: a.__setitem__((0, 0, 0), 12), "not in label schema"),
    (lambda a: a.__setitem__((slice(None),) * 3, 0), "empty"),
    (lambda a: a.__setitem__(a == 3, 0), r"tibial_cartilage \(label 4\) is present but its bone tibia"),
    (lambda a: a.__setitem__((slice(0, 3), slice(0, 3), slice(0, 3)), 8), "do not touch their bone"),
])
def test_bad_label_maps_raise_input_error_naming_the_file(edit, problem) -> None:
    a = toy_knee().array.copy()
    edit(a)
    with pytest.raises(InputError, match=problem) as err:
        measure_labels(_bad(a), SCHEMA, side="right")
    assert str(err.value).startswith("bad_labels.nii.gz: ")


def test_image_on_another_grid_is_refused() -> None:
    labels = toy_knee()
    image = Volume(np.zeros(labels.shape, np.float32), OBLIQUE @ np.diag([1, 1, 1.01, 1]), VolumeMeta(source="image.nii.gz"))
    with pytest.raises(GeometryMismatchError, match="image.nii.gz"):
        measure_labels(labels, SCHEMA, image=image)


def test_cli_writes_outputs_and_bad_input_exits_2_without_output(tmp_path, capsys) -> None:
    good = tmp_path / "knee.nii.gz"
    write_nifti(toy_knee(), good)
    assert main(["-q", "measure", str(good), "--side", "right", "--out", str(tmp_path / "ok")]) == 0
    names = sorted(p.name for p in (tmp_path / "ok").iterdir())
    assert names == ["measurements.csv", "measurements.json", "provenance.json", "thickness_femoral_cartilage.nii.gz",
                     "thickness_patellar_cartilage.nii.gz", "thickness_tibial_cartilage.nii.gz"]
    prov = json.loads((tmp_path / "ok" / "provenance.json").read_text())
    assert prov["inputs"]["labels"]["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert {"version", "config", "timings_s"} <= set(prov) and "min_lesion_volume_mm3" in prov["config"]["measure"]
    assert "QC fail: femur volume" in capsys.readouterr().err  # a toy knee far smaller than any real one

    a = toy_knee().array.copy()
    a[0:3, 0:3, 0:3] = 9  # a patellar lesion far from the patella
    bad = tmp_path / "lesion_outside.nii.gz"
    write_nifti(Volume(a, OBLIQUE), bad)
    assert main(["measure", str(bad), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "patellar_bml" in err[0]
    assert not (tmp_path / "no").exists()
    assert main(["measure", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_config_yaml_defaults_match_the_dataclass_and_unknown_keys_fail(tmp_path) -> None:
    assert load_measure_config(DEFAULT_CONFIG_PATH) == MeasureConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("measure:\n  min_lesion_volume: 3\n")
    with pytest.raises(InputError, match="unknown keys.*min_lesion_volume"):
        load_measure_config(bad)
    bad.write_text("measure:\n  decimals: many\n")
    with pytest.raises(InputError, match="decimals"):
        load_measure_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("segment: {engine: given}\nmeasure:\n  min_lesion_volume_mm3: 2\n")
    assert load_measure_config(ok).min_lesion_volume_mm3 == 2.0


def test_sha256_of_files_and_directories(tmp_path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    assert sha256_path(f) == hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_bytes(b"1")
    first = sha256_path(tmp_path / "d")
    (tmp_path / "d" / "x").write_bytes(b"2")
    assert sha256_path(tmp_path / "d") != first
    with pytest.raises(InputError, match="not found"):
        sha256_path(tmp_path / "nope")


# ---- real OAI label maps (skipped without ../shared/data) --------------------------------------

def _mirror(labels: Volume) -> Volume:
    """The mirror image in world x (a left knee from a right one): flip the array's RAS x axis."""
    assert labels.orientation == "RAS"
    return labels.with_array(np.ascontiguousarray(labels.array[::-1]))


def test_side_is_inferred_from_anatomy_on_real_maps_and_their_mirror_images(oai_labels_dir) -> None:
    # akoa_9271853 is one of the knees whose patella sits medially: the other cues outvote it.
    for name in ("akoa_9271853_00m_labels.nii.gz",):
        labels = read_labels(oai_labels_dir / name, SCHEMA)
        side, confidence = infer_side(labels, SCHEMA)
        assert (side, confidence >= 0.9) == ("right", True), name
        side, confidence = infer_side(_mirror(labels), SCHEMA)
        assert (side, confidence >= 0.9) == ("left", True), name


@pytest.mark.slow
def test_real_map_subregions_follow_the_side(oai_labels_dir) -> None:
    labels = read_labels(oai_labels_dir / "zib_9002430_labels.nii.gz", SCHEMA)
    for knee, lateral_x_sign in ((labels, 1.0), (_mirror(labels), -1.0)):
        m = measure_labels(knee, SCHEMA)
        model = m.anatomy
        assert model is not None and model["lateral_sign"] * model["axes"]["ml"][0] * lateral_x_sign > 0.9
        tib = m.thickness["tibial_cartilage"]
        lateral = tib.points_mm[:, 0] * lateral_x_sign > np.median(tib.points_mm[:, 0] * lateral_x_sign)
        assert tib.mean_in(lateral) is not None
        sub = m.to_dict()["cartilage"]["femoral_cartilage"]["subregions"]
        assert all(1.0 < v["thickness_mean_mm"] < 4.0 for v in sub.values())


@pytest.mark.slow
def test_real_map_measurements_are_byte_identical_between_runs(oai_labels_dir) -> None:
    labels = read_labels(oai_labels_dir / "zib_9002817_labels.nii.gz", SCHEMA)
    first, second = (measure_labels(labels, SCHEMA).to_json() for _ in range(2))
    assert first == second


@pytest.mark.slow
def test_every_real_map_is_measured_as_a_right_knee_with_plausible_numbers(oai_labels_dir) -> None:
    for path in sorted(oai_labels_dir.glob("*_labels.nii.gz")):
        m = measure_labels(read_labels(path, SCHEMA), SCHEMA).to_dict()
        assert (m["side"], m["side_source"]) == ("right", "anatomy"), path.name
        for plate in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage"):
            assert 1.0 < m["cartilage"][plate]["thickness_mm"]["mean"] < 4.5, (path.name, plate)
        for bone in ("femur", "tibia", "patella"):
            entry = m["bml"][bone]
            in_regions = sum(v["volume_cm3"] for v in entry["subregions"].values())
            assert in_regions + entry["outside_subregions_cm3"] == pytest.approx(entry["volume_cm3"], abs=1e-5)
