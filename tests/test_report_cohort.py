"""Cohort report: figures from the batch tables, failures escaped, missing columns said, not invented."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from bml_pipeline.report.cohort import thickness_columns, write_cohort_report


def tables(n_knees: int = 6):
    rng = np.random.default_rng(3)
    visits = ["00m", "24m"] * n_knees
    cohort = pd.DataFrame({
        "subject": [f"s{i // 2}" for i in range(2 * n_knees)], "visit": visits, "side": "left",
        "bml_total_volume_cm3": rng.gamma(1.5, 0.5, 2 * n_knees),
        "cartilage_femoral_cartilage_thickness_mean_mm": rng.normal(2.2, 0.2, 2 * n_knees),
    })
    base, follow = cohort.iloc[::2].reset_index(), cohort.iloc[1::2].reset_index()
    changes = pd.DataFrame({
        "subject": base.subject, "baseline_visit": "00m", "followup_visit": "24m",
        "bml_total_baseline_cm3": base.bml_total_volume_cm3, "bml_total_followup_cm3": follow.bml_total_volume_cm3,
        "bml_total_delta_cm3": follow.bml_total_volume_cm3 - base.bml_total_volume_cm3,
        "cartilage_femoral_cartilage_thickness_mean_baseline_mm": base.cartilage_femoral_cartilage_thickness_mean_mm,
        "cartilage_femoral_cartilage_thickness_mean_followup_mm": follow.cartilage_femoral_cartilage_thickness_mean_mm,
    })
    errors = pd.DataFrame({"subject": ["s9"], "visit": ["00m"], "stage": ["scan"],
                           "error": ["/data/<script>alert(1)</script>.nii.gz: file is truncated"]})
    stats = pd.DataFrame([{"measure": "bml_total_delta_cm3", "n": n_knees, "mean": 0.01, "sd": 0.4, "sdc": 0.2}])
    return cohort, changes, errors, stats


def test_cohort_report_has_figures_tables_and_escapes(tmp_path):
    cohort, changes, errors, stats = tables()
    (tmp_path / "s0" / "00m").mkdir(parents=True)
    (tmp_path / "s0" / "00m" / "report.html").write_text("<html></html>")
    html = write_cohort_report(tmp_path, cohort, changes, errors, stats).read_text(encoding="utf-8")
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'href="s0/00m/report.html"' in html and 'href="s1/00m/report.html"' not in html
    assert "bml_total_delta_cm3" in html and "±" in html  # statistics table and SDC lines
    counts = re.findall(r"(\d+) (increase|decrease)", html)
    assert sum(int(n) for n, _ in counts) == len(changes)


def test_cohort_report_without_pairs_or_stats(tmp_path):
    cohort, _, _, _ = tables(2)
    html = write_cohort_report(tmp_path, cohort, pd.DataFrame(), pd.DataFrame(columns=["subject", "visit", "stage", "error"]),
                               None).read_text(encoding="utf-8")
    assert len(re.findall(r"<img ", html)) == 1  # distributions only
    assert "No visit pairs" in html and "No failures." in html and "No cohort statistics" in html


def test_thickness_columns_found_by_name():
    columns = ["subject", "cartilage.femoral_cartilage.subregions.cLF.thickness_mean_mm",
               "cartilage.femoral_cartilage.thickness_mm.mean", "tibial_cartilage_mean_thickness_mm",
               "cartilage_tibial_cartilage_thickness_mean_delta_mm"]
    assert thickness_columns(columns) == {"femoral_cartilage": "cartilage.femoral_cartilage.thickness_mm.mean",
                                          "tibial_cartilage": "tibial_cartilage_mean_thickness_mm"}
