"""What a model can do, as typed protocols that tasks, the CLI and the server ask for.

A family lists the capabilities it provides (`capabilities = (EmbedsImages, EmbedsTexts)`);
`VLModel` checks at class creation that every method of every listed protocol is implemented,
so a family that declares a capability it lacks fails at import, not in a user's run. A task
asks with `require(model, Generates, task="caption")` and gets one clear sentence naming the
family and the missing capability otherwise; `provides(model, Answers)` is the question
without the error. Nothing here, or in any task, names a family.

Later families add their protocols here (detection, text-to-image, chat): one class each, with
the methods a task calls and a `name` for messages.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Protocol, Sequence

from vlmkit.errors import MissingCapability

if TYPE_CHECKING:  # annotations only: the CLI imports this module without torch
    import torch


class Capability(Protocol):
    """Base of the capability protocols: `name` is how messages and `vlmkit info` call it."""

    name: ClassVar[str] = "capability"


class EmbedsImages(Capability, Protocol):
    name: ClassVar[str] = "embed images"

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) embeddings in the shared space, not normalised."""


class EmbedsTexts(Capability, Protocol):
    name: ClassVar[str] = "embed texts"

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) embeddings, not normalised."""


class Generates(Capability, Protocol):
    name: ClassVar[str] = "generate text"

    def generate(self, pixels: torch.Tensor, prompt: str | Sequence[str] | None = None, **decoding) -> list[str]:
        """Texts for images (B, 3, H, W), each continuing its prompt; decoding takes GenerationConfig fields."""

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """(step_fn, prompt_tokens) for `vlmkit.generation.generate`."""


class Answers(Capability, Protocol):
    name: ClassVar[str] = "answer questions"

    def answer(self, pixels: torch.Tensor, questions: list[str], **decoding) -> list[str]:
        """One answer per (image, question) row."""


class AnswersInContext(Capability, Protocol):
    name: ClassVar[str] = "answer with in-context examples"

    def answer_in_context(self, pixels: torch.Tensor, questions: list[str],
                          examples: Sequence[Sequence[tuple[torch.Tensor, str, str]]], **decoding) -> list[str]:
        """One answer per row, after that row's examples: (pixels (3, H, W), question, answer) each."""

class Chats(Capability, Protocol):
    name: ClassVar[str] = "chat about an image"

    def chat(self, pixels: torch.Tensor | None, messages: list[dict], stream: Callable[[str], None] | None = None,
             **decoding) -> str:
        """The assistant's reply to `messages` ({"role": "user" | "assistant", "content"} turns, ending with
        a user turn) about one image (1, 3, H, W) or (3, H, W); `stream` gets each new piece of text."""


class Verifies(Capability, Protocol):
    name: ClassVar[str] = "verify statements"

    def verify(self, pixels: torch.Tensor, statements: list[str]) -> torch.Tensor:
        """(B,) probability that each statement is true of its image."""


class MatchesImageText(Capability, Protocol):
    name: ClassVar[str] = "match image and text"

    def match(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) probability that text row b describes image row b (an image-text matching head)."""

    def image_match_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, ...) what `match_scores` reads of each image, computed once per image (retrieval re-ranking)."""

    def match_scores(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the matching head's score (a logit) of text row b against image-feature row b."""


class ReadsRegions(Capability, Protocol):
    """A model whose visual inputs are object boxes (fusion encoders): tasks that have records pass the
    records' boxes to `answer`, `verify` and `match` as `regions=model.region_inputs(records)`."""

    name: ClassVar[str] = "read object boxes"

    def region_inputs(self, records: Sequence[dict]) -> dict:
        """{"boxes" (B, R, 4), "region_mask" (B, R), "region_labels" (B, R)} of the records' `objects`, where the
        model's evaluation transform puts them (a record without objects gets none)."""


class ScoresText(Capability, Protocol):
    name: ClassVar[str] = "score text likelihood"

    def text_nll(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per text: (sum of next-token negative log-likelihoods (B,), number of predicted tokens (B,)),
        tokenized as the model trains (texts longer than its context are cut)."""

class Imagines(Capability, Protocol):
    name: ClassVar[str] = "generate images"

    def imagine(self, prompts: Sequence[str], **options) -> torch.Tensor:
        """(B, 3, H, W) images with values in [0, 1], one per text prompt (text-to-image families)."""


class Detects(Capability, Protocol):
    name: ClassVar[str] = "detect objects"

    def detection_inputs(self, images: Sequence) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) pixels, each image resized to the square whole (no crop), so a box
        found on the pixels maps back to the image by scaling x by width / S and y by height / S."""

    def detect(self, pixels: torch.Tensor, labels: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Per image of `pixels` (B, 3, S, S): {"boxes": (N, 4) [x0, y0, x1, y1] in pixel coordinates,
        "scores": (N,), "labels": (N,) indices into `labels`} (open vocabulary: labels are names)."""


def methods_of(capability: type) -> list[str]:
    """The method names a capability protocol asks for (its own and its bases', not Protocol's)."""
    names = []
    for klass in capability.__mro__:
        if klass in (Capability, Protocol, object) or Capability not in klass.__mro__:
            continue
        names += [name for name, value in vars(klass).items() if callable(value) and not name.startswith("_")]
    return sorted(set(names))


def missing_methods(cls: type, capability: type) -> list[str]:
    """Methods of `capability` that class `cls` does not implement (the protocol's own stubs don't count)."""
    missing = []
    for name in methods_of(capability):
        implementation = getattr(cls, name, None)
        if implementation is None or not callable(implementation) or implementation is getattr(capability, name):
            missing.append(name)
    return missing


def provides(model, capability: type) -> bool:
    """Whether `model` (an instance or a family class) declares `capability`."""
    return capability in getattr(model, "capabilities", ())


def require(model, capability: type, task: str) -> None:
    """Raise MissingCapability (a UserError) unless `model` declares `capability`."""
    if not provides(model, capability):
        family = getattr(model, "family", type(model).__name__)
        raise MissingCapability(family, capability.name, task)
