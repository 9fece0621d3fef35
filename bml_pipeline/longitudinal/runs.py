"""Change between two run directories: the one entry point that ``bml-pipeline longitudinal`` and the
batch's visit-pair stage both call, so the same two runs give the same ``change.json`` byte for byte.

The measure configuration is the one the runs were measured with (``provenance.json``); two runs
measured with different configurations are not compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bml_pipeline.errors import InputError
from bml_pipeline.labels import LabelSchema
from bml_pipeline.volume import Volume


@dataclass(frozen=True)
class Visit:
    """One run directory, loaded for comparison."""

    run_dir: Path
    labels: Volume
    measurements: dict[str, Any]
    schema: LabelSchema
    measure_config: Any
    subject: str | None
    date: str | None
    """Acquisition date (ISO ``YYYY-MM-DD``) recorded by the run, else None."""


def subject_of(provenance: dict[str, Any]) -> str | None:
    """The subject a run records (a batch writes it under ``batch.subject``), else None."""
    for holder in (provenance, provenance.get("batch")):
        if isinstance(holder, dict) and isinstance(holder.get("subject"), str) and holder["subject"]:
            return str(holder["subject"])
    return None


def load_visit(run_dir: str | Path) -> Visit:
    """A run directory's labels, measurements, schema, measure configuration and subject.

    Raises:
        InputError: no readable label map or measurements, an input changed since it was measured.
    """
    from bml_pipeline.measure.config import MeasureConfig
    from bml_pipeline.report.rundir import load_run

    run = load_run(run_dir, with_image=False)
    if run.labels is None:
        raise InputError(run_dir, "; ".join(run.notes) or "no label map in the run directory")
    recorded = run.provenance.get("config", {}).get("measure") if isinstance(run.provenance.get("config"), dict) else None
    config = MeasureConfig.from_dict(recorded, Path(run_dir) / "provenance.json") if isinstance(recorded, dict) \
        else MeasureConfig()
    date = run.provenance.get("acquisition_date")
    return Visit(Path(run_dir), run.labels, run.measurements, run.schema, config, subject_of(run.provenance),
                 date if isinstance(date, str) and date else None)


def compare_runs(baseline_dir: str | Path, followup_dir: str | Path, *, side: str | None = None,
                 allow_mismatch: bool = False) -> dict[str, Any]:
    """``change.json`` content comparing two run directories of one knee.

    Raises:
        InputError: unusable runs, different label schemas or measure configurations, or (unless
            ``allow_mismatch``) scans that are not of the same knee.
    """
    from bml_pipeline.longitudinal.change import compare_visits

    base, foll = load_visit(baseline_dir), load_visit(followup_dir)
    if foll.schema.name != base.schema.name:
        raise InputError(followup_dir, f"label schema {foll.schema.name!r} differs from the baseline's "
                                       f"{base.schema.name!r}")
    if json.dumps(base.measure_config.to_dict(), sort_keys=True) != json.dumps(foll.measure_config.to_dict(),
                                                                               sort_keys=True):
        raise InputError(followup_dir, "measured with another measure configuration than the baseline; "
                                       "measure both visits with the same --config")
    if base.subject and foll.subject and base.subject != foll.subject and not allow_mismatch:
        raise InputError(followup_dir, f"subject {foll.subject!r} is not the baseline's {base.subject!r}")
    change = compare_visits(base.labels, foll.labels, base.schema, baseline_measurements=base.measurements,
                            followup_measurements=foll.measurements, side=side,
                            measure_config=base.measure_config, force=allow_mismatch).to_dict()
    if base.date and foll.date and foll.date < base.date:
        raise InputError(followup_dir, f"follow-up acquired {foll.date}, before the baseline ({base.date})")
    return with_rates(change, base.date, foll.date)


def with_rates(change: dict[str, Any], baseline_date: str | None, followup_date: str | None) -> dict[str, Any]:
    """``change`` with ``interval_days`` (None when a date is unknown) and changes per year (365.25 days):
    ``delta_cm3_per_year`` per bone, ``delta_mm_per_year`` and ``delta_percent_per_year`` per plate."""
    import datetime as dt

    days = None
    if baseline_date and followup_date:
        days = (dt.date.fromisoformat(followup_date) - dt.date.fromisoformat(baseline_date)).days
    years = days / 365.25 if days else None

    def rate(value: float | None) -> float | None:
        return None if value is None or years is None else round(value / years, 6)

    change = {**change, "interval_days": days, "baseline_date": baseline_date, "followup_date": followup_date}
    for entry in change.get("bml", {}).values():
        entry["delta_cm3_per_year"] = rate(entry.get("delta_cm3"))
    for entry in change.get("cartilage", {}).values():
        entry["delta_mm_per_year"] = rate(entry.get("delta_mm"))
        entry["delta_percent_per_year"] = rate(entry.get("delta_percent"))
    return change
