"""One change, one way: a batch run with ``--config`` and ``bml-pipeline longitudinal`` on the same two runs
write byte-identical ``change.json`` (the batch once compared visits with the default measure
configuration, whatever ``--config`` said)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bml_pipeline.cli import main


@pytest.fixture(scope="module")
def pair_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bml_pipeline.io import write_nifti
    from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom

    folder = tmp_path_factory.mktemp("pair")
    for visit, (pose, gain) in {"00m": (Pose(), 1.0), "12m": (Pose((2.0, 0.0, 3.0), (0.0, 1.0, 2.0)), 1.05)}.items():
        spec = KneeSpec(pose=pose, thickness_scale=(("femoral_cartilage", gain),))
        write_nifti(make_phantom(spec, spacing=(1.0, 1.0, 1.0)).labels, folder / f"k_{visit}.nii.gz")
    (folder / "manifest.csv").write_text("subject,visit,labels,side\nk,00m,k_00m.nii.gz,right\n"
                                         "k,12m,k_12m.nii.gz,right\n")
    # A measure setting that changes thickness (and so the change) from the default.
    (folder / "config.yaml").write_text("measure:\n  surface_sigma_voxels: 1.0\n")
    return folder / "manifest.csv"


def test_batch_with_config_and_cli_give_the_same_change(pair_manifest: Path, tmp_path: Path) -> None:
    config = pair_manifest.parent / "config.yaml"
    out = tmp_path / "batch"
    assert main(["-q", "batch", str(pair_manifest), "--out", str(out), "--workers", "0", "--config", str(config),
                 "--no-progress"]) == 0
    batch_change = next((out / "k" / "changes").glob("*/change.json")).read_bytes()
    assert main(["-q", "longitudinal", "--baseline", str(out / "k" / "00m"), "--followup", str(out / "k" / "12m"),
                 "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "change.json").read_bytes() == batch_change
    _same_quantity_same_value_everywhere(out)
    # And the configuration mattered: with the defaults the change differs.
    default = tmp_path / "default"
    assert main(["-q", "batch", str(pair_manifest), "--out", str(default), "--workers", "0", "--no-progress"]) == 0
    assert next((default / "k" / "changes").glob("*/change.json")).read_bytes() != batch_change


def test_runs_measured_with_different_configurations_are_not_compared(pair_manifest: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = pair_manifest.parent
    assert main(["-q", "measure", str(data / "k_00m.nii.gz"), "--side", "right", "--out", str(tmp_path / "a")]) == 0
    assert main(["-q", "measure", str(data / "k_12m.nii.gz"), "--side", "right", "--out", str(tmp_path / "b"),
                 "--config", str(data / "config.yaml")]) == 0
    capsys.readouterr()
    assert main(["longitudinal", "--baseline", str(tmp_path / "a"), "--followup", str(tmp_path / "b"),
                 "--out", str(tmp_path / "c")]) == 2
    assert "measured with another measure configuration" in capsys.readouterr().err


def _same_quantity_same_value_everywhere(out: Path) -> None:
    """cohort.csv and measurements.json give the whole plate's mean thickness; changes.csv and change.json
    the common region's, under names that say so."""
    import csv
    import json

    change = json.loads(next((out / "k" / "changes").glob("*/change.json")).read_text())
    assert "common region" in change["thickness_region"]
    with (out / "changes.csv").open(newline="") as fh:
        row = next(csv.DictReader(fh))
    common = change["cartilage"]["femoral_cartilage"]
    assert float(row["cartilage_femoral_cartilage_common_region_thickness_mean_baseline_mm"]) == \
        pytest.approx(common["thickness_mean_baseline_mm"], abs=1e-9)
    assert float(row["cartilage_femoral_cartilage_common_region_delta_percent"]) == \
        pytest.approx(common["delta_percent"], abs=1e-9)
    assert not any("thickness" in c and "common_region" not in c for c in row)
    with (out / "cohort.csv").open(newline="") as fh:
        scans = {r["visit"]: r for r in csv.DictReader(fh)}
    for visit in ("00m", "12m"):
        m = json.loads((out / "k" / visit / "measurements.json").read_text())
        whole = m["cartilage"]["femoral_cartilage"]["thickness_mm"]["mean"]
        assert float(scans[visit]["cartilage.femoral_cartilage.thickness_mm.mean"]) == pytest.approx(whole, abs=1e-9)
    with (out / "cohort_long.csv").open(newline="") as fh:
        long = {(r["visit"], r["structure"], r["region"], r["measure"]): (float(r["value"]), r["unit"])
                for r in csv.DictReader(fh)}
    assert long[("00m", "femoral_cartilage", "whole_plate", "thickness_mean")] == pytest.approx(
        (float(scans["00m"]["cartilage.femoral_cartilage.thickness_mm.mean"]), "mm"))
    assert long[("00m->12m", "femoral_cartilage", "common_region", "thickness_delta_percent")] == pytest.approx(
        (common["delta_percent"], "%"))
    assert long[("00m->12m", "femur", "whole_bone", "bml_delta")][1] == "cm3"
    # The two regions differ, which is why each name says which one it is.
    assert common["thickness_mean_baseline_mm"] != pytest.approx(
        float(scans["00m"]["cartilage.femoral_cartilage.thickness_mm.mean"]), abs=1e-4)
