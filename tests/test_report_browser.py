"""The report renders in a real browser, offline: every image decodes and the console stays clean, and
the interactive viewer draws the scan, steps through slices and fetches nothing.

Needs chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``); skipped with
a reason when they are absent. The screenshot is written beside the report for a human to look at.
WebGL runs on Chromium's software renderer (SwiftShader), which ``--enable-unsafe-swiftshader`` allows
now that Chromium no longer falls back to it by itself.
"""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest
from test_report import make_run

from bml_pipeline.report.html import write_scan_report

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--enable-unsafe-swiftshader", "--window-size=1280,1800")


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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
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


def _wait_for_viewer(browser, timeout_s: float = 90.0) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        state = browser.execute_script("var v = document.getElementById('bml-viewer');"
                                       "return [v.className, document.getElementById('bml-viewer-status').textContent]")
        if "ready" in state[0]:
            return
        assert "failed" not in state[0], f"viewer failed: {state[1]}"
        time.sleep(0.25)
    pytest.fail(f"viewer not ready after {timeout_s:.0f} s: {state[1]}")


def _canvas_pixels(canvas) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB"), dtype=np.int16)


def _orange(rgb: np.ndarray) -> np.ndarray:
    """Pixels tinted by the lesion colour (230, 159, 0), blended over grey."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (r - g > 15) & (g - b > 35) & (r > 100)


def _crosshair(browser) -> list[int]:
    return browser.execute_script("return Array.from(bmlViewer.frac2vox(bmlViewer.scene.crosshairPos))")


def test_viewer_draws_scrolls_and_fetches_nothing(browser, tmp_path):
    pytest.importorskip("ipyniivue", reason="the viewer needs ipyniivue")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.keys import Keys

    report = write_scan_report(make_run(tmp_path, "viewer"))
    browser.get_log("performance")  # drop what the browser did before opening the report
    browser.get(report.resolve().as_uri())
    _wait_for_viewer(browser)
    browser.execute_script("document.getElementById('viewer').scrollIntoView()")
    canvas = browser.find_element("id", "bml-viewer-canvas")
    assert canvas.size["width"] > 600 and canvas.size["height"] > 300

    # The canvas shows the scan: many grey levels and the label colours, not a blank rectangle.
    first = _canvas_pixels(canvas)
    assert first.std() > 20
    assert len(np.unique(first.reshape(-1, 3) // 8, axis=0)) > 50
    orange = _orange(first).sum()
    assert orange > 50, "the lesion label (orange) is drawn over the image"
    status = browser.find_element("id", "bml-viewer-status").text
    assert "Crosshair at" in status and "Femoral BML" in status  # opens on the largest lesion, named

    # The mouse wheel over a plane steps its slice: the crosshair moves along one axis and the picture changes.
    before = _crosshair(browser)
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 300).perform()
    time.sleep(0.3)
    after = _crosshair(browser)
    assert sum(a != b for a, b in zip(before, after)) == 1, (before, after)
    wheeled = _canvas_pixels(canvas)
    assert np.abs(wheeled - first).sum() > 0

    # Keyboard on the axial slider steps the axial slice and its read-out.
    slider = browser.find_element("css selector", "input[data-axis='2']")
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    time.sleep(0.3)
    moved = _crosshair(browser)
    assert moved[2] == after[2] + 2 and moved[:2] == after[:2]
    assert slider.find_element("xpath", "following-sibling::output").text.startswith(f"{moved[2] + 1}/")

    # Label toggles and opacity change what is drawn; hiding every label removes the orange.
    boxes = browser.find_elements("css selector", "input[data-label]")
    assert [b.is_selected() for b in boxes] == [False, True, False, True, False, True, True, True, True]  # bones off
    for box in boxes:
        if box.is_selected():
            box.click()
    time.sleep(0.3)
    hidden = _canvas_pixels(canvas)
    assert _orange(hidden).sum() < orange / 10
    browser.execute_script("var o = document.getElementById('bml-viewer-opacity'); o.value = 100;"
                           "o.dispatchEvent(new Event('input'))")
    assert browser.execute_script("return bmlViewer.volumes[1].opacity") == 1

    # Nothing was fetched: no resource entries but data:/blob:, no network request but the report itself.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(("data:", "blob:")) for name in resources), resources
    requests = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    page = [u for u in urls if not u.startswith(("chrome://", "chrome-untrusted://"))]  # the browser's own pages
    assert page and all(u == report.resolve().as_uri() or u.startswith(("data:", "blob:")) for u in page), page
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    shot = tmp_path / "viewer.png"
    assert canvas.screenshot(str(shot)) and shot.stat().st_size > 10_000
