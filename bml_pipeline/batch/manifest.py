"""Batch manifests: which scans to process.

A manifest is a CSV file (or YAML: a list of mappings, or a mapping with a ``scans`` list) with one row
per scan and the columns

- ``subject``, ``visit`` (required): identifiers; they name the run directory ``<out>/<subject>/<visit>/``,
  so they may hold letters, digits, ``.``, ``_`` and ``-`` only;
- ``image`` and/or ``labels``: paths relative to the manifest file (absolute paths work too); a row
  without ``labels`` is segmented;
- ``side`` (optional): ``left`` or ``right``; empty when unknown;
- ``model`` (optional): the segmentation model for this row when it has no labels.

:func:`load_manifest` validates everything before any work starts and reports every problem at once
in one :class:`~bml_pipeline.errors.InputError`.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bml_pipeline.errors import InputError

REQUIRED_COLUMNS = ("subject", "visit")
PATH_COLUMNS = ("image", "labels")
OPTIONAL_COLUMNS = ("side", "model", "series", "date")
KNOWN_COLUMNS = REQUIRED_COLUMNS + PATH_COLUMNS + OPTIONAL_COLUMNS
SIDES = ("left", "right")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_MAX_LISTED = 50


@dataclass(frozen=True)
class ScanSpec:
    """One scan of a manifest. Paths are absolute."""

    subject: str
    visit: str
    image: Path | None = None
    labels: Path | None = None
    side: str | None = None
    model: str | None = None
    series: str | None = None
    """DICOM series instance UID, for an image folder that holds several series."""
    date: str | None = None
    """Acquisition date ``YYYY-MM-DD`` (else the image's own, when DICOM)."""

    @property
    def key(self) -> tuple[str, str]:
        """``(subject, visit)``, unique within a manifest."""
        return (self.subject, self.visit)

    def run_dir(self, out: Path, layout: str = "default") -> Path:
        """The scan's run directory under the batch output folder ``out``: ``<subject>/<visit>`` or, with
        ``layout="bids"``, ``sub-<subject>/ses-<visit>`` (BIDS-derivatives-like)."""
        if layout == "bids":
            return Path(out) / f"sub-{self.subject}" / f"ses-{self.visit}"
        return Path(out) / self.subject / self.visit


LAYOUTS = ("default", "bids")
_BIDS_LABEL = re.compile(r"[A-Za-z0-9]+")


def pair_dir(out: Path, baseline: ScanSpec, followup: ScanSpec, layout: str = "default") -> Path:
    """The folder of a visit pair's ``change.json``: ``<subject>/changes/<a>_to_<b>`` or, with the BIDS
    layout, ``sub-<subject>/changes/ses-<a>_to_ses-<b>``."""
    if layout == "bids":
        return Path(out) / f"sub-{baseline.subject}" / "changes" / f"ses-{baseline.visit}_to_ses-{followup.visit}"
    return Path(out) / baseline.subject / "changes" / f"{baseline.visit}_to_{followup.visit}"


def check_bids_labels(specs: list[ScanSpec], manifest: Path) -> None:
    """BIDS labels are letters and digits only: refuse a manifest whose subjects or visits are not."""
    bad = sorted({v for s in specs for v in (s.subject, s.visit) if not _BIDS_LABEL.fullmatch(v)})
    if bad:
        raise InputError(manifest, f"--layout bids needs subject and visit labels of letters and digits only; "
                                   f"not {', '.join(repr(b) for b in bad[:5])}{' ...' if len(bad) > 5 else ''}")


def write_dataset_description(out: Path) -> None:
    """``dataset_description.json`` of a BIDS-derivatives-like output folder."""
    import json

    from bml_pipeline import __version__
    from bml_pipeline.io import write_text_atomic

    description = {"Name": "bml-pipeline derivatives", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "bml-pipeline", "Version": __version__}]}
    write_text_atomic(Path(out) / "dataset_description.json", json.dumps(description, indent=2) + "\n")


