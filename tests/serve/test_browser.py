"""The web page in a real headless Chromium: `vlmkit serve` in a subprocess, the page driven through selenium.

The page must show what the API answers: the bars are /v1/classify's probabilities, the thumbnails
/v1/search's hits (their images decoded), the caption, answer and streamed chat reply those of the
endpoints (greedy decoding, so the same). Panels appear only for endpoints a loaded model serves.
Skips when chromium / chromedriver are not installed (`make test` installs them where apt-get is).
"""
from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="selenium is not installed; pip install -e '.[test]'")
pytest.importorskip("faiss", reason="faiss is not installed; pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[2]


def _driver_module():
    """scripts/screenshot.py: the page-driving functions this test shares with the screenshot script."""
    spec = importlib.util.spec_from_file_location("vlmkit_page_driver", ROOT / "scripts" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


page = _driver_module()
CHROMIUM = page.find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium and chromedriver are not installed "
                                "(apt-get install chromium chromium-driver; `make test` does it where apt-get works)")
LABELS = ["red circle", "blue square", "green triangle", "yellow star"]
ALL_PANELS = {"panel-image", "panel-classify", "panel-search", "panel-caption", "panel-ask", "panel-chat"}


@pytest.fixture(scope="module")
def shapes(model_runs, tmp_path_factory):
    """(records file, index folder of its images built with the tiny CLIP)."""
    from vlmkit.data.synthetic import generate
    from vlmkit.index.build import build_index

    root = tmp_path_factory.mktemp("browser-data")
    generate(root / "synth", n=20, seed=4, image_size=32, progress=False)
    build_index(model_runs["clip"], root / "synth" / "train.jsonl", root / "index", progress=False)
    return root / "synth" / "train.jsonl", root / "index"


def _post(url: str, path: str, body: dict) -> dict:
    import httpx

    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_page_shows_what_the_api_answers(model_runs, shapes, tmp_path):
    from vlmkit.data.formats import read_records

    data, index = shapes
    image = read_records(data)[0]["image"]
    image_b64 = base64.b64encode(Path(image).read_bytes()).decode()
    models = [f"clip={model_runs['clip']}", f"captioner={model_runs['virtex']}", f"chat={model_runs['llava']}"]
    with page.serving(models, [f"shapes={index}"], tmp_path / "serve.log", extra=["--max-labels", "8"]) as url, \
            page.browser(CHROMIUM) as driver:
        page.open_page(driver, url)
        assert page.visible_panels(driver) == ALL_PANELS
        page.pick_image(driver, image)
        driver.save_screenshot(str(tmp_path / "1-image.png"))

        bars = page.classify(driver, LABELS)
        expected = _post(url, "/v1/classify", {"model": "clip", "image": image_b64, "labels": LABELS})["labels"]
        assert [label for label, _ in bars] == [item["label"] for item in expected]
        assert [p for _, p in bars] == pytest.approx([item["probability"] for item in expected], abs=1e-6)
        assert sum(p for _, p in bars) == pytest.approx(1.0, abs=1e-4)
        assert [p for _, p in bars] == sorted((p for _, p in bars), reverse=True)
        driver.save_screenshot(str(tmp_path / "2-classify.png"))

        hits = page.search(driver, "a red circle")
        expected = _post(url, "/v1/search", {"text": "a red circle", "k": 8})["hits"]
        assert [hit["row"] for hit in hits] == [hit["row"] for hit in expected] and len(hits) == 8
        assert all(hit["loaded"] for hit in hits), hits  # every thumbnail was fetched and decoded
        assert hits[0]["caption"] == expected[0]["record"]["texts"][0]
        driver.save_screenshot(str(tmp_path / "3-search.png"))

        shown = page.caption(driver)
        assert shown == _post(url, "/v1/caption", {"model": "captioner", "image": image_b64})["caption"]
        answer = page.ask(driver, "what color is the circle?")
        assert answer == _post(url, "/v1/ask", {"model": "chat", "image": image_b64, "question": "what color is the circle?"})["answer"]
        conversation = page.chat(driver, "what shapes do you see?")
        reply = _post(url, "/v1/chat", {"model": "chat", "image": image_b64, "stream": False,
                                        "messages": [{"role": "user", "content": "what shapes do you see?"}]})["reply"]
        assert conversation == [("user", "what shapes do you see?"), ("assistant", reply)]

        # the server's one-sentence error shows in the panel that asked (9 labels, the limit is 8)
        with pytest.raises(AssertionError, match="labels"):
            page.classify(driver, [f"label {i}" for i in range(9)])
        page.full_page_screenshot(driver, tmp_path / "4-page.png")
    for name in ("1-image.png", "2-classify.png", "3-search.png", "4-page.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_panels_follow_the_capabilities_and_the_api_key_reaches_every_request(model_runs, shapes, tmp_path):
    """Only a CLIP and an index, behind an API key: the page asks for the key, then offers classification and
    search and nothing it cannot do; thumbnails (fetched with the key) load."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    key_file = tmp_path / "key"
    key_file.write_text("a-long-enough-key\n")
    with page.serving([f"clip={model_runs['clip']}"], [f"shapes={shapes[1]}"], tmp_path / "serve.log",
                      extra=["--api-key-file", str(key_file)]) as url, page.browser(CHROMIUM) as driver:
        page.open_page(driver, url)
        assert page.visible_panels(driver) == set()  # nothing offered before the key
        assert "API key" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "api-key").send_keys("a-long-enough-key", Keys.ENTER)
        page.wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "true", what="the models")
        assert page.visible_panels(driver) == {"panel-image", "panel-classify", "panel-search"}
        assert "clip (embed images, embed texts)" in driver.find_element(By.ID, "status").text
        hits = page.search(driver, "a blue square")
        assert len(hits) == 8 and all(hit["loaded"] for hit in hits), hits
