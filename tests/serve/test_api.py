"""Every endpoint for every registered family: served where its capabilities allow, 404 otherwise."""
from __future__ import annotations

import json

import pytest
import torch

from vlmkit.capabilities import (Answers, Chats, EmbedsImages, EmbedsTexts, Generates, Imagines, MatchesImageText,
                                 provides)

from .conftest import family_models, png_b64

FAMILIES = sorted(family_models())


@pytest.fixture(scope="module")
def client(models, model_runs, make_index):
    from fastapi.testclient import TestClient

    from vlmkit.serve.app import create_app
    from vlmkit.serve.settings import Settings

    # One index per text-embedding model, named after it and built "with" its run folder.
    indexes = {family: make_index(model, ["a red circle", "a blue square", "a green star"], model_runs[family])
               for family, model in models.items() if provides(model, EmbedsTexts)}
    settings = Settings(model_sources=dict(model_runs))
    with TestClient(create_app(dict(models), indexes, settings)) as client:  # one event loop for the module
        yield client


def _body(image: str, family: str) -> dict[str, tuple[tuple[type, ...], str, dict]]:
    """case -> (capabilities it needs, endpoint, request body)."""
    return {
        "embed-texts": ((EmbedsTexts,), "/v1/embed", {"model": family, "texts": ["a red circle", "a blue square"]}),
        "embed-images": ((EmbedsImages,), "/v1/embed", {"model": family, "images": [image, image]}),
        "classify": ((EmbedsImages, EmbedsTexts), "/v1/classify", {"model": family, "image": image, "labels": ["circle", "square", "star"]}),
        "search-text": ((EmbedsTexts,), "/v1/search", {"model": family, "index": FAMILIES_WITH_INDEX[0], "text": "a red circle", "k": 2}),
        "search-image": ((EmbedsImages,), "/v1/search", {"model": family, "index": FAMILIES_WITH_INDEX[0], "image": image, "k": 2}),
        "caption": ((Generates,), "/v1/caption", {"model": family, "image": image, "max_new_tokens": 4}),
        "ask": ((Answers,), "/v1/ask", {"model": family, "image": image, "question": "what color is the star?", "max_new_tokens": 3}),
        "chat": ((Chats,), "/v1/chat", {"model": family, "image": image, "messages": [{"role": "user", "content": "hi"}],
                                        "stream": False, "max_new_tokens": 4}),
        "match": ((MatchesImageText,), "/v1/match", {"model": family, "image": image, "texts": ["a red circle", "a star"]}),
        "imagine": ((Imagines,), "/v1/imagine", {"model": family, "prompt": "a red circle"}),
    }


def _families_with_index() -> list[str]:
    from vlmkit.models.registry import get_family

    return [family for family in FAMILIES if provides(get_family(family), EmbedsTexts)]


FAMILIES_WITH_INDEX = _families_with_index()
CASES = list(_body("", "x"))


def _check_success(case: str, answer: dict, family: str) -> None:
    assert answer["model"] == family
    if case.startswith("embed"):
        embeddings = torch.tensor(answer["embeddings"])
        assert embeddings.shape == (2, answer["dim"])
        assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-4)
    elif case == "classify":
        assert sorted(item["label"] for item in answer["labels"]) == ["circle", "square", "star"]
        assert sum(item["probability"] for item in answer["labels"]) == pytest.approx(1.0, abs=1e-4)
        assert [item["probability"] for item in answer["labels"]] == sorted((item["probability"] for item in answer["labels"]), reverse=True)
    elif case.startswith("search"):
        assert len(answer["hits"]) == 2 and answer["hits"][0]["score"] >= answer["hits"][1]["score"]
        assert {"row", "score", "record"} <= set(answer["hits"][0])
    else:
        key = {"caption": "caption", "ask": "answer", "chat": "reply", "match": "matches", "imagine": "images"}[case]
        assert key in answer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES)