def visit_sort_key(visit: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order of visit names: ``00m < 12m < 96m < 120m``, ``V2 < V10``."""
    parts = re.findall(r"\d+|\D+", visit)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def scan_sort_key(spec: ScanSpec) -> tuple[Any, ...]:
    """Sort key of scans: by subject, then visit in natural order."""
    return (spec.subject, visit_sort_key(spec.visit), spec.visit)


def load_manifest(path: str | Path) -> tuple[ScanSpec, ...]:
    """Read and validate a manifest; scans come back sorted by subject and visit.

    Raises:
        InputError: naming the manifest and listing every problem found (unknown or missing columns,
            missing files, duplicate (subject, visit) rows, bad identifiers or sides).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        columns, rows = _read_yaml(path)
    else:
        columns, rows = _read_csv(path)
    return _validate(path, columns, rows)


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise InputError(path, "manifest is empty")
            columns = [c.strip() for c in header]
            rows = []
            for record in reader:
                if not any(cell.strip() for cell in record):
                    continue
                if len(record) > len(columns):
                    raise InputError(path, f"line {reader.line_num}: {len(record)} fields but the header has "
                                           f"{len(columns)}")
                rows.append((reader.line_num, dict(zip(columns, (c.strip() for c in record)))))
    except UnicodeDecodeError:
        raise InputError(path, "manifest is not a UTF-8 text file") from None
    except csv.Error as exc:
        raise InputError(path, f"not a valid CSV file ({exc})") from None
    return columns, rows


def _read_yaml(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(path, f"manifest is not valid YAML ({exc.__class__.__name__})") from None
    if isinstance(raw, dict) and set(raw) == {"scans"}:
        raw = raw["scans"]
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise InputError(path, "a YAML manifest must be a list of mappings (or a mapping with a 'scans' list)")
    columns: list[str] = []
    for entry in raw:
        columns.extend(str(k) for k in entry if str(k) not in columns)
    rows = [(i + 1, {str(k): "" if v is None else str(v).strip() for k, v in entry.items()})
            for i, entry in enumerate(raw)]
    return columns, rows


def _validate(path: Path, columns: list[str], rows: list[tuple[int, dict[str, str]]]) -> tuple[ScanSpec, ...]:
    where = "entry" if path.suffix.lower() in (".yaml", ".yml") else "line"
    problems: list[str] = []
    unknown = [c for c in columns if c not in KNOWN_COLUMNS]
    if unknown:
        problems.append(f"unknown columns {unknown} (known: {list(KNOWN_COLUMNS)})")
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing_cols:
        problems.append(f"missing required columns {missing_cols}")
    if not any(c in columns for c in PATH_COLUMNS):
        problems.append("needs an 'image' or a 'labels' column")
    if problems:
        raise InputError(path, "; ".join(problems))
    if not rows:
        raise InputError(path, "manifest has no scans")

    base = path.resolve().parent
    specs: list[ScanSpec] = []
    seen: dict[tuple[str, str], int] = {}
    for line, row in rows:
        here = f"{where} {line}"
        subject, visit = row.get("subject", ""), row.get("visit", "")
        row_ok = True
        for name, value in (("subject", subject), ("visit", visit)):
            if not value:
                problems.append(f"{here}: empty {name}")
                row_ok = False
            elif not _SAFE_NAME.match(value):
                problems.append(f"{here}: {name} {value!r} may hold only letters, digits, '.', '_', '-'")
                row_ok = False
        if row_ok:
            first = seen.setdefault((subject, visit), line)
            if first != line:
                problems.append(f"{here}: duplicate subject {subject!r} visit {visit!r} (first at {where} {first})")
        paths: dict[str, Path | None] = {}
        for column in PATH_COLUMNS:
            value = row.get(column, "")
            paths[column] = None
            if value:
                resolved = (base / Path(value).expanduser()).resolve()
                paths[column] = resolved
                if not resolved.exists():
                    problems.append(f"{here}: {column} file not found: {value}")
        if paths["image"] is None and paths["labels"] is None:
            problems.append(f"{here}: neither image nor labels given")
        side = row.get("side", "").lower() or None
        if side is not None and side not in SIDES:
            problems.append(f"{here}: side {row['side']!r} is not 'left', 'right' or empty")
        date = row.get("date", "").strip() or None
        if date is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
            problems.append(f"{here}: date {row['date']!r} is not YYYY-MM-DD")
        specs.append(ScanSpec(subject, visit, paths["image"], paths["labels"], side, row.get("model") or None,
                              row.get("series") or None, date))
    if problems:
        listed = problems[:_MAX_LISTED]
        more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise InputError(path, f"{len(problems)} problem(s): " + "; ".join(listed) + more)
    return tuple(sorted(specs, key=scan_sort_key))
