"""LLaVA: placeholder expansion and label masks, masked scatter, feature selection, the two stages,
LoRA with its PEFT adapter, chat prompts and decoding, `vlmkit chat` end to end."""
import json

import pytest
import torch

from vlmkit.data.conversation import IGNORE_INDEX, VICUNA_SYSTEM, encode_conversation
from vlmkit.errors import UserError
from vlmkit.models.registry import get_family, named_config

TEXTS = ["a red circle on the left", "a blue square", "how many objects are there?", "what color is the star?",
         "Answer the question using a single word or phrase.", VICUNA_SYSTEM, "USER: ASSISTANT:", "yes", "no", "2"]


@pytest.fixture(scope="module")
def tokenizer():
    from vlmkit.tokenizers import train_clip_bpe

    return train_clip_bpe(TEXTS, vocab_size=700, context_length=32)


def _model(tokenizer, **overrides):
    from vlmkit.config import apply_overrides
    from vlmkit.data.transforms import ImageTransform

    family, config = named_config("llava-tiny")
    cls = get_family(family)
    config = apply_overrides(cls.adapt_config_to_tokenizer(config, tokenizer), overrides)
    torch.manual_seed(0)
    model = cls.from_config_dict(config)
    model.tokenizer, model.transform = tokenizer, ImageTransform(config["vision"]["image_size"])
    return model


def _image(tmp_path, name="img.png"):
    from PIL import Image

    path = tmp_path / name
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return str(path)


def test_batch_label_mask_token_by_token_after_expansion(tokenizer, tmp_path):
    from vlmkit.models.llava import LlavaDataset

    model = _model(tokenizer)
    k, image_id = model.config.num_image_tokens, model.config.image_token_id
    turns = [{"from": "human", "value": "<image>\nhow many objects are there?"}, {"from": "gpt", "value": "2"},
             {"from": "human", "value": "what color is the star?"}, {"from": "gpt", "value": "a red circle"}]
    record = {"image": _image(tmp_path), "conversations": turns}
    dataset = LlavaDataset([record], model.transform, tokenizer, template="vicuna_v1", max_length=256,
                           image_token_id=image_id, num_image_tokens=k)
    batch = dataset.collate([dataset[0]])
    reference = encode_conversation(turns, "vicuna_v1", tokenizer, 256, has_image=True)  # one placeholder
    where = reference.input_ids.tolist().index(image_id)
    expected_ids = reference.input_ids.tolist()[:where] + [image_id] * k + reference.input_ids.tolist()[where + 1:]
    expected_labels = reference.labels.tolist()[:where] + [IGNORE_INDEX] * k + reference.labels.tolist()[where + 1:]
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == expected_labels
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    for position in range(len(ids)):  # token by token: supervised exactly on replies and their end tokens
        assert labels[position] in (IGNORE_INDEX, ids[position])
        if ids[position] == image_id:
            assert labels[position] == IGNORE_INDEX
    supervised = [int(t) for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    eos = tokenizer.eos_id
    assert supervised.count(eos) == 2 and supervised[-1] == eos
    replies = tokenizer.decode([t for t in supervised if t != eos])
    assert replies.replace(" ", "") == "2aredcircle"
    # The prompt itself: bos, system, "USER:", then the K image tokens.
    assert ids[0] == tokenizer.bos_id and (ids == image_id).sum() == k
    assert model(batch).loss.isfinite()


def test_masked_scatter_puts_features_exactly_at_the_placeholders(tokenizer):
    model = _model(tokenizer).eval()
    k, image_id = model.config.num_image_tokens, model.config.image_token_id
    ids = torch.tensor([[tokenizer.bos_id, 5, *[image_id] * k, 7, 8], [tokenizer.bos_id, *[image_id] * k, 9, 10, 11]])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        embeds = model.embed_with_images(ids, pixels)
        features = model.image_features(pixels)  # (2, K, D)
        plain = model.lm.embed_tokens(ids)
    assert torch.equal(embeds[0, 2 : 2 + k], features[0]) and torch.equal(embeds[1, 1 : 1 + k], features[1])
    is_text = ids != image_id
    assert torch.equal(embeds[is_text], plain[is_text])


def test_placeholder_count_mismatch_is_one_clear_error(tokenizer):
    model = _model(tokenizer)
    k, image_id = model.config.num_image_tokens, model.config.image_token_id
    ids = torch.tensor([[tokenizer.bos_id, *[image_id] * (k - 1), 7]])
    with pytest.raises(UserError, match=f"the batch has {k - 1} image placeholders but 1 images x {k} tokens"):
        model.embed_with_images(ids, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "full"), (0, "default"), (1, "full")])
