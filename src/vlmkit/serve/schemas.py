"""Request bodies, as strict pydantic models: unknown fields, wrong types and strings where numbers
belong are refused (422, naming the field) before any handler runs; /docs shows them."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Base64Image = str  # a base64-encoded image file (PNG, JPEG ...), or a data: URL holding one

MODEL_FIELD = Field(None, description="a loaded model's name (GET /v1/models); default: the first that can do this")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Decoding(Strict):
    """Decoding settings (GenerationConfig's names); unset ones take the model's defaults."""

    max_new_tokens: int | None = Field(None, ge=1)
    num_beams: int | None = Field(None, ge=1, le=8)
    do_sample: bool | None = None
    temperature: float | None = Field(None, gt=0, le=10)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = None

    def decoding(self) -> dict:
        return {name: getattr(self, name) for name in Decoding.model_fields}


class EmbedRequest(Strict):
    model: str | None = MODEL_FIELD
    images: list[Base64Image] | None = Field(None, description="base64 images to embed (or give texts)")
    texts: list[str] | None = Field(None, description="texts to embed (or give images)")


class ClassifyRequest(Strict):
    model: str | None = MODEL_FIELD
    image: Base64Image
    labels: list[str] = Field(description="class names; the answer gives each a probability")
    templates: list[str] | None = Field(None, description="prompts with one '{}' for the label (default: 5 photo prompts)")


class SearchRequest(Strict):
    index: str | None = Field(None, description="a loaded index's name; default: the only one")
    model: str | None = Field(None, description="the model that embeds the query; default: the one the index was built with")
    text: str | None = None
    image: Base64Image | None = None
    k: int | None = Field(None, ge=1, description="how many hits (default 10, or the server's limit if lower)")


class CaptionRequest(Decoding):
    model: str | None = MODEL_FIELD
    image: Base64Image
    prompt: str | None = Field(None, description="text the caption continues")


class AskRequest(Decoding):
    model: str | None = MODEL_FIELD
    image: Base64Image
    question: str


class ChatMessage(Strict):
    role: Literal["user", "assistant"]
    content: str


class ChatRequest(Decoding):
    model: str | None = MODEL_FIELD
    image: Base64Image | None = Field(None, description="the image the conversation is about (optional)")
    messages: list[ChatMessage] = Field(description="turns alternating user, assistant, ..., ending with a user turn")
    stream: bool = Field(True, description="true: server-sent events as text is generated; false: one JSON answer")


class MatchRequest(Strict):
    model: str | None = MODEL_FIELD
    image: Base64Image
    texts: list[str]


class ImagineRequest(Strict):
    model: str | None = MODEL_FIELD
    prompt: str
    num_images: int = Field(1, ge=1, le=4)
    seed: int | None = None
