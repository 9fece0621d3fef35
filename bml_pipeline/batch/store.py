"""The resume store: a completion marker per finished scan, written last.

``<run_dir>/done.json`` records the SHA-256 of every input, a digest of the batch settings that change
results, and the scan's cohort-table row. A scan counts as finished only when the marker exists and
its checksums and settings digest match the current inputs; every other scan is (re)computed. All
other outputs of a scan are written (atomically) before its marker, so a killed batch never leaves a
marker next to incomplete outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from bml_pipeline.io import write_text_atomic

log = logging.getLogger(__name__)

MARKER_NAME = "done.json"
MARKER_VERSION = 1


def settings_digest(settings: dict[str, Any]) -> str:
    """A short stable digest of the settings that change a scan's results."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    """The marker of ``run_dir``, or None when there is none or it is unreadable."""
    try:
        marker = json.loads((run_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: ignoring unreadable completion marker (%s)", run_dir / MARKER_NAME, exc)
        return None
    return marker if isinstance(marker, dict) and marker.get("version") == MARKER_VERSION else None


def finished_row(run_dir: Path, checksums: dict[str, str], digest: str) -> dict[str, Any] | None:
    """The stored cohort row when ``run_dir`` holds a finished scan of exactly these inputs and settings."""
    marker = read_marker(run_dir)
    if marker is None or marker.get("inputs") != checksums or marker.get("settings") != digest:
        return None
    row = marker.get("row")
    return row if isinstance(row, dict) else None


def write_marker(run_dir: Path, checksums: dict[str, str], digest: str, row: dict[str, Any]) -> None:
    """Mark ``run_dir`` finished; call after every other output is in place."""
    marker = {"version": MARKER_VERSION, "inputs": checksums, "settings": digest, "row": row}
    # Key order kept: the row's column order must survive a resume.
    write_text_atomic(run_dir / MARKER_NAME, json.dumps(marker, indent=1) + "\n")


def clear_marker(run_dir: Path) -> None:
    """Remove ``run_dir``'s marker before its outputs are rewritten."""
    (run_dir / MARKER_NAME).unlink(missing_ok=True)
