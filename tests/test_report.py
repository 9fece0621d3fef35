"""Per-scan report: content, escaping, identifiers, geometry of the views, flags, bad input.

Run directories are built here: a small knee-like label map on an anisotropic grid, an MR-like image
on the same grid, a thickness map and a hand-written ``measurements.json`` (DESIGN.md schema).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bml_pipeline.errors import InputError
from bml_pipeline.io import write_nifti
from bml_pipeline.labels import load_schema
from bml_pipeline.report.html import render_scan_report, write_scan_report
from bml_pipeline.report.quality import border_flags
from bml_pipeline.report.rundir import load_run
from bml_pipeline.report.tables import change_rows
from bml_pipeline.report.views import extract_slice, slice_index, view_geometry
from bml_pipeline.volume import Volume

SCHEMA = load_schema("oai_zib")
SPACING = (0.7, 0.5, 0.5)
SHAPE = (48, 96, 96)


def grid_points(shape=SHAPE, spacing=SPACING) -> tuple[np.ndarray, np.ndarray]:
    """RAS affine centred on 0 and the world coordinates (x, y, z arrays) of every voxel."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing)
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    xyz = np.stack([ii, jj, kk], -1) @ affine[:3, :3].T + affine[:3, 3]
    return affine, xyz


def knee_labels(shift_mm: float = 0.0, femur_to_border: bool = False) -> Volume:
    """A toy knee: femur above z=2 mm, tibia below -2 mm, cartilage between, patella in front, and
    a femoral and a tibial BML. ``shift_mm`` moves everything along y (a second visit)."""
    affine, xyz = grid_points()
    x, y, z = xyz[..., 0], xyz[..., 1] - shift_mm, xyz[..., 2]
    lab = np.zeros(SHAPE, np.uint16)
    inside = (np.abs(x) < 13) & (np.abs(y) < 12)
    lab[(np.abs(x) < (99 if femur_to_border else 13)) & (np.abs(y) < 12) & (z > 2) & (z < 20)] = 1
    lab[inside & (z > 0) & (z <= 2) & (np.abs(x) < 11)] = 2
    lab[inside & (z >= -2) & (z <= 0) & (np.abs(x) < 11)] = 4
    lab[inside & (z < -2) & (z > -20)] = 3
    lab[(np.abs(x) < 7) & (y > 14) & (y < 18) & (z > 5) & (z < 15)] = 5
    lab[(np.abs(x) < 7) & (y > 12.5) & (y <= 14) & (z > 5) & (z < 15)] = 6
    lab[(x - 5) ** 2 + y ** 2 + (z - 8) ** 2 < 9] = 7
    lab[(x + 5) ** 2 + (y - 2) ** 2 + (z + 7) ** 2 < 6] = 8
    return Volume(lab, affine)


def measurements(side: str | None = "right", total: float = 0.14) -> dict:
    return {
        "schema_version": "1", "side": side, "side_source": "header",
        "structures": {"femur": {"volume_cm3": 13.1}, "femoral_cartilage": {"volume_cm3": 9.5}},
        "bml": {
            "femur": {"volume_cm3": 0.113, "lesion_count": 1,
                      "subregions": {"medial_weight_bearing": {"volume_cm3": 0.113, "percent_of_subregion": 4.2,
                                                               "grade": 1}},
                      "lesions": [{"volume_cm3": 0.113, "centroid_mm": [5.0, 0.0, 8.0], "diameter_mm": 6.0,
                                   "subregion": "medial_weight_bearing"}]},
            "tibia": {"volume_cm3": 0.027, "lesion_count": 1, "subregions": {},
                      "lesions": [{"volume_cm3": 0.027, "centroid_mm": [-5.0, 2.0, -7.0], "diameter_mm": 4.9}]},
            "total_volume_cm3": total,
        },
        "cartilage": {
            "femoral_cartilage": {"volume_cm3": 9.5, "thickness_mm": {"mean": 2.0, "median": 2.0, "sd": 0.1,
                                                                     "p95": 2.2, "max": 2.5},
                                  "subregions": {"central_medial": {"thickness_mean_mm": 2.01}}},
            "tibial_cartilage": {"volume_cm3": 4.1, "thickness_mm": {"mean": 2.0}},
        },
    }


