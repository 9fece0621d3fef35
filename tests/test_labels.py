"""Label schema loading and validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bml_pipeline.errors import InputError
from bml_pipeline.labels import load_schema


def test_oai_zib_schema_links_bones_lesions_and_plates() -> None:
    schema = load_schema("oai_zib")
    assert [b.name for b in schema.bones] == ["femur", "tibia", "patella"]
    assert schema.bone_ids("femur") == (1, 7)
    assert schema.bone_ids("tibia") == (3, 8)
    assert schema.bone_ids("patella") == (5, 9)
    assert schema.cartilage_of("femur").id == 2
    assert schema.cartilage_of("tibia").name == "tibial_cartilage"
    assert schema.lesion_of("patella").name == "patellar_bml"
    assert schema.ids == frozenset(range(10))


def test_check_values_rejects_unknown_labels() -> None:
    schema = load_schema("oai_zib")
    schema.check_values(np.array([0, 1, 9], np.uint16), "ok.nii.gz")
    with pytest.raises(InputError, match=r"bad.nii.gz: label values \[12\]"):
        schema.check_values(np.array([0, 12], np.uint16), "bad.nii.gz")


@pytest.mark.parametrize("text, problem", [
    ("name: x\nstructures:\n  - {id: 1, name: femur, kind: bone, colour: red}\n", "unknown keys"),
    ("name: x\nstructures:\n  - {id: 1, name: femur, kind: organ}\n", "has kind"),
    ("name: x\nstructures:\n  - {id: 2, name: cart, kind: cartilage, bone: femur}\n", "unknown bone"),
    ("name: x\nversion: 2\nstructures: []\n", "unknown keys"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_bad_schema_files_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=problem):
        load_schema(path)
