"""Limits, bad input, auth and CORS: every refusal is JSON naming the problem, never a 500, a traceback or a path."""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib

import pytest
import torch
import torch.nn.functional as F

from vlmkit.capabilities import EmbedsImages, EmbedsTexts, Generates, provides

from .conftest import png_b64

LIMITS = dict(max_body_bytes=60_000, max_image_pixels=50_000, max_items=4, max_labels=3, max_text_chars=50,
              max_new_tokens=8, max_k=5)


def _first(models, *capabilities) -> str:
    return next(name for name, model in models.items() if all(provides(model, c) for c in capabilities))


@pytest.fixture(scope="module")
def client(models):
    from fastapi.testclient import TestClient

    from vlmkit.serve.app import create_app
    from vlmkit.serve.settings import Settings

    with TestClient(create_app(dict(models), {}, Settings(**LIMITS))) as client:
        yield client


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit) and whose data is a few bytes: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _assert_clean_error(response, status: int, type: str, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == type, error
    for word in words:
        assert word in error["message"], error["message"]
    assert "Traceback" not in response.text and "/tmp" not in response.text and ".py" not in response.text
    return error["message"]


def test_bad_json_wrong_types_and_unknown_fields(client, models, image):
    embedder = _first(models, EmbedsImages, EmbedsTexts)
    _assert_clean_error(client.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}),
                        400, "invalid_json", "not valid JSON")
    _assert_clean_error(client.post("/v1/classify"), 400, "invalid_json", "JSON object")
    _assert_clean_error(client.post("/v1/classify", json={"model": embedder, "image": image, "labels": "cat"}),
                        422, "invalid_request", "'labels'")
    _assert_clean_error(client.post("/v1/classify", json={"model": embedder, "image": image, "labels": ["a", 3]}),
                        422, "invalid_request", "'labels[1]'")
    _assert_clean_error(client.post("/v1/caption", json={"image": image, "max_new_tokens": "5"}),
                        422, "invalid_request", "'max_new_tokens'")
    _assert_clean_error(client.post("/v1/embed", json={"texts": ["a"], "colour": "red"}), 422, "invalid_request", "'colour'")
    _assert_clean_error(client.post("/v1/embed", json=[1, 2]), 422, "invalid_request")
    _assert_clean_error(client.post("/v1/embed", json={"texts": ["a"], "images": [image]}), 400, "invalid_request", "either")
    _assert_clean_error(client.post("/v1/embed", json={"texts": []}), 400, "invalid_request", "texts is empty")
    _assert_clean_error(client.post("/v1/embed", json={"texts": ["  "]}), 400, "invalid_request", "texts[0] is empty")


def test_unknown_routes_and_methods(client):
    _assert_clean_error(client.get("/v1/nothing"), 404, "not_found", "/v1/nothing")
    _assert_clean_error(client.get("/v1/embed"), 405, "method_not_allowed", "GET")


def test_corrupt_truncated_and_non_base64_images(client, models, image):
    embedder = _first(models, EmbedsImages)
    post = lambda images: client.post("/v1/embed", json={"model": embedder, "images": images})  # noqa: E731
    _assert_clean_error(post([image, "not base64!"]), 400, "invalid_image", "images[1]", "base64")
    _assert_clean_error(post([base64.b64encode(b"hello, not an image").decode()]), 400, "invalid_image", "images[0]", "readable image")
    truncated = base64.b64encode(base64.b64decode(png_b64(60, 60))[:-30]).decode()
    _assert_clean_error(post([truncated]), 400, "invalid_image", "images[0]")
    _assert_clean_error(post([""]), 400, "invalid_image", "empty")
    assert post(["data:image/png;base64," + image]).status_code == 200  # what a browser's FileReader sends


def test_a_huge_image_is_refused_from_its_header(client, models, monkeypatch):
    from PIL import ImageFile

    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size))
    embedder = _first(models, EmbedsImages)
    for width, height in [(300, 300), (60_000, 60_000)]:  # over our limit; over PIL's own bomb limit too
        bomb = base64.b64encode(_png_header(width, height)).decode()
        _assert_clean_error(client.post("/v1/embed", json={"model": embedder, "images": [bomb]}), 413, "image_too_large", "images[0]")
    assert loads == []  # refused before any decoding


