"""Two visits of a phantom knee with a known change, synthesized images, and their files on disk.

:func:`phantom_visits` makes the label maps (re-rasterized in each visit's pose), the images and the
truth of both visits; :func:`write_visits` writes them (NIfTI + JSON, each file atomically, only after
everything was computed) with a batch manifest ``manifest.csv`` (``subject,visit,image,labels,side``,
paths relative to the manifest).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bml_pipeline.io import write_nifti, write_text_atomic
from bml_pipeline.synth.change import phantom_followup, rigid_to_dict, visit_transform
from bml_pipeline.synth.image import synthesize
from bml_pipeline.synth.phantom import KneeSpec, Pose, make_phantom
from bml_pipeline.volume import Volume

MANIFEST_COLUMNS = ("subject", "visit", "image", "labels", "side")


@dataclass(frozen=True)
class Visit:
    """One visit: its name ("00m"), label map, synthesized image and truth (JSON-ready)."""

    name: str
    labels: Volume
    image: Volume
    truth: dict[str, Any]


def phantom_visits(baseline: KneeSpec, *, bml_change_cm3: dict[str, float] | None = None,
                   thickness_change_percent: dict[str, float] | None = None, followup_pose: Pose | None = None,
                   spacing: tuple[float, float, float] = (1.0, 0.5, 0.5), preset: str = "dess",
                   snr: float | None = 20.0, seed: int = 0, visits: tuple[str, str] = ("00m", "12m"),
                   margin_mm: float = 4.0) -> list[Visit]:
    """Baseline and follow-up of a phantom knee, with images synthesized on each visit's grid.

    Each visit gets the smallest grid along the array axes (spacing ``spacing``, RAS axis directions)
    that holds its knee. The follow-up's truth has a ``change`` entry: lesion volume per bone and mean
    plate thickness at both visits, their differences, and the rigid world transform from the
    baseline knee to the follow-up knee.
    """
    from bml_pipeline.synth.phantom import phantom_grid

    follow = phantom_followup(baseline, bml_change_cm3=bml_change_cm3,
                              thickness_change_percent=thickness_change_percent, pose=followup_pose)
    out = []
    truths = []
    for index, (name, spec) in enumerate(zip(visits, (baseline, follow))):
        shape, affine = phantom_grid(spec, spacing, margin_mm)
        phantom = make_phantom(spec, shape, affine)
        image = synthesize(phantom.labels, preset=preset, seed=seed * 1000 + index, snr=snr).image
        truth = {"visit": name, **phantom.truth.to_dict()}
        truths.append(truth)
        out.append(Visit(name, phantom.labels, image, truth))
    base, fol = truths
    change: dict[str, Any] = {"from_visit": visits[0], "to_visit": visits[1],
                              "requested": {"bml_change_cm3": dict(bml_change_cm3 or {}),
                                            "thickness_change_percent": dict(thickness_change_percent or {})},
                              "bml": {}, "cartilage": {},
                              "transform": rigid_to_dict(visit_transform(baseline, follow))}
    for bone in sorted(set(base["bml"]) | set(fol["bml"])):
        b, f = base["bml"].get(bone, 0.0), fol["bml"].get(bone, 0.0)
        change["bml"][bone] = {"baseline_cm3": b, "followup_cm3": f, "delta_cm3": f - b,
                               "delta_percent": 100.0 * (f - b) / b if b else None}
    for plate, entry in base["cartilage"].items():
        b, f = entry["mean_thickness_mm"], fol["cartilage"][plate]["mean_thickness_mm"]
        change["cartilage"][plate] = {"thickness_mean_baseline_mm": b, "thickness_mean_followup_mm": f,
                                      "delta_mm": f - b, "delta_percent": 100.0 * (f - b) / b,
                                      "volume_delta_cm3": fol["cartilage"][plate]["volume_cm3"] - entry["volume_cm3"]}
    out[1].truth["change"] = change
    return out


def write_visits(out_dir: str | Path, subject: str, visits: list[Visit], *, image_dtype: str = "int16",
                 image_scale: float = 1.0, manifest: bool = True) -> list[Path]:
    """Write ``<out_dir>/<subject>/<visit>/{image,labels}.nii.gz`` and ``truth.json`` per visit, and
    ``<out_dir>/manifest.csv`` (appending to its rows for other subjects). Returns the written paths.

    ``image_dtype`` "int16" rounds the image (the synthesizer's units, about 0..1000, times
    ``image_scale``; a smaller scale quantizes the noise more coarsely and compresses better), "float32"
    keeps it. Everything is converted in memory first; each file is written atomically.
    """
    out_dir = Path(out_dir)
    if image_dtype not in ("int16", "float32"):
        raise ValueError(f"image dtype must be int16 or float32, got {image_dtype!r}")
    staged: list[tuple[Path, Any]] = []
    rows = []
    for visit in visits:
        folder = out_dir / subject / visit.name
        image = visit.image
        if image_dtype == "int16":
            image = image.with_array(np.clip(np.rint(image.array * image_scale), -32768, 32767).astype(np.int16))
        elif image_scale != 1.0:
            image = image.with_array((image.array * np.float32(image_scale)).astype(np.float32))
        staged += [(folder / "image.nii.gz", image), (folder / "labels.nii.gz", visit.labels),
                   (folder / "truth.json", json.dumps(_jsonable(visit.truth), indent=2, sort_keys=True) + "\n")]
        rows.append({"subject": subject, "visit": visit.name, "image": f"{subject}/{visit.name}/image.nii.gz",
                     "labels": f"{subject}/{visit.name}/labels.nii.gz", "side": visit.truth.get("side") or ""})
    if manifest:
        path = out_dir / "manifest.csv"
        old = []
        if path.exists():
            with path.open(newline="") as fh:
                old = [r for r in csv.DictReader(fh) if r.get("subject") != subject]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in sorted(old + rows, key=lambda r: (r["subject"], r["visit"])):
            writer.writerow({k: row.get(k, "") for k in MANIFEST_COLUMNS})
        staged.append((path, buffer.getvalue()))
    for path, content in staged:
        if isinstance(content, Volume):
            write_nifti(content, path)
        else:
            write_text_atomic(path, content)
    return [p for p, _ in staged]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
