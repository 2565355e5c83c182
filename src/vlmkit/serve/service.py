"""What the routes do: pick a model by capability, turn the request into tensors, run it batched.

`Service` holds the loaded models and indexes, one single-thread executor per model (a model runs
one call at a time, off the event loop) and one `Batcher` per (model, kind of request). Every
method takes a validated request (serve/schemas.py) and returns the JSON-ready answer or raises
an `ApiError`; none names a model family: a model is chosen by what it `provides`.
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np
import torch
import torch.nn.functional as F

from vlmkit.capabilities import (Answers, Chats, EmbedsImages, EmbedsTexts, Generates, Imagines, MatchesImageText,
                                 provides)
from vlmkit.errors import UserError
from vlmkit.serve import schemas
from vlmkit.serve.batching import Batcher
from vlmkit.serve.errors import ApiError, error_body
from vlmkit.serve.inputs import check_count, check_text, decode_image, encode_png
from vlmkit.serve.metrics import Metrics
from vlmkit.serve.settings import Settings

# Which capabilities each endpoint needs (all of them); /v1/embed and /v1/search need the one
# their input asks for, so they list the alternatives.
ENDPOINTS: dict[str, tuple[tuple[type, ...], ...]] = {
    "/v1/embed": ((EmbedsImages,), (EmbedsTexts,)),
    "/v1/classify": ((EmbedsImages, EmbedsTexts),),
    "/v1/search": ((EmbedsImages,), (EmbedsTexts,)),
    "/v1/caption": ((Generates,),),
    "/v1/ask": ((Answers,),),
    "/v1/chat": ((Chats,),),
    "/v1/match": ((MatchesImageText,),),
    "/v1/imagine": ((Imagines,),),
}

DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.", "a rendering of a {}.")


def served_endpoints(model, have_indexes: bool) -> list[str]:
    """The endpoints `model` answers, from its capabilities (what GET /v1/models lists)."""
    out = []
    for endpoint, alternatives in ENDPOINTS.items():
        if endpoint == "/v1/search" and not have_indexes:
            continue
        if any(all(provides(model, capability) for capability in needed) for needed in alternatives):
            out.append(endpoint)
    return out


class Service:
    """The loaded models and indexes and everything the routes do with them."""

    def __init__(self, models: dict[str, Any], indexes: dict[str, Any], settings: Settings, metrics: Metrics) -> None:
        self.models, self.indexes, self.settings, self.metrics = models, indexes, settings, metrics
        self.executors = {name: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{number}")
                          for number, name in enumerate(models)}
        self._batchers: dict[tuple[str, str], Batcher] = {}

    # ---- choosing a model ---------------------------------------------------------------
    def pick(self, name: str | None, needed: tuple[type, ...], endpoint: str) -> tuple[str, Any]:
        """The model called `name` (or, without a name, the first loaded one providing `needed`),
        refused with 404 when it is not loaded or lacks a capability the endpoint needs."""
        able = [key for key, model in self.models.items() if all(provides(model, c) for c in needed)]
        what = " and ".join(f"'{capability.name}'" for capability in needed)
        if name is None:
            if not able:
                raise ApiError(404, "missing_capability", f"no loaded model can {what}, which {endpoint} needs "
                                                          f"(loaded: {', '.join(self.models)})")
            name = able[0]
        if name not in self.models:
            raise ApiError(404, "unknown_model", f"model '{name}' is not loaded; loaded models: {', '.join(self.models)} "
                                                 f"(GET /v1/models lists them)")
        model = self.models[name]
        missing = [capability for capability in needed if not provides(model, capability)]
        if missing:
            family = getattr(model, "family", type(model).__name__)
            others = f"models that can: {', '.join(able)}" if able else "no loaded model can"
            raise ApiError(404, "missing_capability", f"model '{name}' (family '{family}') cannot '{missing[0].name}', "
                                                      f"which {endpoint} needs; {others}")
        return name, model

    # ---- running work ---------------------------------------------------------------------
    async def limited(self, work) -> Any:
        """Await `work` within the per-request timeout (504 past it)."""
        try:
            return await asyncio.wait_for(work, self.settings.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"the request took longer than the server's limit of {self.settings.timeout_s:g} s; "
                                           f"send less at once or try again") from None

    def batcher(self, name: str, kind: str, run_batch: Callable[[list], list]) -> Batcher:
        """The batcher of (model `name`, request `kind`), created on first use."""
        key = (name, kind)
        if key not in self._batchers:
            on = self.settings.batching
            self._batchers[key] = Batcher(run_batch, self.executors[name], max_batch=self.settings.max_batch if on else 1,
                                          window_s=self.settings.batch_window_ms / 1000 if on else 0.0,
                                          on_batch=lambda size: self.metrics.observe_batch(name, kind, size))
        return self._batchers[key]

    async def pixels(self, name: str, model, images: list[str], field: str) -> torch.Tensor:
        """Base64 images -> (B, 3, H, W) pixels with the model's transform, decoded off the event loop
        in the model's own thread.

        Not in asyncio's default pool: its threads (up to six here) would each grow a malloc arena
        of their own from the decoded images and tensors, and a second pool adds a thread hop and
        GIL contention per request. (The RSS creep under mixed load was oneDNN's per-shape
        primitives, not this: see serve/onednn.py.)
        """
        if getattr(model, "transform", None) is None:
            raise ApiError(400, "invalid_request", "this model has no image preprocessing saved with it; it cannot take images")
        limit = self.settings.max_image_pixels

        # A list field names each image by position ("images[2]"); a single-image field by its name.
        names = [f"{field}[{index}]" for index in range(len(images))] if field == "images" else [field]

        def decode() -> torch.Tensor:
            return torch.stack([model.transform(decode_image(data, name, limit)) for data, name in zip(images, names)])

        return await asyncio.get_running_loop().run_in_executor(self.executors[name], decode)

    def texts(self, texts: list[str], field: str) -> list[str]:
        limit = self.settings.max_text_chars
        return [check_text(text, f"{field}[{index}]", limit) for index, text in enumerate(texts)]

    def decoding(self, request: schemas.Decoding, model, default_cap: bool) -> dict[str, Any]:
        """The request's decoding settings; `max_new_tokens` within the server's limit (and, with
        `default_cap`, capped there when the request leaves it to the model's default)."""
        settings = {key: value for key, value in request.decoding().items() if value is not None}
        cap = self.settings.max_new_tokens
        asked = settings.get("max_new_tokens")
        if asked is not None and asked > cap:
            raise ApiError(400, "limit_exceeded", f"max_new_tokens {asked} is over the server's limit of {cap}; ask for fewer")
        if asked is None and default_cap:
            default = getattr(getattr(model, "generation_config", None), "max_new_tokens", cap)
            settings["max_new_tokens"] = min(default, cap)
        return settings

    # ---- the endpoints --------------------------------------------------------------------
    async def embed_texts(self, name: str, model, texts: list[str]) -> torch.Tensor:
        def run(items: list[list[str]]) -> list[torch.Tensor]:
            flat = [text for item in items for text in item]
            embeddings = model.embed_texts(flat)  # (N, D) normalised
            return list(torch.split(embeddings, [len(item) for item in items]))

        return await self.batcher(name, "embed_texts", run).submit(texts)

    async def embed_pixels(self, name: str, model, pixels: torch.Tensor) -> torch.Tensor:
        def run(items: list[torch.Tensor]) -> list[torch.Tensor]:
            with torch.inference_mode():
                embeddings = F.normalize(model.encode_image(torch.cat(items).to(model.device)).float(), dim=-1).cpu()
            return list(torch.split(embeddings, [len(item) for item in items]))

        return await self.batcher(name, "embed_images", run).submit(pixels)

    async def embed(self, request: schemas.EmbedRequest) -> dict:
        if (request.images is None) == (request.texts is None):
            raise ApiError(400, "invalid_request", "give either 'images' (base64 strings) or 'texts', not both and not neither")
        if request.texts is not None:
            name, model = self.pick(request.model, (EmbedsTexts,), "/v1/embed with texts")
            texts = self.texts(check_count(request.texts, "texts", self.settings.max_items, "texts"), "texts")
            embeddings = await self.embed_texts(name, model, texts)
        else:
            name, model = self.pick(request.model, (EmbedsImages,), "/v1/embed with images")
            images = check_count(request.images, "images", self.settings.max_items, "images")
            embeddings = await self.embed_pixels(name, model, await self.pixels(name, model, images, "images"))
        # A numpy array, not a list of Python floats: the response writes it directly (app.FastJSON).
        return {"model": name, "dim": int(embeddings.shape[1]), "embeddings": embeddings.numpy()}

    async def classify(self, request: schemas.ClassifyRequest) -> dict:
        name, model = self.pick(request.model, (EmbedsImages, EmbedsTexts), "/v1/classify")
        labels = self.texts(check_count(request.labels, "labels", self.settings.max_labels, "labels"), "labels")
        if len(set(labels)) != len(labels):
            repeated = next(label for label in labels if labels.count(label) > 1)
            raise ApiError(400, "invalid_request", f"labels has '{repeated}' more than once; give each label once")
        templates = tuple(request.templates) if request.templates is not None else DEFAULT_TEMPLATES
        check_count(list(templates), "templates", 16, "templates")
        bad = [template for template in templates if template.count("{}") != 1]
        if bad:
            raise ApiError(400, "invalid_request", f"template '{bad[0][:80]}' needs exactly one '{{}}' where the label goes")
        self.texts(list(templates), "templates")
        pixels = await self.pixels(name, model, [request.image], "image")

        def run(items: list[tuple]) -> list[list[float]]:
            prompts = sorted({template.format(label) for _, labels, templates in items for label in labels for template in templates})
            row_of = {prompt: row for row, prompt in enumerate(prompts)}
            with torch.inference_mode():
                text = model.embed_texts(prompts)  # (P, D), every prompt of the batch once
                images = F.normalize(model.encode_image(torch.cat([p for p, _, _ in items]).to(model.device)).float(), dim=-1).cpu()
            out = []
            for image, (_, labels, templates) in zip(images, items):
                rows = torch.tensor([[row_of[t.format(label)] for t in templates] for label in labels])  # (C, T)
                classes = F.normalize(text[rows].mean(dim=1), dim=-1)  # (C, D): the prompt ensemble of each label
                out.append((100.0 * classes @ image).softmax(dim=0).tolist())
            return out

        probabilities = await self.batcher(name, "classify", run).submit((pixels, labels, templates))
        ranked = sorted(zip(labels, probabilities), key=lambda pair: -pair[1])
        return {"model": name, "labels": [{"label": label, "probability": p} for label, p in ranked]}

    def pick_index(self, name: str | None) -> tuple[str, Any]:
        if not self.indexes:
            raise ApiError(404, "no_index", "this server has no search index loaded; start it with --index NAME=IDX")
        if name is None:
            if len(self.indexes) > 1:
                raise ApiError(400, "invalid_request", f"several indexes are loaded ({', '.join(self.indexes)}); name one in 'index'")
            name = next(iter(self.indexes))
        if name not in self.indexes:
            raise ApiError(404, "unknown_index", f"index '{name}' is not loaded; loaded indexes: {', '.join(self.indexes)}")
        return name, self.indexes[name]

    def index_model(self, index, requested: str | None, needed: type) -> tuple[str, Any]:
        """The model that embeds queries for `index`: the one asked for, else the one the index was
        built with (by run folder), else the first that can."""
        if requested is None:
            built_with = str((getattr(index, "model_info", None) or {}).get("model", ""))
            for key, source in self.settings.model_sources.items():
                if built_with and _same_path(source, built_with) and provides(self.models.get(key), needed):
                    requested = key
                    break
        return self.pick(requested, (needed,), "/v1/search")

    async def search(self, request: schemas.SearchRequest) -> dict:
        if (request.text is None) == (request.image is None):
            raise ApiError(400, "invalid_request", "give either a 'text' or an 'image' query, not both and not neither")
        k = min(10, self.settings.max_k) if request.k is None else request.k
        if k > self.settings.max_k:
            raise ApiError(400, "limit_exceeded", f"k {k} is over the server's limit of {self.settings.max_k}; ask for fewer hits")
        index_name, index = self.pick_index(request.index)
        if request.text is not None:
            name, model = self.index_model(index, request.model, EmbedsTexts)
            query = await self.embed_texts(name, model, self.texts([request.text], "text"))
        else:
            name, model = self.index_model(index, request.model, EmbedsImages)
            query = await self.embed_pixels(name, model, await self.pixels(name, model, [request.image], "image"))
        if query.shape[1] != index.dim:
            raise ApiError(400, "invalid_request", f"model '{name}' embeds into {query.shape[1]} dimensions but index '{index_name}' "
                                                   f"holds {index.dim}; name the model the index was built with")
        vectors = np.ascontiguousarray(query.numpy(), dtype=np.float32)  # (1, D), already L2-normalised
        hits = (await asyncio.to_thread(index.search, vectors, k))[0]
        return {"index": index_name, "model": name, "hits": [_public_hit(index_name, hit) for hit in hits]}

    def index_image(self, index_name: str, row: int) -> Path:
        """The image file of one record of an index (for the page's thumbnails), or 404."""
        _, index = self.pick_index(index_name)
        record = _record_of(index, row)
        image = record.get("image") if isinstance(record, dict) else None
        if not isinstance(image, str):
            raise ApiError(404, "not_found", f"row {row} of index '{index_name}' has no image")
        path = Path(image)
        if not path.is_absolute():
            path = Path(getattr(index, "root", ".")) / path
        if not path.is_file():
            raise ApiError(404, "not_found", f"the image of row {row} of index '{index_name}' is missing on the server")
        return path

    async def generate(self, name: str, model, kind: str, pixels: torch.Tensor, text: str | None, decoding: dict,
                       call: Callable[[torch.Tensor, list[str] | None, dict], list[str]]) -> str:
        """One generation request through the (model, kind) batcher: requests with the same decoding
        settings decode together as one batch (`call(pixels, texts or None, decoding)`)."""
        def run(items: list[tuple]) -> list[str]:
            batch = torch.cat([p for p, _ in items]).to(model.device)
            texts = [t for _, t in items]
            with torch.inference_mode():
                return call(batch, None if texts[0] is None else texts, dict(decoding))

        key = (tuple(sorted(decoding.items())), text is None)
        return await self.batcher(name, kind, run).submit((pixels, text), key)

    async def caption(self, request: schemas.CaptionRequest) -> dict:
        name, model = self.pick(request.model, (Generates,), "/v1/caption")
        prompt = None if request.prompt is None else check_text(request.prompt, "prompt", self.settings.max_text_chars)
        decoding = self.decoding(request, model, default_cap=True)
        pixels = await self.pixels(name, model, [request.image], "image")
        caption = await self.generate(name, model, "caption", pixels, prompt, decoding,
                                      lambda p, prompts, d: model.generate(p, prompt=prompts, **d))
        return {"model": name, "caption": caption}

    async def ask(self, request: schemas.AskRequest) -> dict:
        name, model = self.pick(request.model, (Answers,), "/v1/ask")
        question = check_text(request.question, "question", self.settings.max_text_chars)
        decoding = self.decoding(request, model, default_cap=False)
        pixels = await self.pixels(name, model, [request.image], "image")
        answer = await self.generate(name, model, "ask", pixels, question, decoding,
                                     lambda p, questions, d: model.answer(p, questions, **d))
        return {"model": name, "answer": answer}

    async def match(self, request: schemas.MatchRequest) -> dict:
        name, model = self.pick(request.model, (MatchesImageText,), "/v1/match")
        texts = self.texts(check_count(request.texts, "texts", self.settings.max_items, "texts"), "texts")
        pixels = await self.pixels(name, model, [request.image], "image")

        def run(items: list[tuple]) -> list[list[float]]:
            rows = torch.cat([p.expand(len(t), -1, -1, -1) for p, t in items])  # (N, 3, H, W): the image once per text
            with torch.inference_mode():
                scores = model.match(rows.to(model.device), model.tokenize([x for _, t in items for x in t]).to(model.device))
            return [chunk.tolist() for chunk in torch.split(scores.float().cpu(), [len(t) for _, t in items])]

        scores = await self.batcher(name, "match", run).submit((pixels, texts))
        return {"model": name, "matches": [{"text": t, "probability": s} for t, s in zip(texts, scores)]}

    async def imagine(self, request: schemas.ImagineRequest) -> dict:
        name, model = self.pick(request.model, (Imagines,), "/v1/imagine")
        prompt = check_text(request.prompt, "prompt", self.settings.max_text_chars)
        options = {} if request.seed is None else {"seed": request.seed}

        def run(items: list[tuple]) -> list[list[str]]:
            prompts = [p for p, n in items for _ in range(n)]
            with torch.inference_mode():
                images = model.imagine(prompts, **options)  # (N, 3, H, W) in [0, 1]
            pngs = [encode_png(image) for image in images]
            out, start = [], 0
            for _, count in items:
                out.append(pngs[start:start + count])
                start += count
            return out

        key = tuple(sorted(options.items()))
        images = await self.batcher(name, "imagine", run).submit((prompt, request.num_images), key)
        return {"model": name, "images": images, "format": "png"}

    # ---- chat (one conversation per model call, streamed) -----------------------------------
    async def chat_setup(self, request: schemas.ChatRequest) -> tuple[str, Any, torch.Tensor | None, list[dict], dict]:
        """Everything checked before a chat starts, so that bad input is a JSON error, not a broken stream."""
        from vlmkit.data.records import check_messages

        name, model = self.pick(request.model, (Chats,), "/v1/chat")
        messages = [message.model_dump() for message in check_count(request.messages, "messages", self.settings.max_messages, "turns")]
        for index, message in enumerate(messages):
            check_text(message["content"], f"messages[{index}].content", self.settings.max_text_chars)
        try:
            check_messages(messages, where="the conversation", prompt=True)
        except UserError as error:
            raise ApiError(400, "invalid_request", str(error)) from None
        decoding = self.decoding(request, model, default_cap=True)
        pixels = None if request.image is None else await self.pixels(name, model, [request.image], "image")
        return name, model, pixels, messages, decoding

    async def chat(self, request: schemas.ChatRequest) -> dict:
        name, model, pixels, messages, decoding = await self.chat_setup(request)
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self.executors[name], lambda: _chat(model, pixels, messages, None, decoding))
        self.metrics.observe_batch(name, "chat", 1)
        return {"model": name, "reply": reply}

    async def chat_events(self, name: str, model, pixels, messages: list[dict], decoding: dict) -> AsyncIterator[str]:
        """Server-sent events: `data: {"delta": piece}` as text is generated, then `data: {"done": true,
        "reply": text}`; a failure or the timeout mid-stream ends it with `event: error` and the error body."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def emit(piece: str) -> None:  # called in the model's thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        work = loop.run_in_executor(self.executors[name], lambda: _chat(model, pixels, messages, emit, decoding))
        work.add_done_callback(lambda _: pieces.put_nowait(None))  # runs on the loop, after every emit
        deadline = loop.time() + self.settings.timeout_s
        while True:
            try:
                piece = await asyncio.wait_for(pieces.get(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                body = error_body("timeout", f"the reply took longer than the server's limit of {self.settings.timeout_s:g} s")
                yield f"event: error\ndata: {json.dumps(body)}\n\n"
                return
            if piece is None:
                break
            yield f"data: {json.dumps({'delta': piece})}\n\n"
        self.metrics.observe_batch(name, "chat", 1)
        error = work.exception()
        if error is not None:
            message = str(error) if isinstance(error, UserError) else "the model failed on this request"
            yield f"event: error\ndata: {json.dumps(error_body('model_error', message))}\n\n"
            return
        yield f"data: {json.dumps({'done': True, 'reply': work.result()})}\n\n"


def _chat(model, pixels, messages: list[dict], stream, decoding: dict) -> str:
    with torch.inference_mode():
        return model.chat(None if pixels is None else pixels.to(model.device), messages, stream=stream, **decoding)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _record_of(index, row: int):
    records = getattr(index, "records", None)
    if records is not None:
        try:
            return records[row]
        except (IndexError, KeyError, TypeError):
            pass
    raise ApiError(404, "not_found", f"index has no row {row}")


def _public_hit(index_name: str, hit: dict) -> dict:
    """A hit as clients see it: the record without the server's image path, and a URL for the image."""
    record = dict(hit.get("record") or {})
    image = record.pop("image", None)
    out = {"row": int(hit["row"]), "score": float(hit["score"]), "record": record}
    if image is not None:
        out["image_url"] = f"/v1/indexes/{index_name}/rows/{int(hit['row'])}/image"
    return out
