"""The server's limits and switches, one dataclass filled from `vlmkit serve`'s options."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Settings:
    """Limits a deployment needs, with defaults sized for small models on one machine.

    Requests over a limit are refused with a JSON error naming the limit (413 for sizes, 429 when
    the server already holds `max_concurrency` requests, 504 past `timeout_s`).
    """

    max_body_bytes: int = 8 * 1024 * 1024  # the whole request body, checked while it is read
    max_image_pixels: int = 16_000_000  # width * height, read from the image header before decoding
    max_items: int = 64  # images or texts in one request
    max_labels: int = 100  # labels of one /v1/classify request
    max_text_chars: int = 2000  # each text, question, label, prompt or chat message
    max_messages: int = 32  # turns of one /v1/chat conversation
    max_new_tokens: int = 64  # the most a generation request may ask for (and the default cap)
    max_k: int = 100  # hits of one /v1/search
    max_concurrency: int = 256  # requests in flight at once; more get 429
    timeout_s: float = 30.0  # per request, from arrival to answer
    batching: bool = True  # False: every request runs the model on its own (the benchmark's baseline)
    batch_window_ms: float = 5.0  # how long a batch waits for more requests after its first one
    max_batch: int = 32  # requests merged into one model call
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer KEY" or "X-API-Key: KEY"
    cors_origins: list[str] = field(default_factory=list)  # browsers on other origins are refused unless listed
    model_sources: dict[str, str] = field(default_factory=dict)  # model name -> run folder (finds an index's model)
