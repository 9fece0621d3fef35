"""The README's Python example runs as written (a doctest), from a folder holding the sample data."""

from __future__ import annotations

import doctest
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_readme_python_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sample_data").symlink_to(REPO / "sample_data")
    monkeypatch.chdir(tmp_path)
    result = doctest.testfile(str(REPO / "README.md"), module_relative=False, optionflags=doctest.ELLIPSIS,
                              verbose=False, report=True)
    assert result.attempted >= 8
    assert result.failed == 0, f"{result.failed} README example lines failed (see the output above)"
    assert os.path.isfile(tmp_path / "runs" / "api" / "12m" / "measurements.json")
