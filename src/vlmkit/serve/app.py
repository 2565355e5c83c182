"""The FastAPI app: `create_app(models, indexes, settings)`.

Routes are thin: each validates its body (serve/schemas.py), hands it to `Service`
(serve/service.py) within the per-request timeout and returns its JSON. Every error, whatever
raised it (a limit, a bad field, an unknown route, the model itself), leaves as
`{"error": {"type", "message"}}` with no traceback or file path. `/` serves `static/index.html`
and `/static/*` the folder beside this file, when it exists (the web page ships there).
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.errors import UserError
from vlmkit.serve import schemas
from vlmkit.serve.errors import ApiError, error_body
from vlmkit.serve.guard import Guard
from vlmkit.serve.metrics import Metrics
from vlmkit.serve.service import Service, served_endpoints
from vlmkit.serve.settings import Settings

STATIC = Path(__file__).parent / "static"


class FastJSON(JSONResponse):
    """A JSON response written by orjson when it is installed (the serve extra brings it).

    orjson writes a float list several times faster than the standard library and takes numpy
    arrays as they are (float32 rows come out as float32's shortest repr), which is most of the
    per-request cost of /v1/embed once batching has made the model call cheap.
    """

    def render(self, content: Any) -> bytes:
        return dumps(content)


try:
    import orjson

    def dumps(content: Any) -> bytes:
        """`content` as UTF-8 JSON bytes (numpy arrays included)."""
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
except ImportError:  # without orjson: the standard library, numpy arrays as lists
    import json

    def dumps(content: Any) -> bytes:
        """`content` as UTF-8 JSON bytes (numpy arrays included)."""
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                          default=lambda value: value.tolist()).encode("utf-8")


def create_app(models: dict[str, Any], indexes: dict[str, Any] | None = None, settings: Settings | None = None) -> FastAPI:
    """The service over `models` (name -> loaded model) and `indexes` (name -> SearchIndex)."""
    from vlmkit import __version__

    settings = settings or Settings()
    metrics = Metrics()
    service = Service(models, dict(indexes or {}), settings, metrics)
    app = FastAPI(title="vlmkit", version=__version__,
                  description="Vision-language models over HTTP: each model serves the endpoints its capabilities allow.")
    app.state.service = service
    _install_error_handlers(app)

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict:
        return {"status": "ok", "models": len(models), "indexes": len(service.indexes)}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", tags=["service"])
    async def list_models() -> dict:
        """Loaded models with their capabilities and endpoints (what the page shows panels by), and the indexes."""
        return {
            "models": [{"name": name, "family": getattr(model, "family", type(model).__name__),
                        "capabilities": [capability.__name__ for capability in getattr(model, "capabilities", ())],
                        "capability_names": [capability.name for capability in getattr(model, "capabilities", ())],
                        "endpoints": served_endpoints(model, bool(service.indexes))}
                       for name, model in models.items()],
            "indexes": [{"name": name, "dim": int(index.dim),
                         "model": Path(str((getattr(index, "model_info", None) or {}).get("model", ""))).name}
                        for name, index in service.indexes.items()],
        }

    # Routes return FastJSON themselves: FastAPI's default walk over the answer (jsonable_encoder)
    # costs more than the model call for a batch of embeddings.
    @app.post("/v1/embed", tags=["models"])
    async def embed(request: schemas.EmbedRequest) -> FastJSON:
        """L2-normalised embeddings of images or texts (models that embed images / texts)."""
        return FastJSON(await service.limited(service.embed(request)))

    @app.post("/v1/classify", tags=["models"])
    async def classify(request: schemas.ClassifyRequest) -> JSONResponse:
        """Zero-shot probabilities of the labels for one image (models that embed both)."""
        return FastJSON(await service.limited(service.classify(request)))

    @app.post("/v1/search", tags=["models"])
    async def search(request: schemas.SearchRequest) -> JSONResponse:
        """The k nearest records of an index to a text or image query."""
        return FastJSON(await service.limited(service.search(request)))

    @app.get("/v1/indexes/{index}/rows/{row}/image", tags=["models"])
    async def index_image(index: str, row: int) -> FileResponse:
        """The image of one index record (a search hit's `image_url`)."""
        return FileResponse(service.index_image(index, row))

    @app.post("/v1/caption", tags=["models"])
    async def caption(request: schemas.CaptionRequest) -> JSONResponse:
        """A caption for one image (models that generate text)."""
        return FastJSON(await service.limited(service.caption(request)))

    @app.post("/v1/ask", tags=["models"])
    async def ask(request: schemas.AskRequest) -> JSONResponse:
        """The answer to a question about one image (models that answer questions)."""
        return FastJSON(await service.limited(service.ask(request)))

    @app.post("/v1/chat", tags=["models"])
    async def chat(request: schemas.ChatRequest):
        """The assistant's next turn; streamed as server-sent events unless `stream` is false."""
        if not request.stream:
            return FastJSON(await service.limited(service.chat(request)))
        name, model, pixels, messages, decoding = await service.limited(service.chat_setup(request))
        return StreamingResponse(service.chat_events(name, model, pixels, messages, decoding), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.post("/v1/match", tags=["models"])
    async def match(request: schemas.MatchRequest) -> JSONResponse:
        """The probability that each text describes the image (models with an image-text matching head)."""
        return FastJSON(await service.limited(service.match(request)))

    @app.post("/v1/imagine", tags=["models"])
    async def imagine(request: schemas.ImagineRequest) -> JSONResponse:
        """Images generated from a text prompt, as base64 PNGs (text-to-image models)."""
        return FastJSON(await service.limited(service.imagine(request)))

    if (STATIC / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(STATIC / "index.html")
    else:
        @app.get("/", include_in_schema=False)
        async def root() -> dict:
            return {"service": "vlmkit", "docs": "/docs", "models": "/v1/models"}

    endpoints = {route.path for route in app.routes if hasattr(route, "path")}
    app.add_middleware(Guard, settings=settings, metrics=metrics, endpoints=endpoints)
    if settings.cors_origins:  # outermost, so browsers' preflight requests are answered before the API key check
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key"])
    return app


def _validation_message(errors: list[dict]) -> tuple[int, str, str]:
    """(status, type, one sentence) for pydantic's errors: the first one, naming its field."""
    first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return 400, "invalid_json", "the request body is not valid JSON; send a JSON object"
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not location:
        if first.get("type") == "missing":
            return 400, "invalid_json", "the request needs a JSON object body"
        return 422, "invalid_request", f"the request body: {first.get('msg', 'is invalid')}; send a JSON object"
    field = location[0] + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in location[1:])
    if first.get("type") == "extra_forbidden":
        return 422, "invalid_request", f"unknown field '{field}'; see /docs for this endpoint's fields"
    return 422, "invalid_request", f"field '{field}': {first.get('msg', 'is invalid')}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.type, error.message), status_code=error.status)

    @app.exception_handler(UserError)
    async def user_error(_: Request, error: UserError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", str(error)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        status, type, message = _validation_message(list(error.errors()))
        return JSONResponse(error_body(type, message), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path[:100]}; see /docs for the endpoints"
            return JSONResponse(error_body("not_found", message), status_code=404)
        if error.status_code == 405:
            return JSONResponse(error_body("method_not_allowed", f"{request.method} is not allowed on {request.url.path[:100]}; "
                                                                 f"see /docs"), status_code=405)
        return JSONResponse(error_body("http_error", str(error.detail)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log only; the client learns that it was not its fault.
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        return JSONResponse(error_body("internal_error", "the server failed on this request; it has been logged"), status_code=500)
