"""Manifest validation: every problem listed at once, paths relative to the manifest, natural order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bml_pipeline.batch.manifest import ScanSpec, load_manifest, visit_sort_key
from bml_pipeline.errors import InputError


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for name in ("a_00m.nii.gz", "a_12m.nii.gz", "b_00m.nii.gz", "img.nii.gz"):
        (tmp_path / "data" / name).write_bytes(b"x")
    return tmp_path


def test_csv_paths_relative_to_manifest_and_sorted(files: Path) -> None:
    sub = files / "lists"
    sub.mkdir()
    absolute = files / "data" / "b_00m.nii.gz"
    manifest = _write(sub / "m.csv", "subject,visit,labels,side,image\n"
                                     "a,12m,../data/a_12m.nii.gz,Right,\n"
                                     f"b,00m,{absolute},,\n"
                                     "a,00m,../data/a_00m.nii.gz,left,../data/img.nii.gz\n")
    scans = load_manifest(manifest)
    assert [s.key for s in scans] == [("a", "00m"), ("a", "12m"), ("b", "00m")]
    assert scans[0] == ScanSpec("a", "00m", (files / "data/img.nii.gz").resolve(),
                                (files / "data/a_00m.nii.gz").resolve(), "left", None)
    assert scans[1].side == "right" and scans[1].image is None
    assert scans[2].labels == absolute.resolve() and scans[2].side is None


def test_yaml_manifest(files: Path) -> None:
    manifest = _write(files / "m.yaml", "scans:\n  - {subject: a, visit: 00m, labels: data/a_00m.nii.gz}\n"
                                        "  - {subject: a, visit: 12m, image: data/img.nii.gz, model: unet}\n")
    scans = load_manifest(manifest)
    assert [s.key for s in scans] == [("a", "00m"), ("a", "12m")]
    assert scans[1].labels is None and scans[1].model == "unet"


def test_all_problems_reported_at_once(files: Path) -> None:
    manifest = _write(files / "m.csv", "subject,visit,labels,side\n"
                                       "a,00m,data/a_00m.nii.gz,left\n"
                                       "a,00m,data/a_12m.nii.gz,left\n"
                                       "b,00m,data/missing1.nii.gz,\n"
                                       "c,00m,data/missing2.nii.gz,up\n"
                                       "../x,00m,data/a_00m.nii.gz,\n"
                                       "d,00m,,\n")
    with pytest.raises(InputError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert message.startswith(f"{manifest}: 6 problem(s)")
    assert "\n" not in message
    for fragment in ("line 3: duplicate subject 'a' visit '00m' (first at line 2)",
                     "line 4: labels file not found: data/missing1.nii.gz",
                     "line 5: labels file not found: data/missing2.nii.gz",
                     "line 5: side 'up'", "line 6: subject '../x'", "line 7: neither image nor labels"):
        assert fragment in message


@pytest.mark.parametrize(("text", "expected"), [
    ("subject,visit,labels,site\na,00m,x,1\n", "unknown columns ['site']"),
    ("subject,labels\na,x\n", "missing required columns ['visit']"),
    ("subject,visit,side\na,00m,left\n", "needs an 'image' or a 'labels' column"),
    ("subject,visit,labels\n", "manifest has no scans"),
    ("", "manifest is empty"),
    ("subject,visit,labels\na,00m,x,extra\n", "line 2: 4 fields but the header has 3"),
])
def test_structural_problems(tmp_path: Path, text: str, expected: str) -> None:
    manifest = _write(tmp_path / "m.csv", text)
    with pytest.raises(InputError, match=re.escape(expected)):
        load_manifest(manifest)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")


def test_visit_order_is_natural() -> None:
    visits = ["120m", "12m", "00m", "96m", "V10", "V2", "baseline"]
    assert sorted(visits, key=visit_sort_key) == ["00m", "12m", "96m", "120m", "V2", "V10", "baseline"]
