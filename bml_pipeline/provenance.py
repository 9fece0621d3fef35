"""Provenance records: how an output was made (package version, configuration, input checksums,
timings), written beside the outputs as ``provenance.json``. Timings and dates live only here, never
in the measurements, so measurements stay byte-identical between runs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bml_pipeline import __version__
from bml_pipeline.errors import InputError

_CHUNK = 1 << 20


def sha256_path(path: str | Path) -> str:
    """SHA-256 (hex) of a file, or of a directory's files (sorted relative names and contents, e.g. a
    DICOM series), read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            _update(digest, file)
    elif path.is_file():
        _update(digest, path)
    else:
        raise InputError(path, "file not found")
    return digest.hexdigest()


def provenance_record(*, step: str, inputs: Mapping[str, str | Path | None], config: Mapping[str, Any],
                      timings_s: Mapping[str, float], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready provenance record.

    Args:
        step: what produced the outputs (e.g. ``"measure"``).
        inputs: role -> path of every input file (None entries are skipped); each is recorded as an
            absolute path (later stages reload it from any working directory) with its sha256.
        config: the resolved configuration actually used.
        timings_s: seconds per step.
        extra: further fields (model id and checksum, label schema, side source ...).
    """
    import numpy
    import scipy

    record: dict[str, Any] = {
        "step": step,
        "package": "bml-pipeline",
        "version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "libraries": {"numpy": numpy.__version__, "scipy": scipy.__version__},
        "inputs": {role: {"path": str(Path(p).resolve()), "sha256": sha256_path(p)}
                   for role, p in inputs.items() if p is not None},
        "config": dict(config),
        "timings_s": {k: round(float(v), 4) for k, v in timings_s.items()},
    }
    if extra:
        record.update(extra)
    return record


def _update(digest: Any, file: Path) -> None:
    with file.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