def test_every_endpoint_for_every_family(client, family, case, image, models):
    needed, endpoint, body = _body(image, family)[case]
    model = models[family]
    if case.startswith("search") and family in FAMILIES_WITH_INDEX:
        body["index"] = family  # the index of this model's own embeddings
    response = client.post(endpoint, json=body)
    if all(provides(model, capability) for capability in needed):
        assert response.status_code == 200, response.text
        _check_success(case, response.json(), family)
    else:
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        missing = next(capability for capability in needed if not provides(model, capability))
        assert error["type"] == "missing_capability"
        assert f"'{family}'" in error["message"] and missing.name in error["message"]


def test_models_lists_capabilities_and_endpoints(client, models):
    answer = client.get("/v1/models").json()
    listed = {entry["name"]: entry for entry in answer["models"]}
    assert set(listed) == set(models)
    for family, model in models.items():
        assert listed[family]["capabilities"] == [capability.__name__ for capability in model.capabilities]
        assert ("/v1/caption" in listed[family]["endpoints"]) == provides(model, Generates)
        assert ("/v1/embed" in listed[family]["endpoints"]) == (provides(model, EmbedsTexts) or provides(model, EmbedsImages))
    assert {index["name"] for index in answer["indexes"]} == set(FAMILIES_WITH_INDEX)


def test_without_a_model_name_the_first_capable_model_answers(client, models, image):
    generating = [family for family, model in models.items() if provides(model, Generates)]
    answer = client.post("/v1/caption", json={"image": image, "max_new_tokens": 3}).json()
    assert answer["model"] == generating[0]
    imagining = [family for family, model in models.items() if provides(model, Imagines)]
    drawn = client.post("/v1/imagine", json={"prompt": "a red circle"})
    assert drawn.status_code == 200 and drawn.json()["model"] == imagining[0]
    # a server none of whose models has the capability says so (every endpoint has a family now)
    from types import SimpleNamespace

    from vlmkit.serve.errors import ApiError
    from vlmkit.serve.service import Service

    captioners = SimpleNamespace(models={generating[0]: models[generating[0]]})
    with pytest.raises(ApiError, match="no loaded model can 'generate images', which /v1/imagine needs"):
        Service.pick(captioners, None, (Imagines,), "/v1/imagine")


def test_unknown_model_is_a_404_listing_the_loaded_ones(client, image):
    response = client.post("/v1/caption", json={"model": "nope", "image": image})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "unknown_model" and "'nope'" in error["message"] and FAMILIES[0] in error["message"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in FAMILIES_WITH_INDEX])
