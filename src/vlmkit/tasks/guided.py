"""Captioning with a text-only language model, guided by an image-text model: MAGIC (Su et al. 2022), no training.

At each step the LM proposes its k most likely next tokens; each candidate gets the magic score

    (1 - alpha) * p(v | x<t)  -  alpha * max_j cos(h_v, h_j)  +  beta * softmax_k(scale * cos(image, text(x<t, v)))

model confidence, contrastive search's degeneration penalty (h: the LM's last hidden states, the
prompt's included) and the guide's image-text similarity of the continuation so far with the
candidate appended, softmaxed over the k candidates. The best candidate is kept. beta = 0 is plain
contrastive search (SimCTG): the same LM with no image. Defaults are MAGIC's MSCOCO settings
(yxuansu/MAGIC image_captioning sh_folder/*_magic.sh): k = 45, alpha = 0.1, beta = 2.0, 16 tokens,
the guide reading at most the last 60 LM tokens of the continuation.

`GuidedCaptioner` puts an LM (`ContinuesText`) and a guide (`EmbedsImages` + `EmbedsTexts`) together
into something that `Generates`, so `vlmkit caption` and `vlmkit eval caption` run it unchanged:
`--model LM --guide CLIP --decoding magic`. The guide's own temperature (`logit_scale`, a learned log
scale) is the scale when it has one, else CLIP's 100.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from vlmkit.capabilities import ContinuesText, EmbedsImages, EmbedsTexts, Generates, require
from vlmkit.errors import UserError
from vlmkit.generation import GenerationConfig, generate

MAGIC_K = 45
MAGIC_ALPHA = 0.1
MAGIC_BETA = 2.0
MAGIC_LENGTH = 16
GUIDE_TEXT_TOKENS = 60  # the reference's clip_text_max_len: the guide reads the last 60 LM tokens
CLIP_SCALE = 100.0


def magic_scores(probs: torch.Tensor, penalty: torch.Tensor, similarity: torch.Tensor, alpha: float, beta: float,
                 scale: float) -> torch.Tensor:
    """The magic score of k candidates per row, (N, k), from their LM probabilities (N, k), degeneration
    penalties (N, k) and image-text cosine similarities (N, k)."""
    return (1.0 - alpha) * probs - alpha * penalty + beta * (scale * similarity).softmax(dim=-1)


class GuidedCaptioner:
    """A text-only LM and an image-text guide decoding together; it `Generates` (see the module docstring).

    `guide=None` or `beta=0`: contrastive search with no image (the captions do not depend on it).
    """

    family: ClassVar[str] = "guided decoding"  # what capability messages call it
    capabilities: ClassVar[tuple[type, ...]] = (Generates,)

    def __init__(self, lm, guide=None, k: int = MAGIC_K, alpha: float = MAGIC_ALPHA, beta: float = MAGIC_BETA,
                 max_new_tokens: int = MAGIC_LENGTH, guide_text_tokens: int = GUIDE_TEXT_TOKENS) -> None:
        require(lm, ContinuesText, task="guided captioning (--model)")
        if guide is not None:
            require(guide, EmbedsImages, task="guiding captions with images (--guide)")
            require(guide, EmbedsTexts, task="guiding captions with images (--guide)")
            if guide.transform is None:
                raise UserError("the guide has no image transform attached; load it with vlmkit.load(run_folder)")
        elif beta:
            raise UserError("magic decoding needs an image-text guide (--guide CLIP_RUN); use --decoding contrastive for none")
        if k < 2 or not 0 <= alpha <= 1 or beta < 0:
            raise UserError(f"guided decoding needs k >= 2, alpha in [0, 1] and beta >= 0 (got k={k}, alpha={alpha}, beta={beta})")
        self.lm, self.guide = lm, guide
        self.beta, self.guide_text_tokens = (beta if guide is not None else 0.0), guide_text_tokens
        self.generation_config = GenerationConfig(max_new_tokens=max_new_tokens, top_k=k, penalty_alpha=alpha)
        self.tokenizer = lm.tokenizer
        scale = getattr(guide, "logit_scale", None)
        self.scale = float(scale.detach().exp()) if torch.is_tensor(scale) else CLIP_SCALE

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def require(self, capability: type, task: str) -> None:
        require(self, capability, task)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """The guide's pixels of the images; with no guide a placeholder (the LM never sees images)."""
        if self.guide is None:
            return torch.zeros(len(images), 3, 1, 1)
        return self.guide.preprocess(images)

    def _guide_fn(self, pixels: torch.Tensor):
        """The candidate scorer of `generate`: beta * softmax over k of scale * cos(image, continuation + v)."""
        images = F.normalize(self.guide.encode_image(pixels.to(self.guide.device)).float(), dim=-1)  # (B, D)
        lm_tokenizer, limit = self.lm.tokenizer, self.guide_text_tokens

        def guide(candidates: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            batch, k, _ = candidates.shape
            texts = lm_tokenizer.batch_decode(candidates[:, :, -limit:].reshape(batch * k, -1).tolist())
            tokens = self.guide.tokenize(texts).to(self.guide.device)
            text = F.normalize(self.guide.encode_text(tokens).float(), dim=-1).view(batch, k, -1)  # (N, k, D)
            similarity = (text @ images.index_select(0, rows)[:, :, None]).squeeze(-1)  # (N, k)
            return self.beta * (self.scale * similarity).softmax(dim=-1)

        return guide

    def decoding_setup(self, pixels: torch.Tensor, prompts: list[str] | None):
        """(step_fn, prompt_tokens) of the LM after the prompts (the guide enters through `generate`)."""
        decoding = self.lm.text_decoding(prompts if prompts is not None else [""] * pixels.shape[0])
        return decoding.step, decoding.prompt_tokens

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, prompt: str | Sequence[str] | None = None, **decoding) -> list[str]:
        """Captions of images `pixels` (B, 3, H, W, the guide's preprocessing), each continuing its prompt.

        `decoding` takes GenerationConfig fields over the MAGIC defaults (top_k = k, penalty_alpha = alpha,
        max_new_tokens); it stays contrastive search.
        """
        batch = pixels.shape[0]
        prompts = [prompt or ""] * batch if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise UserError(f"got {len(prompts)} prompts for {batch} images; give one prompt, or one per image")
        config = GenerationConfig.from_kwargs(self.generation_config, **decoding)
        if not config.is_contrastive:
            raise UserError("guided captioning is contrastive search: keep penalty_alpha > 0 and top_k >= 2")
        for model in (self.lm, self.guide):
            if model is not None:
                model.eval()
        setup = self.lm.text_decoding(prompts)
        if setup.room < 1:
            raise UserError("the prompt leaves no room to generate within the LM's context; shorten it")
        config = GenerationConfig.from_kwargs(config, max_new_tokens=min(config.max_new_tokens, setup.room),
                                              min_new_tokens=min(config.min_new_tokens, setup.room))
        guide = self._guide_fn(pixels) if self.beta > 0 else None
        output = generate(setup.step, setup.prompt_tokens, config, eos_token_id=setup.eos_token_id,
                          pad_token_id=setup.pad_token_id, tokenizer=setup.tokenizer, guide=guide,
                          prompt_mask=setup.prompt_mask)
        return output.texts
