"""The resume store: a completion marker per finished scan or visit pair, written last.

``<run_dir>/done.json`` records the SHA-256 of every input, a digest of the batch settings that change
results, the job's cohort-table row, and the SHA-256 of every output file the job wrote (``outputs``:
path relative to the marker's folder -> checksum). A job counts as finished only when the marker exists,
its input checksums and settings digest match the current inputs, and every recorded output still exists
with its recorded checksum; every other job is (re)computed. All other outputs of a job are written
(atomically) before its marker, so a killed batch never leaves a marker next to incomplete outputs.

A visit pair also re-renders its follow-up scan's ``report.html``: it records that file among its own
outputs and updates the follow-up's marker to the new checksum (:func:`update_outputs`). Pairs key on
:func:`scan_identity` (inputs, settings and row of a scan's marker, not its outputs), so a scan that is
recomputed with the same results keeps its pairs, and a pair whose outputs were lost is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bml_pipeline.io import write_text_atomic

log = logging.getLogger(__name__)

MARKER_NAME = "done.json"
MARKER_VERSION = 2  # 2: output checksums (version-1 markers are recomputed)

# Temporary files of bml_pipeline.io.atomic_path: ".<name>.<8 random chars>.tmp<suffixes>".
_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^/]*)?$")
_CHUNK = 1 << 20


def settings_digest(settings: dict[str, Any]) -> str:
    """A short stable digest of the settings that change a scan's results."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def output_checksums(base: Path, paths: Iterable[Path]) -> dict[str, str]:
    """``{path relative to base (POSIX, may hold ..): sha256}`` of output files."""
    return {Path(os.path.relpath(p, base)).as_posix(): sha256_file(p) for p in sorted(paths)}


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    """The marker of ``run_dir``, or None when there is none or it is unreadable."""
    try:
        marker = json.loads((run_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: ignoring unreadable completion marker (%s)", run_dir / MARKER_NAME, exc)
        return None
    if not (isinstance(marker, dict) and marker.get("version") == MARKER_VERSION
            and isinstance(marker.get("outputs"), dict)):
        return None
    return marker


def stale_outputs(run_dir: Path, outputs: dict[str, str]) -> list[str]:
    """The recorded outputs that are missing or whose checksum differs (``"<name> is missing"``,
    ``"<name> has changed"``)."""
    stale = []
    for name, checksum in outputs.items():
        try:
            if sha256_file(run_dir / name) != checksum:
                stale.append(f"{name} has changed")
        except OSError:
            stale.append(f"{name} is missing")
    return stale


def finished_row(run_dir: Path, checksums: dict[str, str], digest: str) -> dict[str, Any] | None:
    """The stored cohort row when ``run_dir`` holds a finished job of exactly these inputs and settings
    whose recorded outputs are all present and unchanged; else None (the job must be recomputed)."""
    marker = read_marker(run_dir)
    if marker is None or marker.get("inputs") != checksums or marker.get("settings") != digest:
        return None
    row = marker.get("row")
    if not isinstance(row, dict):
        return None
    stale = stale_outputs(run_dir, marker["outputs"])
    if stale:
        log.warning("%s: finished earlier, but %s; recomputing", run_dir, ", ".join(stale))
        return None
    return row


def write_marker(run_dir: Path, checksums: dict[str, str], digest: str, row: dict[str, Any],
                 outputs: dict[str, str]) -> None:
    """Mark ``run_dir`` finished; call after every other output is in place. ``outputs``: checksums of
    the files the job wrote (:func:`output_checksums` with ``run_dir`` as base)."""
    marker = {"version": MARKER_VERSION, "inputs": checksums, "settings": digest, "row": row,
              "outputs": dict(sorted(outputs.items()))}
    # Key order of the row kept: the row's column order must survive a resume.
    write_text_atomic(run_dir / MARKER_NAME, json.dumps(marker, indent=1) + "\n")


def update_outputs(run_dir: Path, outputs: dict[str, str]) -> bool:
    """Record new checksums of outputs of a finished job that another job rewrote (the follow-up report
    of a visit pair). False when ``run_dir`` has no valid marker (nothing to update)."""
    marker = read_marker(run_dir)
    if marker is None:
        return False
    marker["outputs"] = dict(sorted({**marker["outputs"], **outputs}.items()))
    write_text_atomic(run_dir / MARKER_NAME, json.dumps(marker, indent=1) + "\n")
    return True


def scan_identity(run_dir: Path) -> str:
    """Digest of what a finished scan is (its inputs, settings and results, not the checksums of its
    output files). Raises OSError (FileNotFoundError) when the scan has no valid marker."""
    marker = read_marker(run_dir)
    if marker is None:
        raise FileNotFoundError(2, "no completion marker", str(run_dir / MARKER_NAME))
    identity = {k: marker.get(k) for k in ("inputs", "settings", "row")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def clear_marker(run_dir: Path) -> None:
    """Remove ``run_dir``'s marker before its outputs are rewritten."""
    (run_dir / MARKER_NAME).unlink(missing_ok=True)


def remove_partial(run_dir: Path) -> list[Path]:
    """Remove temporary files of atomic writes that a killed job left in ``run_dir``; returns them."""
    removed = []
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return removed
    for entry in entries:
        if _PARTIAL.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def snapshot(run_dir: Path) -> dict[str, tuple[int, int, int]]:
    """``{file name: (inode, mtime_ns, size)}`` of the regular files directly in ``run_dir``."""
    files = {}
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return files
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                files[entry.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            continue
    return files


def written_since(run_dir: Path, before: dict[str, tuple[int, int, int]], exclude: Iterable[str] = ()
                  ) -> list[Path]:
    """Files in ``run_dir`` created or rewritten since :func:`snapshot` gave ``before`` (temporary files,
    the marker and ``exclude`` left out)."""
    skip = {MARKER_NAME, *exclude}
    return [run_dir / name for name, stat in snapshot(run_dir).items()
            if name not in skip and not _PARTIAL.match(name) and before.get(name) != stat]
