"""Batched decoding shared by every generative family: greedy, beam search, sampling and contrastive search.

A family describes one decoding step as a function and `generate` does the rest:

    step_fn(tokens, cache, rows) -> logits (N, V) of the next token
                                 or (logits (N, V), hidden (N, T', D))

- `tokens` (N, T): every row's full sequence so far (prompt + generated). With a cache the
  family feeds only `tokens[:, cache.length:]` to its network; without one it re-runs the whole
  sequence (the reference the cache is tested against).
- `cache`: a `KVCache` (or None when `use_cache=False`), reordered here when beams are reordered.
- `rows` (N,): the input sample each row belongs to, so the family can pick image features
  (`features[rows]`) when beam search has expanded the batch.

- the second form adds the final-norm hidden states of the positions this call fed (the whole
  sequence without a cache, the new tokens with one). Greedy, beam search and sampling read only
  the logits, so a step may always return the pair; contrastive search (`penalty_alpha > 0` with
  `top_k > 1`, SimCTG / HF's definition) needs it: it scores each of the k most likely next tokens
  by (1 - alpha) * p(v) - alpha * max cosine between v's hidden state and every earlier one (the
  prompt's included). A `guide(candidates (N, k, t+1), rows) -> (N, k)`, given to `generate`, adds
  its score to that (MAGIC's image-text term); `candidates` are the generated tokens so far with
  each candidate appended.

Everything inside a step is vectorised over rows and beams; the only Python loop is over time.
Scores: the sum of the chosen tokens' log-probabilities for greedy/sampling (under the processed
distribution), and the length-normalised beam score for beam search (HF's definition:
sum log p / generated_length ** length_penalty).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Sequence

import torch

from vlmkit.errors import UserError
from vlmkit.layers.attention import KVCache

StepFn = Callable[[torch.Tensor, "KVCache | None", torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
Guide = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (candidates (N, k, t+1), rows (N,)) -> (N, k)


def _logits_of(output) -> torch.Tensor:
    """The logits of a step's output, which may carry hidden states too (see the module docstring)."""
    return output[0] if isinstance(output, tuple) else output