def test_size_and_count_limits(client, models, image):
    embedder, generator = _first(models, EmbedsImages, EmbedsTexts), _first(models, Generates)
    _assert_clean_error(client.post("/v1/embed", content=b"{" + b" " * 70_000 + b"}", headers={"content-type": "application/json"}),
                        413, "body_too_large", "60000")
    _assert_clean_error(client.post("/v1/classify", json={"model": embedder, "image": image, "labels": ["a", "b", "c", "d"]}),
                        400, "limit_exceeded", "labels", "limit of 3")
    _assert_clean_error(client.post("/v1/classify", json={"model": embedder, "image": image, "labels": ["a", "a"]}),
                        400, "invalid_request", "more than once")
    _assert_clean_error(client.post("/v1/embed", json={"texts": ["x" * 51]}), 400, "limit_exceeded", "texts[0]", "50")
    _assert_clean_error(client.post("/v1/embed", json={"texts": ["a"] * 5}), 400, "limit_exceeded", "limit of 4")
    _assert_clean_error(client.post("/v1/caption", json={"model": generator, "image": image, "max_new_tokens": 9}),
                        400, "limit_exceeded", "max_new_tokens 9", "limit of 8")
    _assert_clean_error(client.post("/v1/search", json={"text": "a", "k": 6}), 400, "limit_exceeded", "k 6")
    _assert_clean_error(client.post("/v1/search", json={"text": "a"}), 404, "no_index", "--index")


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(client):
    def chunks():
        for _ in range(10):
            yield b" " * 10_000

    response = client.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
    _assert_clean_error(response, 413, "body_too_large")


def test_the_pixel_check_runs_before_decoding_in_the_library_function():
    from vlmkit.serve.errors import ApiError
    from vlmkit.serve.inputs import decode_image

    with pytest.raises(ApiError, match="3000x2000 = 6000000 pixels, over the limit of 1000000"):
        decode_image(base64.b64encode(_png_header(3000, 2000)).decode(), "image", max_pixels=10**6)
    with pytest.raises(ApiError, match="decompression bomb"):  # PIL's own refusal, at open, past 2 * its limit
        decode_image(base64.b64encode(_png_header(60_000, 60_000)).decode(), "image", max_pixels=10**6)
    assert decode_image(png_b64(20, 10), "image", max_pixels=200).size == (20, 10)
    # the library's bound: a side over 16,384 px is refused however few pixels; a big JPEG is reduced on load
    with pytest.raises(ApiError, match="20000x10 = 200000 pixels, over the limit of 1000000 pixels or 16384 a side"):
        decode_image(base64.b64encode(_png_header(20_000, 10)).decode(), "image", max_pixels=10**6)
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (1600, 1200), "red").save(jpeg, format="JPEG")
    assert decode_image(base64.b64encode(jpeg.getvalue()).decode(), "image", max_pixels=10**6).size == (800, 600)


def test_api_key(models):
    from fastapi.testclient import TestClient

    from vlmkit.serve.app import create_app
    from vlmkit.serve.settings import Settings

    with TestClient(create_app(dict(models), {}, Settings(api_key="s3cret-key"))) as client:
        _assert_clean_error(client.get("/v1/models"), 401, "unauthorized", "API key")
        _assert_clean_error(client.get("/v1/models", headers={"authorization": "Bearer wrong-key"}), 401, "unauthorized")
        _assert_clean_error(client.get("/metrics"), 401, "unauthorized")
        assert client.get("/v1/models", headers={"authorization": "Bearer s3cret-key"}).status_code == 200
        assert client.get("/v1/models", headers={"x-api-key": "s3cret-key"}).status_code == 200
        assert client.get("/healthz").status_code == 200  # liveness probes carry no key


def test_cors_is_closed_unless_an_origin_is_given(models):
    from fastapi.testclient import TestClient

    from vlmkit.serve.app import create_app
    from vlmkit.serve.settings import Settings

    preflight = {"origin": "http://example.com", "access-control-request-method": "POST"}
    with TestClient(create_app(dict(models), {})) as client:
        assert "access-control-allow-origin" not in client.get("/v1/models", headers={"origin": "http://example.com"}).headers
        assert "access-control-allow-origin" not in client.options("/v1/embed", headers=preflight).headers
    with TestClient(create_app(dict(models), {}, Settings(cors_origins=["http://example.com"]))) as client:
        assert client.options("/v1/embed", headers=preflight).headers["access-control-allow-origin"] == "http://example.com"
        assert client.get("/v1/models", headers={"origin": "http://example.com"}).headers["access-control-allow-origin"] == "http://example.com"
        assert "access-control-allow-origin" not in client.get("/v1/models", headers={"origin": "http://evil.test"}).headers