def make_run(root: Path, name: str = "run", *, image: bool = True, series: str = "Sag DESS",
             side: str | None = "right", shift_mm: float = 0.0, provenance: dict | None = None,
             image_name: str = "knee_image.nii.gz") -> Path:
    """A run directory under ``root``; the image lives outside it and is named in provenance."""
    run = root / name
    run.mkdir(parents=True)
    labels = knee_labels(shift_mm)
    write_nifti(labels, run / "labels.nii.gz")
    rng = np.random.default_rng(0)
    tone = np.array([30, 120, 200, 110, 190, 120, 200, 0, 220, 230], np.float32)
    img = tone[labels.array] + rng.normal(0, 8, SHAPE).astype(np.float32)
    image_path = root / f"{name}_{image_name}"
    if image:
        write_nifti(labels.with_array(img), image_path)
    thick = np.where(np.isin(labels.array, (2, 4, 6)), 2.0, 0.0).astype(np.float32)
    write_nifti(labels.with_array(thick), run / "thickness_mm.nii.gz")
    (run / "measurements.json").write_text(json.dumps(measurements(side)))
    prov = {"version": "0.1.0", "model_id": "given-labels",
            "inputs": {"image": {"path": str(image_path), "series_description": series,
                                 "acquisition_date": "20240131"}}}
    prov.update(provenance or {})
    (run / "provenance.json").write_text(json.dumps(prov))
    return run


@pytest.fixture(scope="module")
def report_pair(tmp_path_factory) -> tuple[Path, Path, str]:
    """A prior and a current run and the current report's HTML (with --prior)."""
    root = tmp_path_factory.mktemp("report")
    prior = make_run(root, "prior", shift_mm=0.0)
    current = make_run(root, "current", shift_mm=2.0)
    path = write_scan_report(current, prior_dir=prior)
    return prior, current, path.read_text(encoding="utf-8")


def test_report_is_self_contained_and_complete(report_pair):
    _, current, html = report_pair
    assert (current / "report.html").is_file()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', html)
    assert len(sources) >= 12 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', html), "no network references"
    assert "<link" not in html
    # Scripts belong to the interactive viewer only (tests/test_report_viewer.py): none loads a file.
    assert all("src=" not in tag for tag in re.findall(r"<script[^>]*>", html))
    # header, tables, change with direction text, thickness colour scale, legend
    for text in ("Right knee", "2024-01-31", "Sag DESS", "given-labels", "Medial compartment",
                 "Lateral compartment", "Medial weight bearing", "0.113", "Thickness maps", "mm or more",
                 "Bone marrow lesion (BML)", "Change since the prior visit", "Prior", "Current"):
        assert text in html, text
    assert "▲ increase" in html or "▼ decrease" in html or "no change" in html


def test_report_is_deterministic(report_pair, tmp_path):
    prior, current, html = report_pair
    assert write_scan_report(current, prior_dir=prior).read_text(encoding="utf-8") == html


def test_strings_from_inputs_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    run = make_run(tmp_path, "evil", series=evil, image_name="<script>x.nii.gz")
    html = write_scan_report(run).read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<script>x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "evil_&lt;script&gt;x.nii.gz" in html


def test_identifiers_hidden_unless_asked(tmp_path):
    run = make_run(tmp_path, "ids", provenance={"patient_name": "DOE^JANE", "patient_id": "MRN-4711"})
    hidden = write_scan_report(run).read_text(encoding="utf-8")
    assert "DOE^JANE" not in hidden and "MRN-4711" not in hidden and str(tmp_path) not in hidden
    shown = write_scan_report(run, include_identifiers=True).read_text(encoding="utf-8")
    assert "DOE^JANE" in shown and "MRN-4711" in shown and str(tmp_path) in shown


