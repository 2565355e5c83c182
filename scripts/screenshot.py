#!/usr/bin/env python3
"""Drive vlmkit's web page in headless Chromium (Debian's `chromium` + `chromium-driver`, through selenium).

Starts `vlmkit serve` in a subprocess on a free port, opens the page, picks an image, classifies it
among labels, searches the index, captions the image, and saves a full-page screenshot. The browser
test (tests/serve/test_browser.py) uses the same functions; run it yourself to refresh the README's
picture (the models and data are yours: a trained CLIP and a captioner read best):

    .venv/bin/python scripts/screenshot.py --model clip=runs/clip --model captioner=runs/virtex \\
        --data data/synth/test.jsonl --record 1 --out docs/images/web_page.png

Without `--index`, an index of `--data` is built first with the first model (in a temporary folder).
Needs `apt-get install chromium chromium-driver` and `pip install selenium`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

SRC = str(Path(__file__).resolve().parents[1] / "src")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver", "chromium-driver")


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables when both are installed, else None."""
    browser = next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)
    driver = next((found for name in DRIVER_NAMES if (found := shutil.which(name))), None)
    if browser is None and Path("/usr/bin/chromium").exists():
        browser = "/usr/bin/chromium"
    if driver is None and Path("/usr/bin/chromedriver").exists():
        driver = "/usr/bin/chromedriver"
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(models: list[str], indexes: list[str], log: Path, extra: list[str] = (), timeout: float = 90) -> Iterator[str]:
    """Run `vlmkit serve --model ... --index ...` on a free loopback port; yields its base URL, stops it after."""
    import urllib.error
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "vlmkit", "serve", "--port", str(port), *extra]
    for model in models:
        command += ["--model", model]
    for index in indexes:
        command += ["--index", index]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"vlmkit serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=2):
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"vlmkit serve did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
                    time.sleep(0.25)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@contextlib.contextmanager
def browser(executables: tuple[str, str], width: int = 1280, height: int = 900):
    """A headless Chromium driven by selenium (no network needed: the driver is the installed one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = executables[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=executables[1]), options=options)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 60, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message=f"waiting for {what}")


def open_page(driver, url: str) -> None:
    """Load the page and wait until it has read /v1/models (body[data-ready])."""
    driver.get(url + "/")
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready") in ("true", "error"), what="/v1/models")


def visible_panels(driver) -> set[str]:
    """Ids of the panels the page shows."""
    return set(driver.execute_script(
        "return [...document.querySelectorAll('section.panel')].filter(p => !p.hidden).map(p => p.id)"))


def run_panel(driver, panel: str, click: str, timeout: float = 60) -> None:
    """Click `click` in panel `panel` and wait until that panel's work ends; raise with its error message."""
    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById(arguments[0]).dataset.state = 'idle'", panel)
    driver.find_element(By.CSS_SELECTOR, click).click()
    wait_for(driver, lambda d: d.execute_script("return document.getElementById(arguments[0]).dataset.state", panel)
             in ("done", "error"), timeout, what=f"{panel} to finish")
    state, message = driver.execute_script(
        "const p = document.getElementById(arguments[0]); return [p.dataset.state, p.querySelector('.error').textContent]", panel)
    if state != "done":
        raise AssertionError(f"{panel} failed: {message}")


def pick_image(driver, path: str | os.PathLike) -> None:
    """Choose `path` in the page's file picker and wait for the preview."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "image-input").send_keys(str(Path(path).resolve()))
    wait_for(driver, lambda d: d.execute_script("const p = document.getElementById('preview'); "
                                                "return !p.hidden && p.complete && p.naturalWidth > 0"), what="the preview")


def classify(driver, labels: list[str]) -> list[tuple[str, float]]:
    """Type `labels`, classify the picked image, and read the bars: [(label, probability)] as shown."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "classify-labels")
    box.clear()
    box.send_keys(", ".join(labels))
    run_panel(driver, "panel-classify", "#classify-run")
    bars = driver.execute_script("return [...document.querySelectorAll('#classify-bars .bar')].map(b => "
                                 "[b.dataset.label, Number(b.dataset.probability), b.querySelector('.bar-fill').style.width])")
    for _, probability, width in bars:  # the drawn bar is the probability
        assert abs(float(width.rstrip("%")) - 100 * probability) < 0.06, (probability, width)
    return [(label, probability) for label, probability, _ in bars]


