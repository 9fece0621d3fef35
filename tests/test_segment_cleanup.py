"""Anatomical clean-up of predicted labels: stray bone pieces and cartilage off its bone are removed."""

from __future__ import annotations

import numpy as np

from bml_pipeline.labels import load_schema
from bml_pipeline.segment.cleanup import clean_anatomy
from bml_pipeline.volume import Volume


def test_keeps_largest_bone_piece_and_cartilage_on_its_bone() -> None:
    schema = load_schema("oai_zib")
    arr = np.zeros((30, 30, 30), np.uint8)
    arr[5:20, 5:20, 5:15] = 1          # femur
    arr[8:12, 8:12, 8:11] = 7          # femoral lesion inside it: part of the femur's piece
    arr[5:20, 5:20, 15:17] = 2         # femoral cartilage on the femur
    arr[25:28, 25:28, 25:28] = 1       # stray "femur" blob in a muscle
    arr[25:28, 2:4, 2:4] = 2           # cartilage fleck with no bone under it
    arr[2:4, 25:28, 2:4] = 6           # patellar cartilage, but no patella
    cleaned = clean_anatomy(Volume(arr, np.diag([0.7, 0.36, 0.36, 1.0])), schema).array
    expected = arr.copy()
    expected[25:28, 25:28, 25:28] = 0
    expected[25:28, 2:4, 2:4] = 0
    expected[2:4, 25:28, 2:4] = 0
    np.testing.assert_array_equal(cleaned, expected)


def test_bone_piece_under_the_cartilage_wins_over_a_larger_stray_piece() -> None:
    schema = load_schema("oai_zib")
    arr = np.zeros((40, 20, 20), np.uint8)
    arr[2:6, 2:10, 2:10] = 1           # articular end of the femur
    arr[2:6, 2:10, 10:12] = 2          # its cartilage
    arr[15:38, 2:18, 2:18] = 1         # larger false "femur" in a muscle, no cartilage on it
    cleaned = clean_anatomy(Volume(arr, np.eye(4)), schema).array
    assert (cleaned[15:38] == 0).all()
    np.testing.assert_array_equal(cleaned[:10], arr[:10])
