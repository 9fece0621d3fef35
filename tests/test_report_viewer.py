"""The report's interactive viewer (NiiVue from the installed ipyniivue wheel), without a browser.

The library is inlined from the installed package, the embedded volumes are valid NIfTI on a grid whose
geometry matches the scan, they stay small, nothing remote is referenced, and a missing package only
leaves a note. The browser checks are in test_report_browser.py.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_report import SCHEMA, make_run

from bml_pipeline.labels import load_schema
from bml_pipeline.report import viewer
from bml_pipeline.report.html import render_scan_report, write_scan_report
from bml_pipeline.report.rundir import load_run
from bml_pipeline.volume import Volume

needs_ipyniivue = pytest.mark.skipif(importlib.util.find_spec("ipyniivue") is None,
                                     reason="ipyniivue is not installed (pip install ipyniivue)")


def scripts(html: str) -> dict[str, str]:
    """id -> text of the report's data <script> elements."""
    return dict(re.findall(r'<script type="application/[\w-]+" id="([\w-]+)">([^<]*)</script>', html))


def nifti(text: str):
    import nibabel as nib

    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text)))


@pytest.fixture(scope="module")
def viewer_report(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("viewer")
    run = make_run(root, "run")
    return run, write_scan_report(run).read_text(encoding="utf-8")


@needs_ipyniivue
def test_viewer_section_and_inlined_library(viewer_report):
    import ipyniivue

    _, html = viewer_report
    assert '<section id="viewer"' in html and '<canvas id="bml-viewer-canvas"' in html
    assert html.index('id="viewer"') < html.index('id="images"')  # key images kept, after the viewer
    data = scripts(html)
    installed = (Path(ipyniivue.__file__).parent / "static" / "widget.js").read_text(encoding="utf-8")
    inlined = gzip.decompress(base64.b64decode(data["bml-viewer-library"])).decode("utf-8")
    library = viewer.find_library()
    assert inlined.startswith(installed)  # the installed bundle, unchanged, plus one line
    hook = f'if(typeof globalThis.{viewer.START_HOOK}==="function")globalThis.{viewer.START_HOOK}({library.class_name});'
    assert inlined[len(installed):] == f"\n;{hook}\n"
    assert f"{library.class_name}=class{{constructor" in installed
    assert re.match(r"\d+\.\d+", library.niivue_version) and library.licence == "BSD-2-Clause"
    assert f"NiiVue {library.niivue_version} from the ipyniivue {library.version} package" in html
    assert "Redistributions in binary form must reproduce the above copyright notice" in html
    config = json.loads(data["bml-viewer-config"])
    assert [v["role"] for v in config["volumes"]] == ["image", "labels", "thickness"]
    lut = config["labels"]["lut"]
    assert lut["I"] == [0] + [s.id for s in SCHEMA.structures]
    assert lut["labels"][1:] == ["Femur", "Femoral cartilage", "Tibia", "Tibial cartilage", "Patella",
                                 "Patellar cartilage", "Femoral BML", "Tibial BML", "Patellar BML"]
    assert (lut["R"][2], lut["G"][2], lut["B"][2]) == (86, 180, 233)  # the key images' femoral cartilage colour
    assert config["focus_mm"] == [5.0, 0.0, 8.0]  # opens on the largest lesion
    for s in config["labels"]["structures"]:
        assert f'data-label="{s["id"]}"' in html  # one toggle per label


@needs_ipyniivue
def test_embedded_volumes_decode_with_the_scan_geometry(viewer_report):
    run_dir, html = viewer_report
    run = load_run(run_dir)
    data = scripts(html)
    image, labels = nifti(data["bml-viewer-volume-image"]), nifti(data["bml-viewer-volume-labels"])
    thickness = nifti(data["bml-viewer-volume-thickness"])
    factors = viewer.block_factors(run.labels.spacing)
    assert factors == (1, 1, 1)  # 0.7 x 0.5 x 0.5 mm is already near 0.7 mm in-plane
    for volume in (image, labels, thickness):
        assert volume.shape == run.labels.shape
        np.testing.assert_allclose(volume.affine, run.labels.affine, atol=1e-4)
        assert volume.header.get_sform(coded=True)[1] == 1 and volume.header.get_qform(coded=True)[1] == 1
    assert image.get_data_dtype() == np.uint8 and labels.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(labels.dataobj), run.labels.array)
    grey = np.asarray(image.dataobj)
    assert grey.min() == 0 and grey.max() == 255
    assert grey[run.labels.array == 2].mean() > grey[run.labels.array == 1].mean() + 40  # cartilage bright, as in the image
    thick = thickness.get_fdata()
    expected = np.maximum.reduce([v.array for v in run.thickness.values()])
    np.testing.assert_allclose(thick, expected, atol=thickness.dataobj.slope / 2 + 1e-6)
    assert np.array_equal(thick > 0, expected > 0)


