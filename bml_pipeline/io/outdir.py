"""Output folders: checked before any work, written as one unit.

:func:`check_output_dir` runs first in every command that writes a folder: the destination must be a
folder (or creatable), writable, and either empty or a run of ours that ``--force`` replaces. A
folder holding anything else is never touched.

:func:`staged_dir` gives a fresh sibling folder to write into; when the work succeeds its files replace
the destination's pipeline outputs (nothing from an earlier run survives), and when it fails it is
removed (no partial output).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bml_pipeline.errors import InputError

PACKAGE = "bml-pipeline"
OWN_MARKERS = ("provenance.json", "change.json")


def is_own_run(folder: Path) -> bool:
    """True when ``folder`` holds a ``provenance.json`` or ``change.json`` written by this package."""
    for name in OWN_MARKERS:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(data, dict) and (data.get("package") == PACKAGE or "pipeline_version" in data
                                           or "same_knee" in data):
                return True
    return False


def check_output_dir(path: str | Path, *, force: bool = False) -> Path:
    """Refuse, before any work, an output folder that cannot or must not be written.

    Raises:
        InputError: ``path`` is a file; it cannot be created or written; it is not empty and is not a
            run of ours; it is a run of ours and ``force`` is False.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "output path is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(path, f"output folder cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(path, f"output folder cannot be written (no write permission on {existing})")
    if path.is_dir() and any(path.iterdir()):
        if not is_own_run(path):
            raise InputError(path, "output folder is not empty and is not a bml-pipeline run; choose a new or "
                                   "empty folder")
        if not force:
            raise InputError(path, "output folder already holds a run; pass --force to replace it")
    return path


OUTPUT_PATTERNS = ("labels.nii.gz", "labels.nii", "labels.ctbl", "labels_itksnap.txt", "labels_seg.dcm",
                   "measurements.json", "measurements.csv", "measurements_sr.dcm", "provenance.json",
                   "thickness_*.nii.gz", "report.html", "report.pdf", "change.json", "change.csv")
"""Files the pipeline's stages write into a run folder; an earlier run's copies never survive a new run."""


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``. On success the pipeline outputs already in
    ``final`` (:data:`OUTPUT_PATTERNS`) are removed and the staged files moved in (each by an atomic
    rename); other files there (a batch's log and markers) stay. On an exception the staging folder
    is removed and ``final`` is left as it was: no partial output."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        final.mkdir(exist_ok=True)
        for pattern in OUTPUT_PATTERNS:
            for stale in final.glob(pattern):
                if stale.is_file():
                    stale.unlink()
        for item in sorted(staging.iterdir()):
            os.replace(item, final / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
