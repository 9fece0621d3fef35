"""Label schemas: which integer id is which structure, and how bones, lesions and cartilage relate.

Schemas are YAML files (``configs/labels/<name>.yaml``) loaded with ``yaml.safe_load``; unknown keys
are errors. A bone's full extent is its bone label plus its lesion label.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from bml_pipeline.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("bone", "cartilage", "lesion", "other")


@dataclass(frozen=True)
class Structure:
    """One labelled structure. ``bone`` links a cartilage plate or lesion label to its bone."""

    id: int
    name: str
    kind: str
    bone: str | None = None


@dataclass(frozen=True)
class LabelSchema:
    """A label map's vocabulary."""

    name: str
    structures: tuple[Structure, ...]
    background: int = 0
    description: str = ""

    @property
    def ids(self) -> frozenset[int]:
        """All valid label values, background included."""
        return frozenset({self.background, *(s.id for s in self.structures)})

    def by_name(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(f"no structure named {name!r} in label schema {self.name!r}")

    def by_id(self, label_id: int) -> Structure:
        for s in self.structures:
            if s.id == label_id:
                return s
        raise KeyError(f"no label {label_id} in label schema {self.name!r}")

    def of_kind(self, kind: str) -> tuple[Structure, ...]:
        return tuple(s for s in self.structures if s.kind == kind)

    @property
    def bones(self) -> tuple[Structure, ...]:
        return self.of_kind("bone")

    def lesion_of(self, bone: str) -> Structure | None:
        """The lesion label inside ``bone``, if the schema has one."""
        return next((s for s in self.of_kind("lesion") if s.bone == bone), None)

    def cartilage_of(self, bone: str) -> Structure | None:
        """The cartilage plate on ``bone``, if the schema has one."""
        return next((s for s in self.of_kind("cartilage") if s.bone == bone), None)

    def bone_ids(self, bone: str) -> tuple[int, ...]:
        """Label ids whose union is the bone's full extent (bone + its lesions)."""
        lesion = self.lesion_of(bone)
        return (self.by_name(bone).id,) + ((lesion.id,) if lesion else ())

    def check_values(self, array: np.ndarray, source: str | Path | None = None) -> None:
        """Raise :class:`InputError` if ``array`` holds values that are not labels of this schema."""
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)):
                raise InputError(source, "label map contains NaN or Inf voxels")
            if np.any(array != np.round(array)):
                raise InputError(source, "label map contains non-integer values")
        # bincount is far faster than np.unique on large label maps.
        values = present_values(array)
        unknown = sorted(set(values) - self.ids)
        if unknown:
            raise InputError(
                source, f"label values {unknown[:10]} are not in label schema {self.name!r} "
                f"(valid: {sorted(self.ids)})"
            )


def present_values(array: np.ndarray) -> list[int]:
    """Sorted distinct integer values of ``array``."""
    flat = np.asarray(array).ravel(order="K")  # memory order: no copy of a Fortran-ordered map
    lo, hi = int(flat.min()), int(flat.max())
    if lo >= 0 and hi < 65536:
        counts = np.bincount(flat.astype(np.int64, copy=False), minlength=hi + 1)
        return [int(v) for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(flat)]


def load_schema(name_or_path: str | Path = "oai_zib") -> LabelSchema:
    """Load a label schema by name (from ``configs/labels``) or from a YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "labels" / f"{name_or_path}.yaml"
    return _load_schema_file(str(path.resolve()))


@lru_cache(maxsize=8)
def _load_schema_file(path: str) -> LabelSchema:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(path, "label schema not found") from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"label schema is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise InputError(path, "label schema must be a mapping")
    unknown = set(raw) - {"name", "description", "background", "structures"}
    if unknown:
        raise InputError(path, f"unknown keys in label schema: {sorted(unknown)}")
    structures = []
    for entry in raw.get("structures") or []:
        extra = set(entry) - {"id", "name", "kind", "bone"}
        if extra:
            raise InputError(path, f"unknown keys in structure {entry}: {sorted(extra)}")
        if entry.get("kind") not in KINDS:
            raise InputError(path, f"structure {entry.get('name')!r} has kind {entry.get('kind')!r}, expected one of {KINDS}")
        structures.append(Structure(int(entry["id"]), str(entry["name"]), entry["kind"], entry.get("bone")))
    schema = LabelSchema(str(raw.get("name", Path(path).stem)), tuple(structures),
                         int(raw.get("background", 0)), str(raw.get("description", "")))
    names = {s.name for s in structures}
    if len(names) != len(structures) or len({s.id for s in structures}) != len(structures):
        raise InputError(path, "structure names and ids must be unique")
    for s in structures:
        if s.bone is not None and s.bone not in names:
            raise InputError(path, f"structure {s.name!r} refers to unknown bone {s.bone!r}")
    return schema