def test_downsampling_keeps_the_geometry():
    # A 0.7 x 0.35 x 0.35 mm oblique grid: blocks of 1 x 2 x 2; a block's centre is the mean of its voxels' centres.
    rotation = np.array([[0.0, 0.0, 1.0], [np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array([0.7, 0.35, 0.35])
    affine[:3, 3] = [-20.0, 13.0, 7.0]
    shape = (20, 41, 40)  # odd size: the last incomplete block is dropped
    labels = np.zeros(shape, np.uint16)
    labels[5:15, 10:30, 10:30] = 1
    labels[8:12, 16:24, 16:24] = 7
    grid = Volume(labels, affine)
    factors = viewer.block_factors(grid.spacing)
    assert factors == (1, 2, 2)
    small = viewer.block_affine(affine, factors)
    for ijk in [(0, 0, 0), (3, 7, 11), (19, 19, 19)]:
        voxels = [np.array(ijk) * factors + np.array(d) for d in np.ndindex(*factors)]
        np.testing.assert_allclose(small[:3, :3] @ ijk + small[:3, 3], np.mean(grid.world_coords(voxels), axis=0))
    image = Volume(labels.astype(np.float32) * 10, affine)
    volumes, used = viewer.viewer_volumes(grid, image, SCHEMA)
    assert used == factors
    decoded = nifti(volumes[1]["data"])
    assert decoded.shape == (20, 20, 20)
    np.testing.assert_allclose(decoded.affine, small, atol=1e-4)
    lab = np.asarray(decoded.dataobj)
    np.testing.assert_array_equal(lab, labels[:, :40, :40].reshape(20, 20, 2, 20, 2).max(axis=(2, 4)))
    # The lesion's world centroid is the same on both grids.
    centroid = grid.world_coords(np.argwhere(labels == 7).mean(axis=0))
    small_vol = Volume(lab, decoded.affine)
    np.testing.assert_allclose(small_vol.world_coords(np.argwhere(lab == 7).mean(axis=0)), centroid, atol=1e-3)


def test_block_mode_prefers_thin_structures_on_ties():
    labels = np.array([0, 0, 0, 2, 1, 1, 4, 4], np.uint8).reshape(1, 1, 8)
    assert viewer.block_mode(labels, (1, 1, 2)).ravel().tolist() == [0, 2, 1, 4]


def test_full_size_scan_stays_under_the_size_bound():
    """A 160 x 384 x 384 DESS-like scan (0.7 x 0.365 x 0.365 mm) with MR-like noise."""
    shape, spacing = (160, 384, 384), (0.7, 0.365, 0.365)
    affine = np.diag([*spacing, 1.0])
    rng = np.random.default_rng(1)
    i, j, k = np.ogrid[:shape[0], :shape[1], :shape[2]]
    labels = np.zeros(shape, np.uint8)
    labels[((j - 190) ** 2 + (k - 250) ** 2 < 90 ** 2) & (i > 20) & (i < 140)] = 1
    labels[((j - 190) ** 2 + (k - 250) ** 2 < 40 ** 2) & (i > 60) & (i < 90)] = 7
    labels[(k > 150) & (k < 158) & (i > 20) & (i < 140) & (j < 300)] = 2
    tone = np.array([60, 140, 200, 0, 0, 0, 0, 230], np.float32)
    image = tone[labels] + rng.normal(0, 15, shape).astype(np.float32) * (1 + (j / shape[1]).astype(np.float32))
    grid = Volume(labels, affine)
    volumes, factors = viewer.viewer_volumes(grid, Volume(image, affine), SCHEMA)
    assert viewer.encoded_size(volumes) <= viewer.MAX_VOLUME_BYTES
    assert factors[1] >= 2 and factors[2] >= 2
    decoded = nifti(volumes[0]["data"])
    assert decoded.shape == tuple(n // f for n, f in zip(shape, factors))
    np.testing.assert_allclose(decoded.affine, viewer.block_affine(affine, factors), atol=1e-4)


@needs_ipyniivue
def test_report_size_and_no_remote_resources(viewer_report):
    run_dir, html = viewer_report
    size = (run_dir / "report.html").stat().st_size
    library = viewer.find_library()
    assert size < len(library.payload) + viewer.MAX_VOLUME_BYTES + 1_500_000
    # No element or style pulls anything from elsewhere: no src/href/url()/import to a remote origin.
    assert not re.search(r"""(?:src|href|action|poster|srcset|data)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"url\(\s*[\"']?(?:https?:)?//|@import", html, re.IGNORECASE)
    assert "<link" not in html and "<iframe" not in html
    # Every script is either inline code or a data block; none has a src.
    tags = re.findall(r"<script[^>]*>", html)
    assert tags and all("src=" not in t for t in tags)
    code = [text for attrs, text in re.findall(r"<script([^>]*)>(.*?)</script>", html, re.DOTALL) if "type=" not in attrs]
    assert len(code) == 1
    assert not re.search(r"https?:|fetch\(|XMLHttpRequest|import\(|WebSocket|EventSource", code[0])


@needs_ipyniivue
def test_viewer_hidden_in_print_and_data_blocks_cannot_break_out(tmp_path):
    run = make_run(tmp_path, "evil")
    evil_yaml = (Path(viewer.__file__).parents[1] / "configs" / "labels" / "oai_zib.yaml").read_text()
    evil_yaml = evil_yaml.replace("name: tibial_bml,", 'name: "tibial</script><img src=x onerror=alert(1)>",')
    (tmp_path / "evil.yaml").write_text(evil_yaml)
    html = render_scan_report(replace(load_run(run), schema=load_schema(tmp_path / "evil.yaml")))
    assert "<img src=x" not in html and "</script><img" not in html
    config = json.loads(scripts(html)["bml-viewer-config"])
    assert "Tibial</script><img src=x onerror=alert(1)>" in config["labels"]["lut"]["labels"]
    style = html[html.index("<style>"):html.index("</style>")]
    assert re.search(r"@media print \{[^@]*\.viewer-section \{ display: none; \}", style)


def test_report_without_ipyniivue_says_so(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipyniivue" else real(name, *a))
    run = make_run(tmp_path, "plain")
    html = write_scan_report(run).read_text(encoding="utf-8")
    assert "The interactive viewer needs the ipyniivue package (pip install ipyniivue)" in html
    assert "<script" not in html and "Key images" in html and "Thickness maps" in html


def test_unrecognised_bundle_and_missing_labels_leave_notes(tmp_path):
    bundle = tmp_path / "widget.js"
    bundle.write_text('var A=class{constructor(){}};export{A as default};')
    with pytest.raises(viewer.ViewerUnavailable, match="does not recognise"):
        viewer._library(str(bundle), 0, bundle.stat().st_size)
    run = make_run(tmp_path, "nolabels")
    (run / "labels.nii.gz").unlink()
    html = render_scan_report(load_run(run))
    assert "No interactive viewer: this run has no label map." in html and "<script" not in html


@needs_ipyniivue
def test_labels_only_run_shows_a_label_rendering(tmp_path):
    run = make_run(tmp_path, "noimage", image=False)
    html = render_scan_report(load_run(run))
    config = json.loads(scripts(html)["bml-viewer-config"])
    assert config["background"] == "labels"
    grey = np.asarray(nifti(scripts(html)["bml-viewer-volume-image"]).dataobj)
    labels = load_run(run).labels.array
    assert grey[labels == 2].mean() > grey[labels == 1].mean() > grey[labels == 0].mean()
