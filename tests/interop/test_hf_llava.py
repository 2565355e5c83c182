"""HF LlavaForConditionalGeneration folders load into the `llava` family exactly, and export back.

Random tiny HF models (CLIP vision 32 px / patch 8 / width 32 / 2 layers; Llama width 64 / 2 layers /
4 heads / 2 kv heads / an untied head; vocabulary ~100 with `<image>`), perturbed so no swapped
weight can hide, saved with save_pretrained next to a tokenizer.json and a CLIP preprocessor.

The two sides are fed what each expects: HF's processor writes `<image>` as K copies into the ids,
so the HF model gets ids already expanded; vlmkit tokenizes one placeholder per image and expands
it itself (the collate for training batches, `_prompt_embeds` / `chat` at inference).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.errors import UserError
from vlmkit.generation import left_pad_embeddings
from vlmkit.io import load_safetensors, save_safetensors
from vlmkit.layers.masks import padding_mask
from vlmkit.models.llava import expand_image_placeholders

from interop_helpers import CAPTIONS, randomise_, transformers

VARIANTS = [("default", -2), ("default", -1), ("full", -2), ("full", -1)]
K = {"default": 16, "full": 17}  # (32 / 8)^2 patches (+ CLS for "full")
BOS, EOS = 1, 2


def _tokenizer(folder: Path) -> tuple[int, int]:
    """A SentencePiece-style BPE like Llama's (<unk> <s> </s>), `<image>` added last as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    texts = CAPTIONS + ["A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:"]
    tokenizer.train_from_iterator(texts * 3, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"],
                                                                 show_progress=False))
    tokenizer.add_special_tokens(["<image>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "model_max_length": 256}))
    return tokenizer.get_vocab_size(), tokenizer.token_to_id("<image>")


def _hf_config(vocab: int, image_id: int, strategy: str, layer, **overrides):
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    text = dict(model_type="llama", vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500.0,
                bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                    image_seq_length=K[strategy], vision_feature_select_strategy=strategy,
                                    vision_feature_layer=layer, **overrides)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{(strategy, layer): (folder, HF model in eval mode)}, built once."""
    out = {}
    for strategy, layer in VARIANTS:
        folder = tmp_path_factory.mktemp(f"llava_{strategy}{layer}")
        vocab, image_id = _tokenizer(folder)
        torch.manual_seed(0)
        hf = transformers.LlavaForConditionalGeneration(_hf_config(vocab, image_id, strategy, layer)).eval()
        randomise_(hf, seed=1)
        hf.save_pretrained(folder)
        transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
        out[(strategy, layer)] = (folder, hf)
    return out


def _rows(model, lengths=(6, 3), seed=0) -> list[torch.Tensor]:
    """Prompt rows as vlmkit tokenizes them: bos, one <image> placeholder, then random text ids."""
    generator = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    return [torch.tensor([BOS, image_id, *torch.randint(3, image_id, (n,), generator=generator).tolist()]) for n in lengths]


def _expanded(row: torch.Tensor, image_id: int, k: int) -> torch.Tensor:
    """What HF's processor gives for a row: the placeholder written as K copies."""
    return row.repeat_interleave(torch.where(row == image_id, k, 1))


def _hf_batch(rows, image_id, k, pad_id, left: bool):
    """HF's input: expanded ids padded to one length, the attention mask, and positions from the first real token."""
    expanded = [_expanded(row, image_id, k) for row in rows]
    width = max(len(row) for row in expanded)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, row in enumerate(expanded):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[index, where], real[index, where] = row, True
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    return ids, real, positions


@pytest.mark.parametrize("strategy,layer", VARIANTS)
def test_logits_match_transformers_in_padded_batches(strategy, layer, folders):
    folder, hf = folders[(strategy, layer)]
    model = vlmkit.load(folder)
    config = model.config
    assert model.family == "llava" and (config.vision_feature_select_strategy, config.vision_feature_layer) == (strategy, layer)
    assert config.num_image_tokens == K[strategy] and config.projector == "mlp2x_gelu" and not config.lm.tie_embeddings
    image_id, k, pad = config.image_token_id, config.num_image_tokens, config.lm.pad_token_id
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    rows = _rows(model)

    # Right padding, as in training: vlmkit's collate expands the one placeholder of each row.
    width = max(len(row) for row in rows)
    batch = {"input_ids": torch.full((2, width), pad, dtype=torch.long), "labels": torch.full((2, width), -100, dtype=torch.long),
             "attention_mask": torch.zeros(2, width, dtype=torch.bool), "pixels": pixels}
    for index, row in enumerate(rows):
        batch["input_ids"][index, : len(row)], batch["attention_mask"][index, : len(row)] = row, True
        batch["labels"][index, : len(row)] = row
    batch = expand_image_placeholders(batch, image_id, k, pad)
    ids, real, _ = _hf_batch(rows, image_id, k, pad, left=False)
    assert torch.equal(batch["input_ids"], ids)
    with torch.no_grad():
        ours = model(batch).logits  # (B, L-1, V): every position but the last
        theirs = hf(input_ids=ids, attention_mask=real.long(), pixel_values=pixels).logits
    assert (ours - theirs[:, :-1])[real[:, :-1]].abs().max() < 1e-5

    # Left padding, as in decoding: the prompts vlmkit embeds itself, pads masked, positions per row.
    with torch.no_grad():
        prompts = left_pad_embeddings([model.embed_with_images(_expanded(row, image_id, k)[None], image[None])[0]
                                       for row, image in zip(rows, pixels)])
        ours = model.lm(inputs_embeds=prompts.embeds, mask=padding_mask(prompts.key_is_real), position_ids=prompts.positions)
        ids, real, positions = _hf_batch(rows, image_id, k, pad, left=True)
        theirs = hf(input_ids=ids, attention_mask=real.long(), position_ids=positions, pixel_values=pixels).logits
    assert torch.equal(prompts.key_is_real, real) and torch.equal(prompts.positions[real], positions[real])
    assert (ours - theirs)[real].abs().max() < 1e-5


def _agree_until_eos(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    for mine, reference in zip(ours.tolist(), theirs.tolist()):
        cut = reference.index(EOS) + 1 if EOS in reference else len(reference)
        assert mine[:cut] == reference[:cut]


@pytest.mark.parametrize("strategy,layer", VARIANTS)
def test_greedy_generation_matches_transformers_generate(strategy, layer, folders):
    folder, hf = folders[(strategy, layer)]
    model = vlmkit.load(folder)
    image_id, k, pad = model.config.image_token_id, model.config.num_image_tokens, model.config.lm.pad_token_id
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    rows = _rows(model, lengths=(7, 2), seed=1)
    with torch.no_grad():
        prompts = left_pad_embeddings([model.embed_with_images(_expanded(row, image_id, k)[None], image[None])[0]
                                       for row, image in zip(rows, pixels)])
    cached = model.generate_from_embeddings(prompts, max_new_tokens=8).tokens
    uncached = model.generate_from_embeddings(prompts, max_new_tokens=8, use_cache=False).tokens
    assert torch.equal(cached, uncached)
    ids, real, _ = _hf_batch(rows, image_id, k, pad, left=True)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=real.long(), pixel_values=pixels, max_new_tokens=8,
                             do_sample=False, pad_token_id=pad)[:, ids.shape[1]:]
    _agree_until_eos(cached, theirs)


def test_chat_on_the_loaded_folder_gives_transformers_greedy_reply(folders):
    from vlmkit.data.conversation import encode_prompt

    folder, hf = folders[("default", -2)]
    model = vlmkit.load(folder)
    assert model.tokenizer is not None and model.transform is not None
    messages = [{"role": "user", "content": "what is the red circle above"}]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reply = model.chat(pixels, messages, max_new_tokens=6)
    assert isinstance(reply, str)
    ids = encode_prompt(messages, model.config.template, model.tokenizer, has_image=True)  # (T,): one placeholder
    expanded = _expanded(ids, model.config.image_token_id, model.config.num_image_tokens)[None]
    with torch.no_grad():
        theirs = hf.generate(input_ids=expanded, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                             pad_token_id=model.config.lm.pad_token_id)[0, expanded.shape[1]:].tolist()
    theirs = theirs[: theirs.index(EOS)] if EOS in theirs else theirs
    assert reply == model.tokenizer.decode(theirs).strip() or reply == model.tokenizer.decode(theirs)


@pytest.mark.parametrize("strategy,layer", [("default", -2), ("full", -1)])
def test_export_round_trip_loads_in_transformers_with_equal_logits(strategy, layer, folders, tmp_path):
    folder, hf = folders[(strategy, layer)]
    model = vlmkit.load(folder)
    model.save_pretrained(tmp_path, format="hf")
    written = load_safetensors(tmp_path / "model.safetensors")
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in written  # the hub layout
    assert "language_model.lm_head.weight" in written and "multi_modal_projector.linear_2.bias" in written
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (back.config.vision_feature_select_strategy, back.config.vision_feature_layer) == (strategy, layer)
    assert back.config.image_seq_length == K[strategy] and back.config.image_token_id == model.config.image_token_id
    rows = _rows(model, seed=2)
    ids, real, _ = _hf_batch(rows, model.config.image_token_id, K[strategy], model.config.lm.pad_token_id, left=False)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=real.long(), pixel_values=pixels).logits
                - hf(input_ids=ids, attention_mask=real.long(), pixel_values=pixels).logits)[real].abs().max() < 1e-5
    again = vlmkit.load(tmp_path)  # and our own loader reads the exported folder back
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
    assert again.tokenizer.encode("a red circle <image>") == model.tokenizer.encode("a red circle <image>")


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def test_every_key_layout_loads_the_same_tensors(folders, tmp_path):
    """The hub layout (vision_tower.vision_model.*) and transformers 5's in-memory names load like its save_pretrained files."""
    folder, hf = folders[("default", -2)]
    reference = vlmkit.load(folder).state_dict()
    saved = dict(load_safetensors(folder / "model.safetensors"))
    assert "vision_tower.embeddings.patch_embedding.weight" in saved  # what transformers 5 writes
    layouts = {
        "hub": {key.replace("vision_tower.", "vision_tower.vision_model.", 1): value for key, value in saved.items()},
        "in_memory": {key: value.contiguous() for key, value in hf.state_dict().items()},
    }
    layouts["hub"]["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # an old buffer
    for name, state in layouts.items():
        target = _copy(folder, tmp_path / name)
        save_safetensors(state, target / "model.safetensors")
        loaded = vlmkit.load(target).state_dict()
        for key, tensor in reference.items():
            assert torch.equal(tensor, loaded[key]), (name, key)


def test_missing_keys_and_placeholder_mismatch_are_clear_errors(folders, tmp_path):
    folder, _ = folders[("default", -2)]
    model = vlmkit.load(folder)
    k, image_id = model.config.num_image_tokens, model.config.image_token_id
    ids = torch.tensor([[BOS, *[image_id] * (k - 1), 7]])  # one image token short of what HF's processor writes
    with pytest.raises(UserError, match=f"the batch has {k - 1} image placeholders but 1 images x {k} tokens"):
        model.embed_with_images(ids, torch.randn(1, 3, 32, 32))
    broken = _copy(folder, tmp_path / "missing")
    state = dict(load_safetensors(broken / "model.safetensors"))
    del state["multi_modal_projector.linear_2.weight"]
    save_safetensors(state, broken / "model.safetensors")
    with pytest.raises(UserError, match=r"multi_modal_projector\.linear_2\.weight"):
        vlmkit.load(broken)
    deeper = _copy(folder, tmp_path / "deeper")  # config.json says 3 vision layers, the weights hold 2
    config = json.loads((deeper / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    (deeper / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"vision_tower\.encoder\.layers\.2\."):
        vlmkit.load(deeper)


@pytest.mark.parametrize("change,message", [
    ({"vision_feature_layer": [-2, -1]}, "concatenates several layers"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu' is not supported"),
    ({"text_config": {"model_type": "mistral"}}, "'mistral' model; vlmkit's LLaVA loads Llama language models only"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "'siglip_vision_model' tower; vlmkit's LLaVA loads CLIP"),
    ({"image_token_index": 5}, "tokenizer has <image> at id"),
])
def test_unsupported_settings_are_one_clear_error(change, message, folders, tmp_path):
    folder = _copy(folders[("default", -2)][0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message) as error:
        vlmkit.load(folder)
    assert "\n" not in str(error.value)


def test_models_hf_llava_cannot_hold_refuse_to_export(folders, tmp_path):
    model = vlmkit.load(folders[("default", -2)][0])
    model.config.projector = "linear"
    with pytest.raises(UserError, match="'linear' projector"):
        model.save_pretrained(tmp_path, format="hf")
    assert not (tmp_path / "config.json").exists()
