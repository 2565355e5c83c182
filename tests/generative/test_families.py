"""The generative and question-answering families: masks, consistency of training and decoding, save/load.

The family lists come from the registry and the capabilities, so a new family is covered here for free.
"""
import pytest
import torch

from vlmkit.capabilities import Answers, Generates, Verifies, provides
from vlmkit.errors import MissingCapability, UserError
from vlmkit.layers.attention import KVCache
from vlmkit.models.registry import get_family, list_models, named_config


def _tiny_with(*capabilities):
    return [name for name in list_models(tiny=True)
            if any(provides(get_family(named_config(name)[0]), capability) for capability in capabilities)]


GENERATIVE = _tiny_with(Generates)
ANSWERING = _tiny_with(Generates, Answers, Verifies)


def test_simvlm_prefix_lm_mask_token_by_token(tokenizer, tiny_model):
    model = tiny_model("simvlm-tiny", tokenizer)
    num_image, suffix_length = 3, 4
    prefix_is_real = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    mask = model.attention_mask(num_image, prefix_is_real, suffix_length)  # (B, 1, L, L)
    prefix_end = num_image + prefix_is_real.shape[1]
    length = prefix_end + suffix_length
    assert mask.shape == (3, 1, length, length)
    for b in range(3):
        for i in range(length):
            for j in range(length):
                key_is_prefix_padding = num_image <= j < prefix_end and not prefix_is_real[b, j - num_image]
                in_prefix = j < prefix_end  # image + prompt: seen by everyone, in both directions
                expected = not key_is_prefix_padding and (in_prefix or j <= i)
                assert bool(mask[b, 0, i, j]) == expected, (b, i, j)
    # Spot checks of the definition: image sees the prompt, the prompt never sees the answer.
    assert bool(mask[1, 0, 0, prefix_end - 1]) and not bool(mask[1, 0, prefix_end - 1, prefix_end])


@pytest.mark.parametrize("name", GENERATIVE)
def test_decoding_steps_reproduce_the_training_forward_logits(name, tokenizer, tiny_model):
    """Teacher-forced logits of forward() equal those of the cached step function, token by token."""
    model = tiny_model(name, tokenizer)
    batch = model.dummy_batch(2, seed=1)
    if "tokens" not in batch:
        pytest.skip(f"{name} trains on templated conversations, not a caption batch; its own tests compare its "
                    f"cached decoding with forward (tests/families)")
    batch.pop("prefix_tokens", None)  # both paths without a prompt
    batch["tokens"] = tokenizer(["a red circle on the left", "a blue square"])
    with torch.no_grad():
        expected = model(batch).logits  # (B, L-1, V)
        step, prompt_tokens = model.decoding_setup(batch["pixels"], None)
        cache, rows = KVCache(), torch.arange(2)
        tokens = batch["tokens"]
        for t in range(5):
            # Decoding continues after the prompt: [bos] for token prompts, image + [bos] slots for
            # families that feed the prompt as embeddings (the slots' ids are never read).
            logits = step(torch.cat([prompt_tokens, tokens[:, 1 : t + 1]], dim=1), cache, rows)
            assert torch.allclose(logits, expected[:, t], atol=1e-4), t
    if prompt_tokens.shape[1] == 1:
        assert torch.equal(prompt_tokens[:, 0], tokens[:, 0])


@pytest.mark.parametrize("name", ANSWERING)
def test_save_load_round_trip_keeps_outputs(name, tokenizer, tmp_path, tiny_model):
    model = tiny_model(name, tokenizer)
    model.save_pretrained(tmp_path)
    loaded = get_family(model.family).from_pretrained(tmp_path)
    pixels = model.dummy_batch(2)["pixels"]
    if provides(model, Generates):
        assert model.generate_output(pixels, max_new_tokens=5).tokens.tolist() == loaded.generate_output(pixels, max_new_tokens=5).tokens.tolist()
    if provides(model, Answers):
        questions = ["how many objects are there?", "what color is the star?"]
        assert model.answer(pixels, questions) == loaded.answer(pixels, questions)
    if provides(model, Verifies):
        assert torch.equal(model.verify(pixels, ["there is a red star"] * 2), loaded.verify(pixels, ["there is a red star"] * 2))


def test_capabilities_are_checked_by_tasks(tokenizer, tiny_model):
    from vlmkit.tasks.generative import evaluate_reasoning

    model = tiny_model("virtex-tiny", tokenizer)
    with pytest.raises(MissingCapability, match="'virtex' model family cannot 'verify statements'"):
        evaluate_reasoning(model, [{"image": "x.png", "statements": [{"text": "t", "label": True}]}])


def test_prompt_count_mismatch_is_a_user_error(tokenizer, tiny_model):
    model = tiny_model("virtex-tiny", tokenizer)
    with pytest.raises(UserError, match="2 prompts for 3 images"):
        model.generate(model.dummy_batch(3)["pixels"], prompt=["a", "b"])
