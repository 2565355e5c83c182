"""Contrastive search (SimCTG) in the shared decoder, and MAGIC: a text-only LM guided by a CLIP, no training.

HF transformers 5 no longer ships contrastive search (`generate(penalty_alpha=...)` loads it from the
Hub repo transformers-community/contrastive-search, which needs the network), so the reference here
is a direct re-implementation of its algorithm: one full forward per candidate, no cache, no batching.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from vlmkit.cli import main
from vlmkit.errors import UserError
from vlmkit.generation import GenerationConfig, decode_texts, degeneration_penalty, generate
from vlmkit.tasks.guided import GuidedCaptioner, magic_scores


@pytest.fixture(scope="module")
def lm(tokenizer):
    from vlmkit.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("gpt2-tiny", **{"lm.vocab_size": tokenizer.vocab_size, "lm.bos_token_id": tokenizer.bos_id,
                                         "lm.eos_token_id": tokenizer.eos_id, "lm.pad_token_id": tokenizer.pad_id})
    model.tokenizer = tokenizer
    return model.eval()


def reference_contrastive_search(lm, prompt: list[int], k: int, alpha: float, steps: int, eos: int,
                                 guide=None) -> list[int]:
    """Contrastive search as Su et al. (and HF's `_contrastive_search`) define it, for one unpadded prompt."""
    sequence, generated = list(prompt), []
    for _ in range(steps):
        hidden = lm.lm(torch.tensor([sequence]), return_hidden=True)[0]  # (T, D)
        probs = lm.lm.logits(hidden[-1]).softmax(dim=-1)
        top_probs, top_ids = probs.topk(k)
        scores = []
        for prob, token in zip(top_probs.tolist(), top_ids.tolist()):
            candidate = lm.lm(torch.tensor([sequence + [token]]), return_hidden=True)[0]  # (T+1, D)
            penalty = F.cosine_similarity(candidate[-1][None], candidate[:-1], dim=-1).max()
            scores.append((1 - alpha) * prob - alpha * float(penalty))
        if guide is not None:
            scores = [s + g for s, g in zip(scores, guide(generated, top_ids.tolist()))]
        token = top_ids[int(torch.tensor(scores).argmax())].item()
        sequence.append(token)
        generated.append(token)
        if token == eos:
            break
    return generated


def _texts(tokenizer, rows: list[list[int]]) -> list[str]:
    """Texts of token rows as `generate` writes them (cut at the end token, punctuation spacing cleaned)."""
    width = max(len(row) for row in rows)
    tokens = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    return decode_texts(tokenizer, tokens, torch.tensor([len(row) for row in rows]), [tokenizer.eos_id])


@torch.no_grad()
def test_contrastive_search_equals_the_direct_definition_with_and_without_cache(lm, tokenizer):
    prompts = ["a red circle", "how many"]
    rows = [[tokenizer.bos_id] + tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    expected = [reference_contrastive_search(lm, row, k=4, alpha=0.6, steps=8, eos=tokenizer.eos_id) for row in rows]
    tokens, num_pad = lm.prompt_tokens(prompts)
    assert bool(num_pad.any())  # left padding is exercised: pads stay out of the penalty
    mask = torch.arange(tokens.shape[1])[None] >= num_pad[:, None]
    for use_cache in (True, False):
        out = generate(lm.decoding_step(num_pad, with_hidden=True), tokens, GenerationConfig(max_new_tokens=8),
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, prompt_mask=mask,
                       penalty_alpha=0.6, top_k=4, use_cache=use_cache)
        got = [row[:n] for row, n in zip(out.tokens.tolist(), out.lengths.tolist())]
        assert got == expected, use_cache
    # The LM's own API decodes the same way (penalty_alpha / top_k are GenerationConfig fields).
    assert lm.generate_text(prompts, penalty_alpha=0.6, top_k=4, max_new_tokens=8) == _texts(tokenizer, expected)
    # alpha = 0 with top_k is not contrastive (HF's rule); alpha -> the penalty changes the choice somewhere.
    assert expected != [reference_contrastive_search(lm, row, k=4, alpha=0.0, steps=8, eos=tokenizer.eos_id) for row in rows]


@torch.no_grad()
def test_existing_decodings_ignore_hidden_states_bit_for_bit(lm, tokenizer):
    tokens, num_pad = lm.prompt_tokens(["a blue", "there are two"])
    for settings in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 3, "top_k": 5}):
        plain = generate(lm.decoding_step(num_pad), tokens, eos_token_id=tokenizer.eos_id, max_new_tokens=6, **settings)
        paired = generate(lm.decoding_step(num_pad, with_hidden=True), tokens, eos_token_id=tokenizer.eos_id,
                          max_new_tokens=6, **settings)
        assert torch.equal(plain.tokens, paired.tokens) and torch.equal(plain.scores, paired.scores), settings
    with pytest.raises(UserError, match="hidden states"):  # a logits-only step cannot do contrastive search
        generate(lm.decoding_step(num_pad), tokens, eos_token_id=tokenizer.eos_id, penalty_alpha=0.5, top_k=3)
    for bad in ({"penalty_alpha": 0.5, "top_k": 1}, {"penalty_alpha": 0.5, "top_k": 3, "num_beams": 2}, {"penalty_alpha": 1.5}):
        with pytest.raises(UserError, match="generation setting invalid"):
            GenerationConfig.from_kwargs(**bad)


