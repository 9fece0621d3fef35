"""Shared fixtures. Tests that need ``../shared/data`` skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BML_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (set BML_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def oai_labels_dir() -> Path:
    """Folder of the 52 real OAI label maps."""
    return _require(SHARED_DATA / "oai_labels")


@pytest.fixture(scope="session")
def dess_dicom_dir() -> Path:
    """Folder of the real DESS knee (echo1/, echo2/)."""
    return _require(SHARED_DATA / "knee_dess_dicom")
