"""`medldm app` driven in a real headless browser (Debian's chromium + chromedriver via selenium; nothing is
downloaded): the bundled MR example through mr-denoise with 2 steps shows its images and metrics, and a bad
upload shows its error on the page while the server keeps running. The screenshots are kept as artefacts in
``$MEDLDM_TEST_ARTIFACTS`` (default ``test-artifacts/``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("MEDLDM_TEST_ARTIFACTS", "test-artifacts"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio", reason="pip install 'medldm[app]'")
    port, log = _free_port(), tmp_path_factory.mktemp("app") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medldm", "app", "--port", str(port), "--model", "mr-denoise",
                                 "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.5)
        else:
            pytest.fail(f"medldm app did not answer in 120 s:\n{log.read_text()}")
        yield url, proc, log
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (bash .ci/setup installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _wait(driver, condition, seconds: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.5).until(condition)
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "app-timeout.png"))
        raise AssertionError(f"timed out waiting for {what}; page status: {_text(driver, '#status')!r}") from None


def _text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return (found[0].get_attribute("innerText") or "").strip() if found else ""


def _set_number(driver, elem_id: str, value: int):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _images(driver) -> dict[str, bool]:
    from selenium.webdriver.common.by import By

    return {i: bool(driver.find_elements(By.CSS_SELECTOR, f"#{i} img")) for i in
            ("img-input", "img-output", "img-diff", "img-std", "img-error")}


def test_example_run_shows_images_and_metrics_and_a_bad_file_shows_its_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, proc, log = server
    browser.get(url)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#run"), 60, "the page")
    _set_number(browser, "steps", 2)
    _set_number(browser, "samples", 2)
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    _wait(browser, lambda d: _text(d, "#status").startswith(("Done", "Error")), 300, "the reconstruction")
    status = _text(browser, "#status")
    assert status.startswith("Done") and "2 step(s), 2 sample(s)" in status, status
    _wait(browser, lambda d: all(_images(d).values()), 30, "the five images")
    metrics = _text(browser, "#metrics")
    assert "PSNR dB" in metrics and "medldm mr-denoise" in metrics and "input (naive inverse)" in metrics
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "app-example.png"))

    bad = tmp_path / "scan.nii.gz"
    bad.write_text("this is not a NIfTI file")
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(bad))
    _wait(browser, lambda d: "scan.nii" in _text(d, "#upload"), 30, "the upload")  # the name wraps
    browser.find_element(By.XPATH, "//*[@id='example']//label[contains(., 'none: use the uploaded file')]").click()
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    _wait(browser, lambda d: _text(d, "#status").startswith("Error"), 60, "the error message")
    status = _text(browser, "#status")
    assert "scan.nii.gz" in status and "medldm-app-" not in status and "Traceback" not in browser.page_source
    browser.save_screenshot(str(ARTIFACTS / "app-bad-file.png"))
    assert proc.poll() is None  # the server keeps running
    urllib.request.urlopen(url, timeout=5)
    work = Path(next(line.split(": ", 1)[1] for line in log.read_text().splitlines() if line.startswith("work folder")))
    assert (work / "uploads").is_dir() and work.name.startswith("medldm-app-")
    proc.terminate()
    assert proc.wait(30) is not None and not work.exists()  # uploads and outputs go with the server