def test_search_finds_the_text_itself_and_embeds_with_the_index_model(client, family):
    # No model named: the index's own model (by run folder) embeds the query.
    answer = client.post("/v1/search", json={"index": family, "text": "a blue square", "k": 3}).json()
    assert answer["model"] == family
    assert answer["hits"][0]["record"]["text"] == "a blue square"
    assert answer["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_search_refuses_a_model_of_another_dimension(client, models):
    dims = {family: models[family].embed_texts(["x"]).shape[1] for family in FAMILIES_WITH_INDEX}
    pairs = [(a, b) for a in dims for b in dims if dims[a] != dims[b]]
    if not pairs:
        pytest.skip("every text-embedding family embeds into the same dimension")
    index, model = pairs[0]
    response = client.post("/v1/search", json={"index": index, "model": model, "text": "a red circle"})
    assert response.status_code == 400 and "dimensions" in response.json()["error"]["message"]


def test_chat_streams_server_sent_events_that_add_up_to_the_reply(client, models, image):
    chatting = [family for family, model in models.items() if provides(model, Chats)]
    if not chatting:
        pytest.skip("no registered family chats")
    body = {"model": chatting[0], "image": image, "messages": [{"role": "user", "content": "what is this?"}], "max_new_tokens": 6}
    with client.stream("POST", "/v1/chat", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = "".join(event["delta"] for event in events if "delta" in event)
    assert events[-1]["done"] is True and events[-1]["reply"] == deltas
    whole = client.post("/v1/chat", json={**body, "stream": False}).json()
    assert whole["reply"] == events[-1]["reply"]  # greedy: streamed and whole replies agree


def test_chat_refuses_a_conversation_that_does_not_end_with_the_user(client, models):
    chatting = [family for family, model in models.items() if provides(model, Chats)]
    if not chatting:
        pytest.skip("no registered family chats")
    body = {"model": chatting[0], "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    response = client.post("/v1/chat", json=body)
    assert response.status_code == 400 and "ends with an assistant turn" in response.json()["error"]["message"]


class FakeMatcher:
    """A model that matches image and text and imagines images (duck-typed: no family has these yet)."""

    family = "fake"
    capabilities = (MatchesImageText, Imagines)

    def __init__(self) -> None:
        from vlmkit.data.transforms import ImageTransform

        self.transform, self.device = ImageTransform(16), torch.device("cpu")

    def tokenize(self, texts):
        return torch.tensor([[len(text)] for text in texts])

    def match(self, pixels, tokens):
        assert pixels.shape[0] == tokens.shape[0]
        return torch.sigmoid(tokens[:, 0].float() - 5)

    def imagine(self, prompts, **options):
        return torch.rand(len(prompts), 3, 8, 8, generator=torch.Generator().manual_seed(options.get("seed", 0)))


def test_match_and_imagine_through_their_capabilities(image):
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from vlmkit.serve.app import create_app

    with TestClient(create_app({"m": FakeMatcher()}, {})) as client:
        matches = client.post("/v1/match", json={"image": image, "texts": ["abc", "abcdefghij"]}).json()["matches"]
        assert [m["text"] for m in matches] == ["abc", "abcdefghij"]
        assert matches[0]["probability"] == pytest.approx(float(torch.sigmoid(torch.tensor(-2.0))), abs=1e-6)
        images = client.post("/v1/imagine", json={"prompt": "a red circle", "num_images": 2, "seed": 1}).json()["images"]
        assert len(images) == 2 and Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (8, 8)
        caption = client.post("/v1/caption", json={"model": "m", "image": image})
        assert caption.status_code == 404 and "'m' (family 'fake') cannot 'generate text'" in caption.json()["error"]["message"]


def test_search_hits_carry_an_image_url_instead_of_the_server_path(models, model_runs, make_index, tmp_path):
    from fastapi.testclient import TestClient

    from vlmkit.serve.app import create_app

    family = FAMILIES_WITH_INDEX[0]
    picture = tmp_path / "red.png"
    import base64

    picture.write_bytes(base64.b64decode(png_b64()))
    index = make_index(models[family], ["a red circle", "a blue square"], model_runs[family], image=str(picture))
    with TestClient(create_app({family: models[family]}, {"pictures": index})) as client:
        hit = client.post("/v1/search", json={"text": "a red circle", "k": 1}).json()["hits"][0]
        assert "image" not in hit["record"] and str(tmp_path) not in json.dumps(hit)
        fetched = client.get(hit["image_url"])
        assert fetched.status_code == 200 and fetched.content == picture.read_bytes()
        assert client.get("/v1/indexes/pictures/rows/99/image").status_code == 404
        assert client.get("/v1/indexes/other/rows/0/image").json()["error"]["type"] == "unknown_index"


def test_healthz_metrics_and_docs(client, image):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/embed", "/v1/chat", "/v1/search", "/v1/imagine"}
    assert client.get("/docs").status_code == 200
    client.post("/v1/embed", json={"texts": ["a red circle"]})
    text = client.get("/metrics").text
    assert 'vlmkit_requests_total{endpoint="/v1/embed",status="200"}' in text
    assert "vlmkit_request_seconds_bucket" in text and 'vlmkit_batch_size_count{model=' in text
