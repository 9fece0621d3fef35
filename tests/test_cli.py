"""CLI contract: help, exit codes, one-line errors, --debug tracebacks, python -m entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bml_pipeline.cli import main
from bml_pipeline.errors import InputError


def test_no_command_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == 2
    assert "usage: bml-pipeline" in capsys.readouterr().err


def test_debug_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        main(["--debug", "info", str(tmp_path / "missing.nii.gz")])


def test_module_entry_point_runs_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bml_pipeline", "info", str(tmp_path / "x.nii")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"bml-pipeline: error: {tmp_path / 'x.nii'}: file not found"