class BlockingEmbedder:
    """Embeds texts only after `release` is set, recording each call's batch size."""

    family = "fake"
    capabilities = (EmbedsTexts,)

    def __init__(self) -> None:
        self.release, self.calls = threading.Event(), []

    def embed_texts(self, texts):
        self.calls.append(len(texts))
        self.release.wait(10)
        return F.normalize(torch.arange(1.0, 1 + 4 * len(texts)).view(len(texts), 4), dim=-1)


def _run(app, scenario):
    import httpx

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await scenario(client)

    return asyncio.run(main())


def test_concurrency_limit_answers_429_and_timeout_504():
    from vlmkit.serve.app import create_app
    from vlmkit.serve.settings import Settings

    model = BlockingEmbedder()
    app = create_app({"m": model}, {}, Settings(max_concurrency=1, timeout_s=0.3))

    async def scenario(client):
        first = asyncio.ensure_future(client.post("/v1/embed", json={"texts": ["a"]}))
        while not model.calls:
            await asyncio.sleep(0.01)
        second = await client.post("/v1/embed", json={"texts": ["b"]})  # while the first is in flight
        late = await first  # the model is still blocked: past the timeout
        model.release.set()
        return second, late

    second, late = _run(app, scenario)
    _assert_clean_error(second, 429, "too_many_requests", "1 requests")
    _assert_clean_error(late, 504, "timeout", "0.3 s")


def test_requests_arriving_together_share_one_model_call_and_get_their_own_rows():
    from vlmkit.serve.app import create_app
    from vlmkit.serve.settings import Settings

    for batching, expected_calls in [(True, 2), (False, 9)]:
        model = BlockingEmbedder()
        app = create_app({"m": model}, {}, Settings(batching=batching, max_batch=8))

        async def scenario(client):
            first = asyncio.ensure_future(client.post("/v1/embed", json={"texts": ["first"]}))
            while not model.calls:
                await asyncio.sleep(0.01)
            rest = [asyncio.ensure_future(client.post("/v1/embed", json={"texts": [f"t{i}"] * (1 + i % 2)})) for i in range(8)]
            await asyncio.sleep(0.2)  # the 8 queue up while the first call runs
            model.release.set()
            return [await first] + [await r for r in rest], (await client.get("/metrics")).text

        answers, metrics = _run(app, scenario)
        assert len(model.calls) == expected_calls, model.calls
        for i, answer in enumerate(answers[1:]):
            rows = len(answer.json()["embeddings"])
            assert rows == 1 + i % 2  # each request gets back exactly its own rows
        if batching:
            assert model.calls[1] == sum(1 + i % 2 for i in range(8))
            assert 'vlmkit_batch_size_bucket{model="m",kind="embed_texts",le="8"} 2' in metrics


def test_batched_captions_equal_one_by_one_captions(models):
    from vlmkit.serve.app import create_app
    from vlmkit.serve.settings import Settings

    generator = _first(models, Generates)
    images = [png_b64(40, 30, color) for color in [(200, 30, 30), (30, 200, 30), (30, 30, 200), (250, 250, 0)]]

    def captions(batching: bool):
        app = create_app({generator: models[generator]}, {}, Settings(batching=batching, batch_window_ms=50))

        async def scenario(client):
            answers = await asyncio.gather(*[client.post("/v1/caption", json={"image": i, "max_new_tokens": 5}) for i in images])
            return [a.json()["caption"] for a in answers], (await client.get("/metrics")).text

        return _run(app, scenario)

    batched, metrics = captions(True)
    single, _ = captions(False)
    assert batched == single
    assert f'vlmkit_batch_size_bucket{{model="{generator}",kind="caption",le="2"}} 0' in metrics  # one batch of 4


def test_a_failing_request_in_a_batch_fails_alone():
    from vlmkit.serve.batching import Batcher
    from concurrent.futures import ThreadPoolExecutor

    def run(items):
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    async def main():
        batcher = Batcher(run, ThreadPoolExecutor(1), max_batch=8, window_s=0.05)
        return await asyncio.gather(*[batcher.submit(item) for item in ["a", "bad", "c"]], return_exceptions=True)

    a, bad, c = asyncio.run(main())
    assert (a, c) == ("A", "C") and isinstance(bad, ValueError)
