"""Reports for readers: a self-contained HTML page per scan and one per cohort.

- :func:`write_scan_report` (``bml-pipeline report RUN_DIR``): key images with outlines, lesion maps,
  thickness maps, tables and quality flags; with a prior visit, matched slices and a change table.
- :func:`write_cohort_report`: distributions, baseline vs follow-up, a waterfall of BML change,
  failures and cohort statistics.
"""

from __future__ import annotations

from typing import Any

__all__ = ["write_cohort_report", "write_scan_report"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not pull in matplotlib or pandas.
    if name == "write_scan_report":
        from bml_pipeline.report.html import write_scan_report

        return write_scan_report
    if name == "write_cohort_report":
        from bml_pipeline.report.cohort import write_cohort_report

        return write_cohort_report
    raise AttributeError(name)