def search(driver, text: str) -> list[dict]:
    """Search the index for `text`; the hits as shown: [{"row", "score", "loaded": thumbnail decoded}]."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "search-text")
    box.clear()
    box.send_keys(text)
    run_panel(driver, "panel-search", "#search-run")
    return driver.execute_script(
        "return [...document.querySelectorAll('#search-hits .hit')].map(h => ({row: Number(h.dataset.row), "
        "score: Number(h.dataset.score), loaded: h.querySelector('img').complete && h.querySelector('img').naturalWidth > 0,"
        "caption: h.querySelector('figcaption').textContent}))")


def caption(driver) -> str:
    run_panel(driver, "panel-caption", "#caption-run")
    return driver.execute_script("return document.getElementById('caption-output').textContent")


def ask(driver, question: str) -> str:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "ask-question")
    box.clear()
    box.send_keys(question)
    run_panel(driver, "panel-ask", "#ask-run")
    return driver.execute_script("return document.getElementById('ask-output').textContent")


def chat(driver, message: str) -> list[tuple[str, str]]:
    """Send `message` in the chat; the whole conversation as shown: [(role, text)]."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "chat-input").send_keys(message)
    run_panel(driver, "panel-chat", "#chat-send")
    return [tuple(pair) for pair in driver.execute_script(
        "return [...document.querySelectorAll('#chat-log .message')].map(m => [m.classList[1], m.textContent])")]


def full_page_screenshot(driver, path: str | os.PathLike) -> None:
    """Save a PNG of the whole page: the viewport is stretched to the page's height (DevTools) first."""
    width = max(1280, driver.execute_script("return document.documentElement.scrollWidth"))
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]RUN", help="models to serve (repeatable)")
    parser.add_argument("--index", help="index folder to search (default: build one of --data with the first model)")
    parser.add_argument("--data", required=True, help="records to index; record --record's image is the one the page uses")
    parser.add_argument("--record", type=int, default=0, help="which record's image to pick (default: the first)")
    parser.add_argument("--labels", default="red circle, blue square, green triangle, yellow star, purple circle")
    parser.add_argument("--query", default="a red circle")
    parser.add_argument("--out", default="docs/images/web_page.png")
    args = parser.parse_args()
    sys.path.insert(0, SRC)
    from vlmkit.data.formats import read_records

    executables = find_chromium()
    if executables is None:
        print("screenshot: chromium and chromedriver are not installed (apt-get install chromium chromium-driver)", file=sys.stderr)
        return 2
    image = read_records(args.data)[args.record]["image"]
    with tempfile.TemporaryDirectory() as scratch:
        index = args.index
        if index is None:
            from vlmkit.index.build import build_index

            index = str(Path(scratch) / "index")
            build_index(args.model[0].partition("=")[2] or args.model[0], args.data, index, progress=False)
        with serving(args.model, [f"images={index}"], Path(scratch) / "serve.log") as url, browser(executables) as driver:
            open_page(driver, url)
            pick_image(driver, image)
            panels = visible_panels(driver)
            if "panel-classify" in panels:
                print("bars:", classify(driver, [label.strip() for label in args.labels.split(",")]), file=sys.stderr)
            if "panel-search" in panels:
                print("hits:", [hit["row"] for hit in search(driver, args.query)], file=sys.stderr)
            if "panel-caption" in panels:
                print("caption:", caption(driver), file=sys.stderr)
            full_page_screenshot(driver, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
