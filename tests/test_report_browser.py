"""The report renders in a real browser, offline: every image decodes and the console stays clean.

Needs chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``); skipped with
a reason when they are absent. The screenshot is written beside the report for a human to look at.
"""

from __future__ import annotations

import shutil

import pytest
from test_report import make_run

from bml_pipeline.report.html import write_scan_report

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--window-size=1280,1800")


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed")
    return chromium, driver


@pytest.fixture()
def browser(tmp_path):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_offline_in_chromium(browser, tmp_path):
    prior = make_run(tmp_path, "prior")
    current = make_run(tmp_path, "current", shift_mm=2.0)
    report = write_scan_report(current, prior_dir=prior)
    browser.get(report.resolve().as_uri())
    browser.execute_script("return document.fonts.ready")
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0, i.naturalWidth])")
    assert len(images) >= 12
    broken = [alt for alt, ok, _ in images if not ok]
    assert not broken, f"images that did not decode: {broken}"
    # Images keep their physical proportions on screen (no CSS stretching).
    ratios = browser.execute_script(
        "return Array.from(document.images).filter(i => i.closest('.frame')).map("
        "i => [i.naturalWidth / i.naturalHeight, i.clientWidth / i.clientHeight])")
    for natural, shown in ratios:
        assert shown == pytest.approx(natural, rel=0.03)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    title = browser.find_element("tag name", "h1").text
    assert "bone marrow lesions" in title
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