def test_feature_layer_and_select_strategy_pick_the_hidden_state(tokenizer, layer, strategy):
    model = _model(tokenizer, vision_feature_layer=layer, vision_feature_select_strategy=strategy).eval()
    model.projector = torch.nn.Identity()  # compare the selected vision features themselves
    pixels = torch.randn(2, 3, 32, 32)
    visual = model.visual
    with torch.no_grad():
        x = visual.norm_pre(visual.embed(pixels))  # HF hidden_states[0]: embeddings after the pre-LN
        states = [x]
        for block in visual.transformer.blocks:
            x = block(x, None, False)
            states.append(x)
        expected = states[layer]
        expected = expected[:, 1:] if strategy == "default" else expected
        got = model.image_features(pixels)
    patches = (32 // 8) ** 2
    assert got.shape == (2, patches + (strategy == "full"), 64) and model.config.num_image_tokens == got.shape[1]
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(UserError, match="vision_feature_layer 3 is outside the 3 hidden states"):
        _model(tokenizer, vision_feature_layer=3)


def test_projector_shapes_and_names(tokenizer):
    mlp, linear = _model(tokenizer), _model(tokenizer, projector="linear")
    assert {k: tuple(v.shape) for k, v in mlp.projector.state_dict().items()} == {
        "linear_1.weight": (64, 64), "linear_1.bias": (64,), "linear_2.weight": (64, 64), "linear_2.bias": (64,)}
    assert set(linear.projector.state_dict()) == {"linear_1.weight", "linear_1.bias"}
    features = torch.randn(2, 16, 64)
    assert mlp.projector(features).shape == linear.projector(features).shape == (2, 16, 64)
    with pytest.raises(UserError, match="projector must be one of linear, mlp2x_gelu"):
        _model(tokenizer, projector="mlp3x")


def _train_steps(model, steps=3, lr=1e-2):
    from vlmkit.train.optim import make_optimizer

    optimizer = make_optimizer(model, lr, 0.0, (0.9, 0.98), 1e-6)
    model.train()
    for seed in range(steps):
        model(model.dummy_batch(2, seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_stage_one_trains_only_the_projector(tokenizer):
    model = _model(tokenizer)
    model.set_training_options({"stage": 1})
    assert model.config.template == "plain"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith("projector.")}


def test_lora_stage_two_changes_adapters_and_projector_and_saves_a_peft_adapter(tokenizer, tmp_path):
    model = _model(tokenizer)
    model.set_training_options({"stage": 2, "lora_rank": 4, "lora_alpha": 8})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("projector.") or ".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed) and any(k.startswith("projector.") for k in changed)
    # The run folder (config records the adapters) loads strictly, and the PEFT folder is written.
    model.save_pretrained(tmp_path / "run")
    loaded = get_family("llava").from_pretrained(tmp_path / "run")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    model.save_training_artifacts(tmp_path / "run", model.state_dict())
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and "model.layers.0.self_attn.q_proj" in config["target_modules"]

    # peft loads it onto the HF Llama twin of our LM and gives our adapted LM's logits.
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from vlmkit.interop.hf_lm import export
    from vlmkit.layers.lora import merge_lora
    from vlmkit.models.lm import LanguageModel, LanguageModelConfig

    base = LanguageModel(LanguageModelConfig(lm=model.config.lm))
    merged_free = {k: v for k, v in model.lm.state_dict().items() if ".lora_" not in k}
    base.lm.load_state_dict(merged_free, strict=True)
    export(base, tmp_path / "llama")
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    twin = peft.PeftModel.from_pretrained(llama, adapter).eval()
    tokens = torch.tensor([[tokenizer.bos_id, 5, 9, 12, 40, 41]])
    model.eval()
    with torch.no_grad():
        ours = model.lm(tokens)
        theirs = twin(input_ids=tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours, merge_lora(base).lm(tokens), atol=1e-4)  # the adapters do change the outputs


def test_chat_prompt_is_the_template_and_cached_decoding_matches(tokenizer):
    from vlmkit.data.conversation import encode_prompt

    model = _model(tokenizer).eval()
    messages = [{"role": "user", "content": "how many objects are there?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "what color is the star?"}]
    ids = encode_prompt(messages, model.config.template, tokenizer, has_image=True).tolist()

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    expected = ([tokenizer.bos_id] + enc(VICUNA_SYSTEM + " USER: ") + [model.config.image_token_id]
                + enc("\nhow many objects are there? ASSISTANT:") + enc(" 2") + [tokenizer.eos_id]
                + enc("USER: what color is the star? ASSISTANT:"))
    assert ids == expected
    pixels = torch.randn(1, 3, 32, 32)
    from vlmkit.generation import left_pad_embeddings

    prompt = left_pad_embeddings([model._prompt_embeds(messages, pixels[0])])
    cached = model.generate_from_embeddings(prompt, max_new_tokens=12, min_new_tokens=12).tokens
    uncached = model.generate_from_embeddings(prompt, max_new_tokens=12, min_new_tokens=12, use_cache=False).tokens
    assert cached.tolist() == uncached.tolist()
    pieces = []
    reply = model.chat(pixels, messages, stream=pieces.append, max_new_tokens=12)
    assert "".join(pieces) == reply == model.chat(pixels[0], messages, max_new_tokens=12)


def test_chat_bad_inputs_are_one_clear_error_each(tokenizer):
    model = _model(tokenizer).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(UserError, match=r"1 <image> placeholder\(s\) but 0 image"):
        model.chat(None, [{"role": "user", "content": "<image>\nwhat is it?"}])
    with pytest.raises(UserError, match=r"2 <image> placeholder\(s\) but 1 image"):
        model.chat(pixels, [{"role": "user", "content": "<image> <image> what is it?"}])
    with pytest.raises(UserError, match="ends with an assistant turn"):
        model.chat(pixels, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])
    with pytest.raises(UserError, match="chat needs at least one message"):
        model.chat(pixels, [])
    with pytest.raises(UserError, match="streaming needs greedy decoding or sampling"):
        model.chat(pixels, [{"role": "user", "content": "hi"}], stream=print, num_beams=2)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A few steps of stage 2 through the Python Trainer on a small synthetic dataset (truncating on purpose)."""
    from vlmkit.data.synthetic import generate
    from vlmkit.train.recipe import build_recipe
    from vlmkit.train.trainer import Trainer

    root = tmp_path_factory.mktemp("llava-run")
    generate(root / "data", n=20, seed=3, progress=False)
    recipe = build_recipe({"model": "llava-tiny", "vocab_size": 700, "steps": 2, "batch_size": 4, "warmup_steps": 1,
                           "save_every": 2, "log_every": 1, "threads": 1,
                           "training": {"stage": 2, "max_length": 100, "include_captions": False}}, {}, where="test")
    result = Trainer(recipe, str(root / "data" / "train.jsonl"), root / "run").train()
    return root, result


def test_trainer_reports_truncations_and_run_loads_for_every_capability(trained_run):
    import vlmkit

    root, result = trained_run
    assert result["truncated"] > 0  # long descriptions cut to max_length, counted and reported
    model = vlmkit.load(root / "run")
    assert model.config.template == "vicuna_v1" and model.tokenizer.token_to_id("<image>") == model.config.image_token_id
    records = [json.loads(line) for line in (root / "data" / "test.jsonl").read_text().splitlines()][:2]
    from vlmkit.tasks.generative import evaluate_caption, evaluate_vqa

    for record in records:
        record["image"] = str(root / "data" / record["image"])
    assert 0 <= evaluate_vqa(model, records, max_new_tokens=3)["accuracy"] <= 1
    assert "CIDEr" in evaluate_caption(model, records, max_new_tokens=5)


def test_chat_cli_message_json_end_to_end_and_bad_inputs(trained_run, capsys):
    from vlmkit.cli import main

    root, _ = trained_run
    image = str(next((root / "data" / "images").glob("test-*.png")))
    run = str(root / "run")
    assert main(["chat", image, "--model", run, "--message", "How many objects are there?", "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image"] == image and out["messages"][0] == {"role": "user", "content": "How many objects are there?"}
    assert out["messages"][1] == {"role": "assistant", "content": out["reply"]} and isinstance(out["reply"], str)
    assert main(["chat", image, "--model", run, "--message", "Hi", "--max-new-tokens", "3"]) == 0  # streamed
    assert capsys.readouterr().out.endswith("\n")
    assert main(["chat", str(root / "missing.png"), "--model", run, "--message", "Hi"]) == 2
    assert main(["chat", image, "--model", run, "--message", "  "]) == 2
    assert main(["chat", image, "--model", run, "--message", "Hi", "--beams", "2", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("vlmkit: error:") == 3 and "Traceback" not in err


def test_cached_decoding_steps_reproduce_the_training_forward_logits(tokenizer, tmp_path):
    from vlmkit.layers.attention import KVCache
    from vlmkit.models.llava import CAPTION_PROMPT, LlavaDataset

    model = _model(tokenizer).eval()
    turns = [{"from": "human", "value": "<image>\n" + CAPTION_PROMPT}, {"from": "gpt", "value": "a red circle on the left"}]
    dataset = LlavaDataset([{"image": _image(tmp_path), "conversations": turns}], model.transform, tokenizer,
                           template="vicuna_v1", max_length=256, image_token_id=model.config.image_token_id,
                           num_image_tokens=model.config.num_image_tokens)
    batch = dataset.collate([dataset[0]])
    with torch.no_grad():
        expected = model(batch).logits  # (1, L-1, V)
        step, placeholder = model.decoding_setup(batch["pixels"], None)
        prompt_length = placeholder.shape[1]
        reply = batch["input_ids"][:, prompt_length:]  # the supervised reply follows the prompt exactly
        assert (batch["labels"][0, :prompt_length] == IGNORE_INDEX).all() and (batch["labels"][0, prompt_length:] != IGNORE_INDEX).all()
        cache, rows = KVCache(), torch.arange(1)
        for t in range(reply.shape[1]):
            logits = step(torch.cat([placeholder, reply[:, :t]], dim=1), cache, rows)
            assert torch.allclose(logits, expected[:, prompt_length - 1 + t], atol=1e-4), t


def test_qa_repeats_copy_the_questions_of_a_type_and_bad_counts_are_one_clear_error(tokenizer):
    from vlmkit.models.llava import qa_conversations

    record = {"image": "x.png", "qa": [{"question": "is the red circle left of the blue square?", "answer": "yes", "type": "relation"},
                                       {"question": "what color is the circle?", "answer": "red", "type": "color"}]}
    plain = qa_conversations([record])
    repeated = qa_conversations([record], {"relation": 3, "yesno": 2})
    assert len(plain) == 2 and len(repeated) == 4
    assert [c["id"] for c in repeated] == ["x.png#qa0"] * 3 + ["x.png#qa1"]
    assert repeated[0]["conversations"][1]["value"] == "yes" and repeated[3]["conversations"][1]["value"] == "red"
    assert qa_conversations([record], {"color": 0})[0]["id"] == "x.png#qa0" and len(qa_conversations([record], {"color": 0})) == 1
    model = _model(tokenizer)
    model.set_training_options({"stage": 2, "qa_repeats": {"relation": 2}, "include_captions": False})
    assert len(model.training_records([record])) == 3  # no dialogues, 2 + 1 questions
    for bad in ({"relation": -1}, {"relation": 1.5}, {"relation": True}):
        with pytest.raises(UserError, match="qa_repeats.relation must be a whole number"):
            model.set_training_options({"stage": 2, "qa_repeats": bad})
