"""The shared decoder and decoding: cache equality, beam/greedy agreement, sampling, length rules."""
import pytest
import torch

from vlmkit.encoders.lm import DecoderLM
from vlmkit.errors import UserError
from vlmkit.generation import GenerationConfig, generate
from vlmkit.layers.attention import KVCache

from vlmkit.capabilities import Generates, provides
from vlmkit.models.registry import get_family, list_models, named_config

GENERATIVE = [name for name in list_models(tiny=True) if provides(get_family(named_config(name)[0]), Generates)]


def test_decoder_logits_with_cache_equal_logits_without():
    torch.manual_seed(0)
    lm = DecoderLM(50, 16, 32, 2, 4, context_dim=24, cross_attention_every=2).eval()
    tokens, context = torch.randint(0, 50, (3, 9)), torch.randn(3, 5, 24)
    full = lm(tokens, context=context)  # (3, 9, V)
    cache = KVCache()
    steps = [lm(tokens[:, :4], context=context, cache=cache)] + [lm(tokens[:, t : t + 1], context=context, cache=cache) for t in range(4, 9)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.length == 9


def test_decoder_left_padding_matches_the_unpadded_row():
    from vlmkit.layers.masks import padding_mask

    torch.manual_seed(0)
    lm = DecoderLM(50, 16, 32, 2, 4).eval()
    row = torch.randint(1, 50, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    real = torch.arange(8)[None] >= 3
    logits = lm(padded, mask=padding_mask(real), position_offset=torch.tensor([-3]))
    assert torch.allclose(logits[:, 3:], lm(row), atol=1e-5)


def test_decoder_gradient_checkpointing_gives_the_same_gradients():
    # The stack's one checkpointing loop must carry masks and cross-attention context through.
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        lm = DecoderLM(50, 16, 32, 3, 4, context_dim=24, cross_attention_every=2, tie_embeddings=False)
        lm.transformer.gradient_checkpointing = checkpointing
        tokens, context = torch.randint(0, 50, (3, 9)), torch.randn(3, 5, 24)
        mask = torch.arange(9)[None, None, None, :] >= torch.tensor([0, 2, 3])[:, None, None, None]  # left padding
        lm(tokens, context=context, mask=mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def _image(model, batch=3, seed=0):
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", GENERATIVE)
@pytest.mark.parametrize("beams", [1, 3])
def test_cached_and_uncached_decoding_give_identical_tokens(name, beams, tokenizer, tiny_model):
    model = tiny_model(name, tokenizer)
    pixels = _image(model)
    cached = model.generate_output(pixels, num_beams=beams, max_new_tokens=8, use_cache=True)
    uncached = model.generate_output(pixels, num_beams=beams, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.allclose(cached.scores, uncached.scores, atol=1e-4)


@pytest.mark.parametrize("name", GENERATIVE)
def test_cached_decoding_with_prompts_of_different_lengths(name, tokenizer, tiny_model):
    model = tiny_model(name, tokenizer)
    prompts = ["a", "how many objects are there?", "a red"]
    pixels = _image(model)
    cached = model.generate_output(pixels, prompt=prompts, max_new_tokens=6, use_cache=True)
    uncached = model.generate_output(pixels, prompt=prompts, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    # Each row alone gives what it gives in the batch: padding never leaks into a row.
    for row, prompt in enumerate(prompts):
        alone = model.generate_output(pixels[row : row + 1], prompt=[prompt], max_new_tokens=6)
        assert torch.equal(alone.tokens[0], cached.tokens[row, : alone.tokens.shape[1]])


@pytest.mark.parametrize("name", GENERATIVE)
def test_beam_search_with_one_beam_is_greedy(name, tokenizer, tiny_model):
    model = tiny_model(name, tokenizer)
    pixels = _image(model)
    greedy = model.generate_output(pixels, max_new_tokens=8)
    beam = model.generate_output(pixels, num_beams=1, max_new_tokens=8)
    forced_beam_path = model.generate_output(pixels, num_beams=2, max_new_tokens=1)
    assert torch.equal(greedy.tokens, beam.tokens)
    assert torch.equal(forced_beam_path.tokens[:, 0], greedy.tokens[:, 0])  # the best first token is the argmax


def _toy_step(vocab=6, eos=5, seed=0):
    """A fixed random 'bigram model': logits depend on the last token only."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3

    def step(tokens, cache, rows):
        return table[tokens[:, -1]]

    return step


def test_beam_search_finds_a_better_sequence_than_greedy():
    step = _toy_step(seed=1)
    start = torch.zeros(16, 1, dtype=torch.long)
    start[:, 0] = torch.arange(16) % 5
    greedy = generate(step, start, max_new_tokens=6, eos_token_id=5, length_penalty=0.0)
    beam = generate(step, start, max_new_tokens=6, eos_token_id=5, num_beams=4, length_penalty=0.0)
    assert bool((beam.scores >= greedy.scores - 1e-5).all())


def test_seeded_sampling_is_reproducible_and_seeds_differ(tokenizer, tiny_model):
    model = tiny_model("virtex-tiny", tokenizer)
    pixels = _image(model, batch=4)
    first = model.generate_output(pixels, do_sample=True, seed=7, top_p=0.9, temperature=1.5, max_new_tokens=8)
    second = model.generate_output(pixels, do_sample=True, seed=7, top_p=0.9, temperature=1.5, max_new_tokens=8)
    other = model.generate_output(pixels, do_sample=True, seed=8, top_p=0.9, temperature=1.5, max_new_tokens=8)
    assert torch.equal(first.tokens, second.tokens)
    assert not torch.equal(first.tokens, other.tokens)


def test_top_k_one_sampling_is_greedy():
    step = _toy_step(seed=2)
    start = torch.arange(5)[:, None]
    greedy = generate(step, start, max_new_tokens=5, eos_token_id=5)
    sampled = generate(step, start, max_new_tokens=5, eos_token_id=5, do_sample=True, top_k=1, seed=0)
    assert torch.equal(greedy.tokens, sampled.tokens)


def test_min_max_and_stop_tokens():
    step = _toy_step(seed=3)
    start = torch.arange(5)[:, None]
    out = generate(step, start, max_new_tokens=4, eos_token_id=5)
    assert out.tokens.shape[1] <= 4 and bool((out.lengths <= 4).all())
    longer = generate(step, start, max_new_tokens=7, min_new_tokens=7, eos_token_id=5)
    assert longer.tokens.shape[1] == 7 and not bool((longer.tokens == 5).any())
    # Make token 2 a stop token: no row continues after it.
    stopped = generate(step, start, max_new_tokens=7, eos_token_id=5, stop_token_ids=[2])
    for row, length in zip(stopped.tokens.tolist(), stopped.lengths.tolist()):
        body = row[:length]
        assert all(t not in (2, 5) for t in body[:-1])
        assert all(t == 0 for t in row[length:])  # padding after the stop


def test_length_penalty_changes_which_finished_beam_wins():
    # From token 0: stop now (log 0.4 = -0.92) or go 1 -> 2 -> stop (log 0.6 + log 0.5 = -1.20 over 3 tokens).
    probs = torch.full((4, 4), 1e-6)
    probs[0, 3], probs[0, 1] = 0.4, 0.6
    probs[1, 2], probs[1, 0] = 0.5, 0.5
    probs[2, 3] = 1.0
    table = probs.log()

    def step(tokens, cache, rows):
        return table[tokens[:, -1]]

    start = torch.zeros(1, 1, dtype=torch.long)
    short = generate(step, start, max_new_tokens=5, eos_token_id=3, num_beams=2, length_penalty=0.0, early_stopping=False)
    long = generate(step, start, max_new_tokens=5, eos_token_id=3, num_beams=2, length_penalty=1.0, early_stopping=False)
    assert short.tokens[0, : short.lengths[0]].tolist() == [3]  # -0.92 > -1.20
    assert long.tokens[0, : long.lengths[0]].tolist() == [1, 2, 3]  # -1.20 / 3 > -0.92 / 1


def test_repetition_penalty_discourages_repeats():
    table = torch.zeros(4, 4)
    table[:, 1], table[:, 2] = 1.0, 0.5  # prefers token 1, then 2
    step = lambda tokens, cache, rows: table[tokens[:, -1]]  # noqa: E731
    start = torch.zeros(1, 1, dtype=torch.long)
    plain = generate(step, start, max_new_tokens=3, eos_token_id=3)
    penalised = generate(step, start, max_new_tokens=3, eos_token_id=3, repetition_penalty=10.0)
    assert plain.tokens[0].tolist() == [1, 1, 1]
    assert penalised.tokens[0, 1].item() != 1


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown generation setting"):
        GenerationConfig.from_kwargs(beams=3)
    with pytest.raises(UserError, match="top_p"):
        GenerationConfig.from_kwargs(top_p=0.0)


def test_sampling_follows_the_warped_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    step = lambda tokens, cache, rows: probs.log().expand(tokens.shape[0], 4)  # noqa: E731
    start = torch.zeros(20000, 1, dtype=torch.long)

    def frequencies(**settings):
        out = generate(step, start, max_new_tokens=1, eos_token_id=3, do_sample=True, seed=0, **settings)
        return torch.bincount(out.tokens[:, 0], minlength=4) / len(start)

    assert torch.allclose(frequencies(), probs, atol=0.015)
    assert torch.allclose(frequencies(top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]), atol=0.015)  # 0.5 + 0.3 kept
    sharpened = probs[:2] ** 2 / (probs[:2] ** 2).sum()  # temperature 0.5 on the top 2
    assert torch.allclose(frequencies(top_k=2, temperature=0.5), torch.cat([sharpened, torch.zeros(2)]), atol=0.015)