def test_missing_measurements_is_input_error_without_output(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    with pytest.raises(InputError, match="measurements.json"):
        write_scan_report(run)
    assert not (run / "report.html").exists()
    (run / "measurements.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        write_scan_report(run)
    assert list(run.iterdir()) == [run / "measurements.json"]


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from bml_pipeline.cli import main

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_partial_measurements_show_absent_and_labels_rendering(tmp_path):
    run = make_run(tmp_path, "partial", image=False, side=None)
    (run / "measurements.json").write_text(json.dumps({"schema_version": "1", "bml": {"femur": {}}}))
    html = render_scan_report(load_run(run))
    assert "absent" in html and "Side unknown" in html
    assert "rendering of the labels" in html  # no image: labels drawn instead


def test_views_keep_physical_aspect_and_orientation():
    # A 20 mm x 10 mm (A-P x S-I) box on a 0.3 x 0.3 x 1.5 mm grid; a marker voxel at its anterior-superior corner.
    spacing = (1.5, 0.3, 0.3)
    affine, xyz = grid_points((20, 100, 100), spacing)
    y, z = xyz[..., 1], xyz[..., 2]
    arr = ((np.abs(y) < 10) & (np.abs(z) < 5)).astype(np.uint16)
    arr[(np.abs(y - 9.5) < 0.5) & (np.abs(z - 4.5) < 0.5)] = 2
    g = view_geometry(affine, arr.shape, "sagittal")
    img = extract_slice(arr, g, 10, order=0)
    rows, cols = np.nonzero(img)
    assert (cols.max() - cols.min() + 1) * g.pixel_mm == pytest.approx(20, abs=1)
    assert (rows.max() - rows.min() + 1) * g.pixel_mm == pytest.approx(10, abs=1)
    r2, c2 = np.argwhere(img == 2).mean(axis=0)
    assert r2 < img.shape[0] / 2 and c2 < img.shape[1] / 2  # anterior-superior is top-left
    assert g.letters == ("S", "I", "A", "P")
    # The same volume stored in another axis order (P, S, L: reversed y, z, reversed x) gives the same picture.
    perm = np.transpose(arr, (1, 2, 0))[::-1, :, ::-1]
    other = np.eye(4)
    other[:3, :3] = affine[:3, :3][:, [1, 2, 0]] * np.array([-1, 1, -1])
    other[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.array([arr.shape[0] - 1, arr.shape[1] - 1, 0])
    g2 = view_geometry(other, perm.shape, "sagittal")
    assert g2.normal_axis == 2 and g2.letters == g.letters
    index = slice_index(g2, other, xyz[10, 0, 0], perm.shape[2])
    assert index == arr.shape[0] - 1 - 10
    np.testing.assert_array_equal(extract_slice(perm, g2, index, order=0), img)
    coronal = view_geometry(affine, arr.shape, "coronal")
    assert coronal.letters == ("S", "I", "R", "L")


def test_border_flag_only_when_bone_is_cut_near_the_joint():
    assert border_flags(knee_labels(), SCHEMA) == []
    flags = border_flags(knee_labels(femur_to_border=True), SCHEMA)
    assert [f.title for f in flags] == ["Field of view cuts the femur"]
    assert "left border" in flags[0].detail and "right border" in flags[0].detail


def test_change_direction_and_progression():
    base, follow = measurements(total=0.10), measurements(total=0.14)
    follow["cartilage"]["femoral_cartilage"]["thickness_mm"]["mean"] = 1.9
    rows = {(r.group, r.name): r for r in change_rows(None, base, follow)}
    total = rows[("BML volume", "total")]
    assert total.direction == "increase" and total.worse and total.delta_percent == pytest.approx(40)
    thick = rows[("Mean cartilage thickness, whole plate", "femoral_cartilage")]  # no change.json: whole-plate means
    assert thick.direction == "decrease" and thick.worse and thick.delta == pytest.approx(-0.1)
    assert rows[("Mean cartilage thickness, whole plate", "patellar_cartilage")].direction == "absent"
    from_file = change_rows({"bml": {"total": {"baseline_cm3": 1.0, "followup_cm3": 0.5, "delta_cm3": -0.5,
                                               "delta_percent": -50.0}}}, base, follow)
    assert from_file[3].direction == "decrease" and from_file[3].worse is False


def test_pdf_is_written_with_the_figures(tmp_path):
    pytest.importorskip("weasyprint")
    run = make_run(tmp_path, "pdf", image=False)
    (run / "thickness_mm.nii.gz").unlink()
    write_scan_report(run, pdf=True)
    pdf = (run / "report.pdf").read_bytes()
    assert pdf[:5] == b"%PDF-" and pdf.count(b"/Subtype /Image") >= 5


def test_label_boxes_match_find_objects():
    from scipy import ndimage

    from bml_pipeline.report.figures import label_boxes

    labels = knee_labels().array[::2, ::3, ::2]
    assert label_boxes(labels) == ndimage.find_objects(labels)
    wide = labels.astype(np.int32)
    wide[0, 0, 0] = 20  # beyond 16 flag bits
    assert label_boxes(wide) == ndimage.find_objects(wide)


def test_report_of_the_real_measure_stage_outputs(tmp_path):
    """Contract with the producers: phantom labels -> synthesized image -> measure -> report."""
    from bml_pipeline.measure import measure_labels, write_measurements
    from bml_pipeline.synth.image import synthesize
    from bml_pipeline.synth.phantom import KneeSpec, make_phantom

    phantom = make_phantom(KneeSpec(side="left"), spacing=(1.2, 1.2, 1.2))
    image = synthesize(phantom.labels, SCHEMA, seed=1).image
    run = tmp_path / "run"
    write_nifti(phantom.labels, run / "labels.nii.gz")
    write_nifti(image, tmp_path / "image.nii.gz")
    m = measure_labels(phantom.labels, SCHEMA, side="left", image=image)
    write_measurements(run, m, {"version": "test", "inputs": {"image": {"path": str(tmp_path / "image.nii.gz")}}})
    html = write_scan_report(run).read_text(encoding="utf-8")
    assert "Left knee" in html and "rendering of the labels" not in html
    for plate in ("Femoral", "Tibial", "Patellar"):  # one thickness map per plate
        assert f'alt="{plate} cartilage: thickest point along' in html
    with_lesions = {b: e for b, e in m.to_dict()["bml"].items() if isinstance(e, dict) and e.get("lesions")}
    assert with_lesions
    for bone, entry in with_lesions.items():
        assert f"{bone.capitalize()}: largest BML (#1, {entry['lesions'][0]['volume_cm3']:.3f} cm³)" in html
    mean = m.to_dict()["cartilage"]["femoral_cartilage"]["thickness_mm"]["mean"]
    assert f"{mean:.2f}" in html


def test_change_json_fills_the_table_and_matches_prior_slices(report_pair, tmp_path):
    prior, current, _ = report_pair
    shift = np.eye(4)
    shift[1, 3] = 2.0  # the current visit is the prior one moved 2 mm anterior (see make_run)
    change = {"baseline": {"labels": str(prior / "labels.nii.gz")}, "same_knee": {"forced": False, "problem": None},
              "cartilage": {},
              "bml": {"total": {"baseline_cm3": 0.2, "followup_cm3": 0.1, "delta_cm3": -0.1, "delta_percent": -50.0}},
              "alignment": {b: {"rotation_deg": 0.0, "translation_mm": 2.0, "residual": 0.01, "matrix": shift.tolist()}
                            for b in ("femur", "tibia", "patella")}}
    path = tmp_path / "change.json"
    path.write_text(json.dumps(change))
    html = render_scan_report(replace(load_run(current), change=change), load_run(prior))
    assert "Source: change.json" in html and "-50.0" in html
    assert "matched through the tibia alignment of change.json" in html
    assert "matched to the" not in html  # every prior slice used the alignment
    assert write_scan_report(current, prior_dir=prior, change_path=path).read_text(encoding="utf-8") == html


def test_side_qc_and_plausibility_flags():
    from bml_pipeline.report.quality import quality_flags

    m = measurements()
    m.update(side_source="anatomy", side_confidence=0.6)
    m["cartilage"]["femoral_cartilage"]["volume_cm3"] = 95.0
    m["qc"] = {"status": "fail", "unreliable": ["patella"], "checks": [
        {"name": "arrangement", "status": "fail", "detail": "the patella is 60 mm from the femur"},
        {"name": "confidence", "status": "warn", "detail": "low model confidence for tibia"},
        {"name": "volume", "status": "pass", "detail": "volumes plausible"}]}
    flags = {f.title: f for f in quality_flags(m, None, SCHEMA)}
    assert flags["Side inferred"].level == "warning"
    assert flags["Quality control failed: arrangement"].detail == "the patella is 60 mm from the femur"
    assert "tibia" in flags["Quality control warned: confidence"].detail
    assert "95.00 cm³" in flags["Implausible femoral cartilage volume"].detail
    assert len(flags) == 4
    assert quality_flags(measurements(), None, SCHEMA) == []


def test_corrupt_optional_files_become_notes(tmp_path):
    run = make_run(tmp_path, "corrupt")
    (run / "thickness_mm.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "corrupt_knee_image.nii.gz").write_bytes(b"")
    html = render_scan_report(load_run(run))
    assert "thickness map not shown" in html and "image not shown" in html
    assert "No thickness maps in this run." in html and "rendering of the labels" in html


def test_change_table_shows_each_subregion_under_its_plate():
    """akoa_9031930: the medial tibia lost 21.6 % while the whole plate lost 11.4 %: a reader must see both."""
    change = {"cartilage": {"tibial_cartilage": {
        "thickness_mean_baseline_mm": 2.0, "thickness_mean_followup_mm": 1.772, "delta_mm": -0.228,
        "delta_percent": -11.4, "subregions": {
            "medial": {"thickness_mean_baseline_mm": 2.5, "thickness_mean_followup_mm": 1.96, "delta_mm": -0.54,
                       "delta_percent": -21.6},
            "lateral": {"thickness_mean_baseline_mm": None, "thickness_mean_followup_mm": None, "delta_mm": None,
                        "delta_percent": None}}}}}
    rows = change_rows(change, measurements(), measurements())
    plate = [r for r in rows if r.name == "tibial_cartilage"]
    assert [r.subregion for r in plate] == [None, "medial"]
    assert plate[0].delta_percent == pytest.approx(-11.4) and plate[1].delta_percent == pytest.approx(-21.6)
    assert plate[1].group == "Mean cartilage thickness, common region" and plate[1].worse
