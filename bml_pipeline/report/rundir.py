"""Reading a run directory (``measurements.json``, ``provenance.json``, labels, image, thickness maps).

Everything except ``measurements.json`` is optional: a report shows what the run has and says
"absent" for the rest. Paths named inside the run's files are untrusted strings; they are only used
to open files and are escaped when shown.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema, load_schema
from bml_pipeline.volume import Volume

log = logging.getLogger(__name__)

LABEL_NAMES = ("labels.nii.gz", "labels.nii", "segmentation.nii.gz")
IMAGE_NAMES = ("image.nii.gz", "image.nii")


@dataclass(frozen=True)
class RunData:
    """One scan's run directory, loaded.

    Attributes:
        run_dir: the directory.
        measurements: parsed ``measurements.json``.
        provenance: parsed ``provenance.json`` (empty when absent).
        schema: label schema of the label map.
        labels: label map, or None when the run has none readable.
        image: the MR image on the labels' grid, or None.
        thickness: plate name -> thickness map (mm per voxel, 0 outside cartilage).
        change: parsed ``change.json`` when the run directory holds one.
        notes: problems met while loading optional parts (shown in the report).
    """

    run_dir: Path
    measurements: dict[str, Any]
    provenance: dict[str, Any]
    schema: LabelSchema
    labels: Volume | None
    image: Volume | None
    thickness: dict[str, Volume] = field(default_factory=dict)
    change: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()


def read_json(path: Path, required: bool, missing: str = "file not found (is this a run directory written by "
                                                             "`bml-pipeline measure`?)") -> dict[str, Any] | None:
    """Parse a JSON object from ``path``; None when absent and not ``required`` (else ``missing``)."""
    if not path.is_file():
        if required:
            raise InputError(path, missing)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object at the top level")
    return data


def load_run(run_dir: str | Path, *, with_image: bool = True) -> RunData:
    """Load the run directory ``run_dir``. Its volumes are read concurrently (decompression releases
    the interpreter lock, so several cores help).

    Raises:
        InputError: the directory or its ``measurements.json`` is missing or unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run directory not found")
    measurements = read_json(run_dir / "measurements.json", required=True) or {}
    provenance = read_json(run_dir / "provenance.json", required=False) or {}
    change = read_json(run_dir / "change.json", required=False)
    notes: list[str] = []
    schema = _schema(provenance, measurements)

    labels_path = _find_file(run_dir, LABEL_NAMES, _input_paths(provenance, ("labels", "segmentation")))
    image_path = _find_file(run_dir, IMAGE_NAMES, _input_paths(provenance, ("image",))) if with_image else None
    for path in (labels_path, image_path):
        _verify_recorded_checksum(path, provenance)
    thickness_files = sorted(p for p in run_dir.glob("*thickness*.nii*") if p.is_file())
    loaded = _read_volumes({"labels": labels_path, "image": image_path if labels_path else None,
                            **{str(p): p for p in thickness_files}})

    labels = loaded.get("labels")
    if labels_path is None:
        notes.append("no label map found in the run directory or its provenance")
    elif isinstance(labels, InputError):
        notes.append(f"label map not shown: {labels}")
        labels = None
    image = loaded.get("image")
    if isinstance(image, InputError):
        notes.append(f"image not shown: {image}")
        image = None
    elif image is not None and labels is not None and not image.same_grid(labels):
        notes.append("the image and the label map are on different voxel grids; labels are shown alone")
        image = None
    maps = {str(p): loaded[str(p)] for p in thickness_files}
    thickness = _thickness_maps(maps, schema, labels, notes)
    return RunData(run_dir, measurements, provenance, schema, labels, image, thickness, change, tuple(notes))


def _read_volumes(paths: dict[str, Path | None]) -> dict[str, Volume | InputError]:
    """Read the given volumes concurrently; the ``labels`` entry as a label map. Bad files give their
    :class:`InputError` instead of a volume (the report shows it); absent paths are left out."""
    from concurrent.futures import ThreadPoolExecutor

    from bml_pipeline.io import read_labels, read_volume

    def read(key: str, path: Path) -> Volume | InputError:
        try:
            # Label values outside the schema are simply not drawn; the measure stage checked them.
            return read_labels(path) if key == "labels" else read_volume(path)
        except InputError as exc:
            return exc

    jobs = {key: path for key, path in paths.items() if path is not None}
    with ThreadPoolExecutor(max_workers=max(1, min(4, len(jobs)))) as pool:
        futures = {key: pool.submit(read, key, path) for key, path in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def _schema(provenance: dict[str, Any], measurements: dict[str, Any]) -> LabelSchema:
    name = (_dig(provenance, ("config", "label_schema")) or _dig(provenance, ("config", "schema"))
            or _dig(provenance, ("label_schema",)) or measurements.get("label_schema"))
    if isinstance(name, str):
        try:
            return load_schema(name)
        except InputError:
            log.warning("label schema %r not found; using oai_zib", name)
    return load_schema("oai_zib")


def _dig(data: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _verify_recorded_checksum(path: Path | None, provenance: dict[str, Any]) -> None:
    """A reloaded input must be the file the run measured: its SHA-256 must match the one recorded in
    provenance for that path (files inside the run directory are the run's own outputs)."""
    from bml_pipeline.provenance import sha256_path

    inputs = provenance.get("inputs")
    if path is None or not isinstance(inputs, dict):
        return
    for entry in inputs.values():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        same_file = Path(entry["path"]).resolve() == path.resolve() and isinstance(entry.get("sha256"), str)
        if same_file and sha256_path(path) != entry["sha256"]:
            raise InputError(path, "file changed since the run measured it (SHA-256 differs from "
                                   "provenance.json); measure it again")


def _input_paths(provenance: dict[str, Any], kinds: tuple[str, ...]) -> list[Path]:
    """Paths recorded in provenance ``inputs`` (role -> {"path": ...}) under one of ``kinds``."""
    inputs = provenance.get("inputs")
    found: list[Path] = []
    for kind in kinds:
        entry = inputs.get(kind) if isinstance(inputs, dict) else None
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(path, str) and path:
            found.append(Path(path))
    return found


def _find_file(run_dir: Path, names: tuple[str, ...], recorded: list[Path]) -> Path | None:
    for name in names:
        if (run_dir / name).exists():
            return run_dir / name
    for path in recorded:  # absolute since provenance records them so; a relative one is taken from run_dir
        candidate = path if path.is_absolute() else run_dir / path
        if candidate.exists():
            return candidate
    return None


def _thickness_maps(maps: dict[str, Volume | InputError], schema: LabelSchema, labels: Volume | None,
                    notes: list[str]) -> dict[str, Volume]:
    """Plate -> thickness map, from the run's ``*thickness*.nii[.gz]`` files (path -> volume): a file
    naming the plate, else one shared file masked by the plate's label."""
    plates = schema.of_kind("cartilage")
    for volume in maps.values():
        if isinstance(volume, InputError):
            notes.append(f"thickness map not shown: {volume}")
    good = {path: v for path, v in maps.items() if isinstance(v, Volume)}
    out: dict[str, Volume] = {}
    shared = next((v for path, v in good.items() if not any(c.name in Path(path).name for c in plates)), None)
    for plate in plates:
        own = next((v for path, v in good.items() if plate.name in Path(path).name), None)
        if own is not None:
            out[plate.name] = own
        elif shared is not None and labels is not None and shared.same_grid(labels):
            out[plate.name] = shared.with_array(shared.array * (labels.array == plate.id))
    return out