def test_magic_score_on_a_hand_case():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    penalty = torch.tensor([[0.9, 0.1, 0.2]])
    similarity = torch.tensor([[0.1, 0.1, 0.3]])
    clip = torch.softmax(torch.tensor([10.0, 10.0, 30.0]), dim=0)  # scale 100 * cos, softmaxed over the 3
    expected = 0.9 * probs - 0.1 * penalty + 2.0 * clip
    assert torch.allclose(magic_scores(probs, penalty, similarity, alpha=0.1, beta=2.0, scale=100.0), expected)
    # Confidence alone picks candidate 0, the penalty moves it to 1, the image term to 2.
    assert int(probs.argmax()) == 0
    assert int((0.9 * probs - 0.5 * penalty).argmax()) == 1
    assert int(expected.argmax()) == 2
    assert torch.allclose(degeneration_penalty(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[3.0, 0.0], [1.0, 1.0]]]),
                                               torch.tensor([[False, True]])), torch.tensor([[2 ** -0.5, 2 ** -0.5]]))


@pytest.fixture
def guide(tokenizer, tiny_model):
    return tiny_model("clip-tiny", tokenizer)


@torch.no_grad()
def test_magic_decoding_adds_the_guides_softmaxed_similarity(lm, guide, tokenizer):
    pixels = torch.randn(2, 3, guide.config.vision.image_size, guide.config.vision.image_size, generator=torch.Generator().manual_seed(1))
    k, alpha, beta, steps = 4, 0.1, 2.0, 5
    magic = GuidedCaptioner(lm, guide, k=k, alpha=alpha, beta=beta, max_new_tokens=steps)
    images = F.normalize(guide.encode_image(pixels), dim=-1)
    scale = float(guide.logit_scale.exp())

    def reference_guide(image):
        def score(generated, candidates):
            texts = [tokenizer.decode(generated + [c]) for c in candidates]
            text = F.normalize(guide.encode_text(guide.tokenize(texts)), dim=-1)
            return (beta * (scale * text @ image).softmax(dim=0)).tolist()
        return score

    expected = []
    for image in images:
        row = reference_contrastive_search(lm, [tokenizer.bos_id], k, alpha, steps, tokenizer.eos_id, reference_guide(image))
        expected.append(row)
    assert magic.generate(pixels) == _texts(tokenizer, expected)
    plain = GuidedCaptioner(lm, None, k=k, alpha=alpha, beta=0.0, max_new_tokens=steps)
    assert plain.generate(pixels) == [plain.generate(pixels[:1])[0]] * 2  # no guide: the image plays no part


def test_magic_from_the_command_line_and_a_guide_that_cannot_embed_images(lm, guide, tmp_path, capsys):
    from PIL import Image

    lm_dir, guide_dir = tmp_path / "lm", tmp_path / "clip"
    lm.save_pretrained(lm_dir)
    guide.save_pretrained(guide_dir)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    argv = ["caption", str(image), "--model", str(lm_dir), "--max-new-tokens", "4"]
    assert main([*argv, "--guide", str(guide_dir), "--decoding", "magic", "--k", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["captions"][0]["image"] == str(image) and isinstance(result["captions"][0]["caption"], str)
    # The LM as its own guide: it embeds no images. One line, exit 2.
    assert main([*argv, "--guide", str(lm_dir), "--decoding", "magic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "embed images" in err and "--guide" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main([*argv, "--decoding", "magic"]) == 2 and "--guide" in capsys.readouterr().err
    assert main([*argv, "--guide", str(guide_dir)]) == 2 and "--decoding" in capsys.readouterr().err
    # A captioner's own decoding step gives no hidden states: guided decoding needs an LM that continues text.
    assert main(["caption", str(image), "--model", str(guide_dir), "--decoding", "contrastive"]) == 2
    assert "continue text" in capsys.readouterr().err