@dataclass
class GenerationConfig:
    """Decoding settings (names and meanings follow HF transformers' GenerationConfig)."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0  # stop tokens are forbidden before this many new tokens
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    early_stopping: bool = True  # beam search stops once num_beams hypotheses are finished
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    repetition_penalty: float = 1.0  # CTRL's penalty on already generated tokens (1.0 = off)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the end token
    seed: int | None = None  # seeds the sampler: the same seed gives the same samples
    use_cache: bool = True
    penalty_alpha: float = 0.0  # > 0 with top_k > 1 (and no sampling, one beam): contrastive search

    def validate(self) -> "GenerationConfig":
        """Raise UserError naming the first invalid setting."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be between 0 and max_new_tokens"),
            (self.num_beams >= 1, "num_beams must be at least 1"),
            (self.temperature > 0, "temperature must be positive (use do_sample=False for greedy decoding)"),
            (self.top_k >= 0, "top_k must be 0 (off) or positive"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive (1.0 = off)"),
            (not (self.do_sample and self.num_beams > 1), "beam sampling is not supported; use num_beams=1 with do_sample"),
            (0 <= self.penalty_alpha <= 1, "penalty_alpha must be in [0, 1] (0 = off)"),
            (not (self.penalty_alpha > 0 and (self.do_sample or self.num_beams > 1)),
             "contrastive search (penalty_alpha > 0) is deterministic and single-beam; drop do_sample / num_beams"),
            (not (self.penalty_alpha > 0 and self.top_k < 2), "contrastive search (penalty_alpha > 0) needs top_k of at least 2 candidates"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"generation setting invalid: {message}")
        return self

    @classmethod
    def from_kwargs(cls, base: "GenerationConfig | None" = None, **kwargs) -> "GenerationConfig":
        """`base` (or the defaults) updated with keyword settings; unknown names are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UserError(f"unknown generation setting(s) {', '.join(unknown)}; valid ones are: {', '.join(sorted(known))}")
        if "stop_token_ids" in kwargs and kwargs["stop_token_ids"] is not None:
            kwargs["stop_token_ids"] = tuple(int(t) for t in kwargs["stop_token_ids"])
        return replace(base or cls(), **{k: v for k, v in kwargs.items() if v is not None}).validate()

    @property
    def is_contrastive(self) -> bool:
        """Whether these settings ask for contrastive search (HF's rule: penalty_alpha > 0 and top_k > 1)."""
        return self.penalty_alpha > 0 and self.top_k > 1


@dataclass
class TextDecoding:
    """A text-only decoding ready to run: what a language model hands a decoder built outside it (an
    image-guided one, MAGIC). `step` returns (logits, hidden states); `room`: tokens left in the context."""

    step: StepFn
    prompt_tokens: torch.Tensor  # (B, T0) left-padded
    prompt_mask: torch.Tensor  # (B, T0) True on real prompt tokens
    eos_token_id: int
    pad_token_id: int
    tokenizer: object
    room: int


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, T_new) generated ids; after a stop token the row holds pad ids
    scores: torch.Tensor  # (B,) see the module docstring
    texts: list[str] = field(default_factory=list)  # decoded up to (not including) the first stop token
    lengths: torch.Tensor | None = None  # (B,) generated tokens including the stop token


# ---- logits processing (all vectorised over rows) ------------------------------------------
def _process_logits(logits: torch.Tensor, generated: torch.Tensor, step: int, config: GenerationConfig,
                    stop_ids: torch.Tensor) -> torch.Tensor:
    """Repetition penalty and the min-length rule on raw logits (N, V); generated (N, t)."""
    logits = logits.float()
    if config.repetition_penalty != 1.0 and generated.shape[1]:
        seen = logits.gather(1, generated)  # (N, t)
        # CTRL: shrink the logit of every token already generated, whatever its sign.
        seen = torch.where(seen < 0, seen * config.repetition_penalty, seen / config.repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if step < config.min_new_tokens:
        logits[:, stop_ids] = float("-inf")
    return logits


def _warp_for_sampling(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering, as HF orders them."""
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (keep at least one).
        drop = (probs.cumsum(dim=-1) - probs) >= config.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


# ---- the entry point --------------------------------------------------------------------------
@torch.no_grad()
def generate(
    step_fn: StepFn,
    prompt_tokens: torch.Tensor,
    config: GenerationConfig | None = None,
    *,
    eos_token_id: int,
    pad_token_id: int = 0,
    tokenizer=None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    guide: Guide | None = None,
    prompt_mask: torch.Tensor | None = None,
    **settings,
) -> GenerationOutput:
    """Decode up to `max_new_tokens` after `prompt_tokens` (B, T0) with the family's `step_fn`.

    Greedy when `num_beams == 1` and not `do_sample`; beam search when `num_beams > 1`;
    temperature/top-k/top-p sampling when `do_sample`. Generation of a row ends at
    `eos_token_id` or any of `stop_token_ids`. With a `tokenizer` the output carries texts.
    `on_token`, if given, is called after every step with the chosen tokens (B,) (pad ids for
    finished rows), e.g. to stream text (`TextStreamer`); greedy and sampling only.
    Contrastive search when `config.is_contrastive`: the step must return hidden states too (see
    the module docstring); `guide` adds a score per candidate, and `prompt_mask` (B, T0), True on
    real prompt tokens, keeps left pads out of the degeneration penalty.
    Keyword `settings` override fields of `config`.
    """
    config = GenerationConfig.from_kwargs(config, **settings)
    device = prompt_tokens.device
    stop_ids = torch.tensor(sorted({int(eos_token_id), *config.stop_token_ids}), device=device)
    if guide is not None and not config.is_contrastive:
        raise UserError("a decoding guide scores the candidates of contrastive search; set penalty_alpha > 0 and top_k > 1")
    if config.is_contrastive:
        tokens, scores, lengths = _contrastive_search(step_fn, prompt_tokens, config, stop_ids, pad_token_id, on_token,
                                                      guide, prompt_mask)
    elif config.num_beams > 1:
        if on_token is not None:
            raise UserError("streaming needs greedy decoding or sampling; beam search picks its tokens only at the end (drop num_beams)")
        tokens, scores, lengths = _beam_search(step_fn, prompt_tokens, config, stop_ids, pad_token_id)
    else:
        tokens, scores, lengths = _greedy_or_sample(step_fn, prompt_tokens, config, stop_ids, pad_token_id, on_token)
    texts = decode_texts(tokenizer, tokens.cpu(), lengths.cpu(), stop_ids.tolist()) if tokenizer is not None else []
    return GenerationOutput(tokens=tokens, scores=scores, texts=texts, lengths=lengths)


def _greedy_or_sample(step_fn: StepFn, prompt: torch.Tensor, config: GenerationConfig, stop_ids: torch.Tensor,
                      pad_id: int, on_token: Callable[[torch.Tensor], None] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, device = prompt.shape[0], prompt.device
    cache = KVCache() if config.use_cache else None
    rows = torch.arange(batch, device=device)
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed if config.seed is not None else int(torch.randint(2**62, (1,)).item()))
    sequence = prompt
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    for step in range(config.max_new_tokens):
        logits = _process_logits(_logits_of(step_fn(sequence, cache, rows)), generated, step, config, stop_ids)  # (B, V)
        log_probs = logits.log_softmax(dim=-1)
        if config.do_sample:
            probs = _warp_for_sampling(logits, config).softmax(dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        else:
            next_token = logits.argmax(dim=-1)  # (B,)
        chosen = log_probs.gather(1, next_token[:, None]).squeeze(1)
        scores = scores + torch.where(finished, 0.0, chosen)
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        is_stop = torch.isin(next_token, stop_ids) & ~finished
        lengths = torch.where(is_stop, step + 1, lengths)
        finished = finished | is_stop
        generated = torch.cat([generated, next_token[:, None]], dim=1)  # (B, t+1)
        sequence = torch.cat([sequence, next_token[:, None]], dim=1)
        if on_token is not None:
            on_token(next_token)
        if bool(finished.all()):
            break
    return generated, scores, lengths


def _beam_search(step_fn: StepFn, prompt: torch.Tensor, config: GenerationConfig, stop_ids: torch.Tensor,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF-style beam search: 2K candidates per sample, stop-token candidates ranked in the top K
    become finished hypotheses (length-normalised), the best K others continue."""
    batch, device = prompt.shape[0], prompt.device
    beams, max_new = config.num_beams, config.max_new_tokens
    cache = KVCache() if config.use_cache else None
    rows = torch.arange(batch, device=device)
    # The first step runs once per sample; its cache and rows are then copied to every beam.
    logits = _logits_of(step_fn(prompt, cache, rows))  # (B, V)
    vocab = logits.shape[-1]
    expand = rows.repeat_interleave(beams)  # (B*K,)
    if cache is not None:
        cache.reorder(expand)
    logits = logits.index_select(0, expand)
    rows, sequence = expand, prompt.index_select(0, expand)
    beam_scores = torch.full((batch, beams), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # identical beams at first: only one may expand
    history = torch.full((batch, beams, max_new), pad_id, dtype=torch.long, device=device)
    pool_scores = torch.full((batch, beams), float("-inf"), device=device)  # finished hypotheses
    pool_tokens = torch.full((batch, beams, max_new), pad_id, dtype=torch.long, device=device)
    pool_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    offsets = (torch.arange(batch, device=device) * beams)[:, None]  # (B, 1)
    for step in range(max_new):
        if step:
            logits = _logits_of(step_fn(sequence, cache, rows))  # (B*K, V)
        logits = _process_logits(logits, history.view(batch * beams, -1)[:, :step], step, config, stop_ids)
        candidates = beam_scores.view(-1, 1) + logits.log_softmax(dim=-1)  # (B*K, V)
        top_scores, top_index = candidates.view(batch, beams * vocab).topk(2 * beams, dim=-1)  # (B, 2K)
        source_beam, token = top_index // vocab, top_index % vocab  # (B, 2K)
        candidate_history = history.gather(1, source_beam[..., None].expand(-1, -1, max_new)).clone()  # (B, 2K, T)
        candidate_history[:, :, step] = token
        # Finished hypotheses: stop tokens among the top K candidates of samples still running.
        is_stop = torch.isin(token, stop_ids)
        rank = torch.arange(2 * beams, device=device)[None, :]
        add = is_stop & (rank < beams) & ~done[:, None] & torch.isfinite(top_scores)
        length = step + 1
        normalised = torch.where(add, top_scores / length**config.length_penalty, float("-inf"))
        merged_scores = torch.cat([pool_scores, normalised], dim=1)  # (B, 3K)
        merged_tokens = torch.cat([pool_tokens, candidate_history], dim=1)
        merged_lengths = torch.cat([pool_lengths, torch.full_like(token, length)], dim=1)
        pool_scores, keep = merged_scores.topk(beams, dim=1)
        pool_tokens = merged_tokens.gather(1, keep[..., None].expand(-1, -1, max_new))
        pool_lengths = merged_lengths.gather(1, keep)
        # Running beams: the best K candidates that are not stop tokens.
        running_scores = torch.where(is_stop, float("-inf"), top_scores)
        running_scores, pick = running_scores.topk(beams, dim=1)  # (B, K)
        beam_scores = running_scores
        history = candidate_history.gather(1, pick[..., None].expand(-1, -1, max_new))
        parent = (source_beam.gather(1, pick) + offsets).view(-1)  # (B*K,) row of each new beam's parent
        next_token = token.gather(1, pick).view(-1)
        sequence = torch.cat([sequence.index_select(0, parent), next_token[:, None]], dim=1)
        if cache is not None:
            cache.reorder(parent)
        # A sample is done when its pool is full (early stopping) or, HF's heuristic, when no
        # running beam can beat the worst finished hypothesis at the current length.
        pool_full = torch.isfinite(pool_scores).all(dim=1)
        if config.early_stopping:
            done = done | pool_full
        else:
            best_running = beam_scores[:, 0] / length**config.length_penalty
            done = done | (pool_full & (best_running <= pool_scores[:, -1]))
        if bool(done.all()):
            break
    # Samples still running at the length limit also offer their live beams as hypotheses.
    length = min(step + 1, max_new)
    live = torch.where(done[:, None], float("-inf"), beam_scores / length**config.length_penalty)
    merged_scores = torch.cat([pool_scores, live], dim=1)
    merged_tokens = torch.cat([pool_tokens, history], dim=1)
    merged_lengths = torch.cat([pool_lengths, torch.full_like(pool_lengths, length)], dim=1)
    best_score, best = merged_scores.max(dim=1)  # (B,)
    tokens = merged_tokens[torch.arange(batch, device=device), best]  # (B, T)
    lengths = merged_lengths[torch.arange(batch, device=device), best]
    width = int(lengths.max().item()) if batch else 0
    return tokens[:, :width], best_score, lengths


def degeneration_penalty(candidate_hidden: torch.Tensor, context_hidden: torch.Tensor,
                         context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Max cosine similarity of each candidate's hidden state (N, k, D) to the context's (N, t, D). (N, k)

    Positions where `context_mask` (N, t) is False (left pads) never count.
    """
    candidates = candidate_hidden / candidate_hidden.norm(dim=-1, keepdim=True)
    context = context_hidden / context_hidden.norm(dim=-1, keepdim=True)
    cosine = candidates @ context.transpose(1, 2)  # (N, k, t)
    if context_mask is not None:
        cosine = cosine.masked_fill(~context_mask[:, None, :], float("-inf"))
    return cosine.max(dim=-1).values


def contrastive_scores(probs: torch.Tensor, penalty: torch.Tensor, alpha: float) -> torch.Tensor:
    """SimCTG's score of the k candidates: (1 - alpha) * model confidence - alpha * degeneration penalty. (N, k)"""
    return (1.0 - alpha) * probs - alpha * penalty


def _contrastive_search(step_fn: StepFn, prompt: torch.Tensor, config: GenerationConfig, stop_ids: torch.Tensor,
                        pad_id: int, on_token: Callable[[torch.Tensor], None] | None, guide: Guide | None,
                        prompt_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrastive search (Su et al. 2022), as HF's `_contrastive_search` runs it.

    Each step feeds the k most likely next tokens of every row at once (N*k rows, the cache copied
    k times), keeps the candidate of the best score, and the cache, logits and hidden state that
    candidate's forward produced (they are the next step's inputs). Scores: the sum of the chosen
    tokens' log-probabilities, as for greedy decoding.
    """
    batch, device, k = prompt.shape[0], prompt.device, config.top_k
    cache = KVCache() if config.use_cache else None
    rows = torch.arange(batch, device=device)
    output = step_fn(prompt, cache, rows)
    if not isinstance(output, tuple):
        raise UserError("contrastive search needs the model's hidden states, and this model's decoding step gives only "
                        "logits; use greedy decoding, beam search or sampling")
    logits, context_hidden = output[0], output[1]  # (B, V), (B, T0, D)
    context_mask = prompt_mask.bool() if prompt_mask is not None else torch.ones(prompt.shape, dtype=torch.bool, device=device)
    expand = rows.repeat_interleave(k)  # (B*k,): each row's k candidates side by side
    chosen_rows = torch.arange(batch, device=device) * k  # offsets of each row's first candidate
    sequence = prompt
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    for step in range(config.max_new_tokens):
        logits = _process_logits(logits, generated, step, config, stop_ids)  # (B, V)
        log_probs = logits.log_softmax(dim=-1)
        top_log_probs, top_ids = log_probs.topk(min(k, logits.shape[-1]), dim=-1)  # (B, k)
        # Every candidate is run once: its hidden state judges it, its logits are the next step's.
        if cache is not None:
            cache.reorder(expand)
        candidates = torch.cat([sequence.index_select(0, expand), top_ids.reshape(-1, 1)], dim=1)  # (B*k, T+1)
        next_logits, next_hidden = step_fn(candidates, cache, expand)  # (B*k, V), (B*k, T', D)
        candidate_hidden = next_hidden[:, -1].view(batch, k, -1)  # (B, k, D)
        score = contrastive_scores(top_log_probs.exp(), degeneration_penalty(candidate_hidden, context_hidden, context_mask),
                                   config.penalty_alpha)  # (B, k)
        if guide is not None:
            so_far = torch.cat([generated.index_select(0, expand), top_ids.reshape(-1, 1)], dim=1)  # (B*k, t+1)
            score = score + guide(so_far.view(batch, k, -1), rows)
        best = score.argmax(dim=-1)  # (B,)
        selected = chosen_rows + best  # (B,) rows of the chosen candidates among the B*k
        if cache is not None:
            cache.reorder(selected)
        next_token = top_ids.gather(1, best[:, None]).squeeze(1)  # (B,)
        chosen = top_log_probs.gather(1, best[:, None]).squeeze(1)
        scores = scores + torch.where(finished, 0.0, chosen)
        context_hidden = torch.cat([context_hidden, candidate_hidden[rows, best][:, None]], dim=1)  # (B, t+1, D)
        context_mask = torch.cat([context_mask, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        logits = next_logits.index_select(0, selected)  # (B, V)
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        is_stop = torch.isin(next_token, stop_ids) & ~finished
        lengths = torch.where(is_stop, step + 1, lengths)
        finished = finished | is_stop
        generated = torch.cat([generated, next_token[:, None]], dim=1)  # (B, t+1)
        sequence = torch.cat([sequence, next_token[:, None]], dim=1)
        if on_token is not None:
            on_token(next_token)
        if bool(finished.all()):
            break
    return generated, scores, lengths


def decode_texts(tokenizer, tokens: torch.Tensor, lengths: torch.Tensor, stop_ids: Sequence[int]) -> list[str]:
    """Texts of generated rows, cut before the first stop token."""
    stops = set(int(t) for t in stop_ids)
    rows = []
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        row = row[:n]
        rows.append(row[:-1] if row and row[-1] in stops else row)
    # HF's clean_up_tokenization_spaces: word-level BPEs decode "circle ," for "circle,".
    return [_PUNCTUATION_SPACE.sub(r"\1", text) for text in tokenizer.batch_decode(rows)]


_PUNCTUATION_SPACE = re.compile(r" ([.,!?;:]|'s|n't|'m|'re|'ve)(?=\s|$)")


class TextStreamer:
    """An `on_token` callback for `generate` that calls `emit(piece)` with each new piece of row 0's text.

    The row is re-decoded after every token and only the text past what was already emitted goes
    out, so multi-token characters (byte-level BPE) and the decoder's spacing come out as in the
    final text: the pieces add up to `decode_texts`' text. Stops at the first stop token.
    """

    def __init__(self, tokenizer, stop_ids: Sequence[int], emit: Callable[[str], None]) -> None:
        self.tokenizer, self.stop_ids, self.emit = tokenizer, {int(t) for t in stop_ids}, emit
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def __call__(self, tokens: torch.Tensor) -> None:
        token = int(tokens[0])
        if self.done or token in self.stop_ids:
            self.done = True
            return
        self.ids.append(token)
        text = _PUNCTUATION_SPACE.sub(r"\1", self.tokenizer.decode(self.ids))
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other bytes
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent):], text
            self.emit(piece)

    def finish(self) -> None:
        """Emit what was held back (a character never completed): the pieces then add up to the text."""
        text = _PUNCTUATION_SPACE.sub(r"\1", self.tokenizer.decode(self.ids))
        if len(text) > len(self.sent):
            self.emit(text[len(self.sent):])
        self.sent = text


def left_padded_prompts(tokenizer, prompts: Sequence[str], bos_id: int, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder prompts `[bos] + prompt tokens` (no end token), left-padded to one length.

    Returns tokens (B, T0) and `num_pad` (B,): how many pad slots each row starts with, which a
    decoder uses to mask those keys and to start its positions at the first real token.
    """
    rows = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        rows.append([bos_id] + ids)
    width = max(len(row) for row in rows)
    tokens = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], dtype=torch.long, device=device)
    num_pad = torch.tensor([width - len(row) for row in rows], dtype=torch.long, device=device)
    return tokens, num_pad


@dataclass
class EmbeddedPrompts:
    """Prompts given as embeddings (image features among the text), left-padded to one length.

    Families that put images *into* a language model's input sequence (a visual prefix, image
    tokens scattered at placeholders, interleaved few-shot examples) build one of these and decode
    with `embedded_prompt_step`; the generated tokens then continue after it.
    """

    embeds: torch.Tensor  # (B, T0, D) left-padded input embeddings
    key_is_real: torch.Tensor  # (B, T0) bool: False on the left padding
    positions: torch.Tensor  # (B, T0) long: 0, 1, ... from each row's first real position

    @property
    def num_pad(self) -> torch.Tensor:
        return (~self.key_is_real).sum(dim=1)  # (B,)


def left_pad_embeddings(sequences: Sequence[torch.Tensor]) -> EmbeddedPrompts:
    """Rows of different lengths, (T_i, D) each, left-padded with zeros into `EmbeddedPrompts`."""
    width = max(row.shape[0] for row in sequences)
    first = sequences[0]
    embeds = first.new_zeros(len(sequences), width, first.shape[-1])  # (B, T0, D)
    key_is_real = torch.zeros(len(sequences), width, dtype=torch.bool, device=first.device)
    for index, row in enumerate(sequences):  # one copy per row, at prompt-building time only
        embeds[index, width - row.shape[0]:] = row
        key_is_real[index, width - row.shape[0]:] = True
    positions = (key_is_real.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T0)
    return EmbeddedPrompts(embeds, key_is_real, positions)


def embedded_prompt_step(lm, prompts: EmbeddedPrompts) -> tuple[StepFn, torch.Tensor]:
    """(step_fn, placeholder prompt tokens) decoding a `DecoderLM` after embedded prompts.

    `generate` appends new tokens after the placeholder prompt (pad ids, one per prompt position,
    never read: the first step feeds `prompts.embeds`). With a cache, the first step runs the
    whole prompt and later steps only the new token; without one every step re-runs the prompt
    embeddings plus the embedded new tokens (the reference the cache is tested against). Pads
    are hidden from every query, and positions count from each row's first real position.
    """
    from vlmkit.layers.masks import padding_mask

    batch, prompt_length, _ = prompts.embeds.shape
    placeholder = torch.zeros(batch, prompt_length, dtype=torch.long, device=prompts.embeds.device)

    def step(tokens: torch.Tensor, cache: KVCache | None, rows: torch.Tensor) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        total = tokens.shape[1]
        num_pad = prompts.num_pad.index_select(0, rows)  # (N,)
        new = torch.arange(max(start, prompt_length), total, device=tokens.device)  # generated positions to feed
        new_positions = new[None, :] - num_pad[:, None]  # (N, t)
        if start == 0:
            embeds = torch.cat([prompts.embeds.index_select(0, rows), lm.embed_tokens(tokens[:, prompt_length:])], dim=1)
            positions = torch.cat([prompts.positions.index_select(0, rows), new_positions], dim=1)  # (N, T)
        else:
            embeds, positions = lm.embed_tokens(tokens[:, start:]), new_positions
        key_is_real = torch.cat([prompts.key_is_real.index_select(0, rows),
                                 torch.ones(len(rows), total - prompt_length, dtype=torch.bool, device=tokens.device)], dim=1)
        hidden = lm(inputs_embeds=embeds, mask=padding_mask(key_is_real), cache=cache, position_ids=positions,
                    return_hidden=True)  # (N, T, D)
        return lm.logits(hidden[:, -1])  # (N, V): the head on the last position only (the prompt's others are never read)

    return step, placeholder


class Generative:
    """Mixin giving a family `generate(pixels, prompt=None, **decoding) -> list[str]`.

    The family implements `decoding_setup(pixels, prompts) -> (step_fn, prompt_tokens)` and sets
    `self.generation_config` (a GenerationConfig: its decoding defaults, saved with the model as
    generation_config.json); this class owns settings, batching and texts.
    """

    generation_config: GenerationConfig

    @property
    def text_config(self):
        """The config section of the text side (`text`, or `lm` for families on the language model)."""
        return getattr(self.config, getattr(self, "tower_configs", {}).get("text", "text"))

    def max_new_tokens_allowed(self, prompt_tokens: torch.Tensor) -> int:
        """How many tokens fit after the prompt (the decoder's context length bounds it)."""
        return self.text_config.context_length - prompt_tokens.shape[1]

    @torch.no_grad()
    def generate_output(self, pixels: torch.Tensor, prompt: str | Sequence[str] | None = None, **decoding) -> GenerationOutput:
        """Like `generate`, but returns the ids, scores and texts (a `GenerationOutput`)."""
        from vlmkit.errors import UserError

        if self.tokenizer is None:
            raise UserError("this model has no tokenizer attached; load it with vlmkit.load(run_folder)")
        batch = pixels.shape[0]
        prompts = None
        if prompt is not None:
            prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
            if len(prompts) != batch:
                raise UserError(f"got {len(prompts)} prompts for {batch} images; give one prompt, or one per image")
        was_training = self.training
        self.eval()
        try:
            config = GenerationConfig.from_kwargs(self.generation_config, **decoding)
            step_fn, prompt_tokens = self.decoding_setup(pixels.to(self.device), prompts)
            room = self.max_new_tokens_allowed(prompt_tokens)
            if room < 1:
                raise UserError(f"the prompt leaves no room to generate within the model's context of {self.text_config.context_length} tokens; shorten it")
            config = replace(config, max_new_tokens=min(config.max_new_tokens, room),
                             min_new_tokens=min(config.min_new_tokens, room))
            return generate(step_fn, prompt_tokens, config, eos_token_id=self.text_config.eos_token_id,
                            pad_token_id=self.text_config.pad_token_id, tokenizer=self.tokenizer)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate_from_embeddings(self, prompts: EmbeddedPrompts, stream: Callable[[str], None] | None = None,
                                 **decoding) -> GenerationOutput:
        """Decode the family's language model (its `text` tower, a `DecoderLM`) after prompts given as
        embeddings (image tokens among the text), with the KV cache unless `use_cache=False`.

        `stream`, for one prompt, is called with each new piece of text as it is generated.
        `decoding` takes GenerationConfig fields over `self.generation_config`; the length is capped
        to the room left in the LM's context.
        """
        from vlmkit.errors import UserError

        if self.tokenizer is None:
            raise UserError("this model has no tokenizer attached; load it with vlmkit.load(run_folder)")
        if stream is not None and prompts.embeds.shape[0] != 1:
            raise UserError(f"streaming decodes one prompt at a time, got {prompts.embeds.shape[0]}")
        was_training = self.training
        self.eval()
        try:
            step, placeholder = embedded_prompt_step(self.tower("text"), prompts)
            room = self.max_new_tokens_allowed(placeholder)
            if room < 1:
                raise UserError(f"the prompt of {placeholder.shape[1]} positions leaves no room within the LM's context of "
                                f"{self.text_config.context_length}; shorten it")
            config = GenerationConfig.from_kwargs(self.generation_config, **decoding)
            config = replace(config, max_new_tokens=min(config.max_new_tokens, room), min_new_tokens=min(config.min_new_tokens, room))
            eos = self.text_config.eos_token_id
            on_token = TextStreamer(self.tokenizer, {eos, *config.stop_token_ids}, stream) if stream is not None else None
            output = generate(step, placeholder, config, eos_token_id=eos, pad_token_id=self.text_config.pad_token_id,
                              tokenizer=self.tokenizer, on_token=on_token)
            if on_token is not None:
                on_token.finish()
            return output
        finally:
            self.train(was_training)

    def generate(self, pixels: torch.Tensor, prompt: str | Sequence[str] | None = None, **decoding) -> list[str]:
        """Texts generated for images `pixels` (B, 3, H, W), each continuing its `prompt` (if any).

        `decoding` takes any `GenerationConfig` field: num_beams, max_new_tokens, do_sample, top_p...
        """
        return self.generate_output(pixels, prompt=prompt, **decoding).texts
