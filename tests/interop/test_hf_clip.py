"""HF transformers CLIPModel folders: exact fp32 parity on load, and export back into transformers."""
import pytest
import torch

import vlmkit
from vlmkit.errors import UserError

from interop_helpers import CAPTIONS, features, hf_clip_config, randomise_, save_hf_clip, transformers

TOLERANCE = 1e-5


def _texts_and_pixels(model, tokenizer_dir=None, size=32):
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randn(3, 3, size, size, generator=generator)
    texts = ["a red circle", "two green triangles next to the big purple square on the left", "shapes"]
    if tokenizer_dir is not None:
        hf_tokenizer = transformers.CLIPTokenizerFast.from_pretrained(str(tokenizer_dir))
        encoded = hf_tokenizer(texts, padding=True, return_tensors="pt")  # padded to the longest text
        return pixels, encoded["input_ids"], encoded["attention_mask"], texts
    return pixels, None, None, texts


def _compare(hf, ours, pixels, ids, mask):
    with torch.no_grad():
        hf_image = features(hf.get_image_features(pixel_values=pixels))
        hf_text = features(hf.get_text_features(input_ids=ids, attention_mask=mask))
        hf_logits = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_image
        image, text = ours.encode_image(pixels), ours.encode_text(ids)
        logits, _ = ours.logits(pixels, ids)
    assert hf_image.abs().mean() > 0.05 and hf_text.abs().mean() > 0.05  # not a degenerate comparison
    return {"image": (image - hf_image).abs().max().item(), "text": (text - hf_text).abs().max().item(),
            "logits": (logits - hf_logits).abs().max().item()}


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_hf_clip_folder_matches_transformers(activation, tmp_path, clip_tokenizer_dir):
    hf = save_hf_clip(tmp_path, hf_clip_config(activation), clip_tokenizer_dir, seed=1)
    ours = vlmkit.load(tmp_path)
    assert ours.family == "clip" and not ours.training and ours.config.vision.activation == activation
    pixels, ids, mask, _ = _texts_and_pixels(hf, clip_tokenizer_dir)
    assert len(set(mask.sum(dim=1).tolist())) == 3  # three different lengths, two of them padded
    differences = _compare(hf, ours, pixels, ids, mask)
    assert max(differences.values()) <= TOLERANCE, differences


def test_wrong_activation_would_be_caught(tmp_path, clip_tokenizer_dir):
    # The tolerance is tight enough to see QuickGELU vs GELU: the parity above can fail.
    hf = save_hf_clip(tmp_path, hf_clip_config("gelu"), clip_tokenizer_dir, seed=1)
    ours = vlmkit.load(tmp_path)
    for module in ours.modules():
        if isinstance(module, torch.nn.GELU):
            module.forward = lambda x: x * torch.sigmoid(1.702 * x)
    pixels, ids, mask, _ = _texts_and_pixels(hf, clip_tokenizer_dir)
    assert max(_compare(hf, ours, pixels, ids, mask).values()) > 100 * TOLERANCE


def test_legacy_eos_config_pools_at_the_argmax_id_like_transformers(tmp_path, clip_tokenizer_dir):
    hf = save_hf_clip(tmp_path, hf_clip_config(legacy_eos=True), clip_tokenizer_dir, seed=2)
    ours = vlmkit.load(tmp_path)
    assert ours.config.text.pool == "argmax"
    pixels, ids, mask, _ = _texts_and_pixels(hf, clip_tokenizer_dir)
    assert max(_compare(hf, ours, pixels, ids, mask).values()) <= TOLERANCE


def test_pytorch_model_bin_loads_with_the_same_numbers(tmp_path, clip_tokenizer_dir):
    hf = save_hf_clip(tmp_path, hf_clip_config(), clip_tokenizer_dir, seed=3, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    pixels, ids, mask, _ = _texts_and_pixels(hf, clip_tokenizer_dir)
    assert max(_compare(hf, vlmkit.load(tmp_path), pixels, ids, mask).values()) <= TOLERANCE


def test_tokenizer_and_preprocessing_follow_the_hf_folder(tmp_path, clip_tokenizer_dir):
    save_hf_clip(tmp_path, hf_clip_config(), clip_tokenizer_dir)
    ours = vlmkit.load(tmp_path)
    hf_tokenizer = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path))
    texts = ["a red circle", "two green triangles next to the big purple square on the left " * 3, ""]
    expected = hf_tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    assert torch.equal(ours.tokenize(texts), expected)
    assert ours.tokenizer.pad_id == hf_tokenizer.pad_token_id == ours.tokenizer.eos_id  # HF's openai padding
    transform = ours.transform
    assert (transform.image_size, transform.resize_size) == (32, 36)
    assert transform.mean == (0.5, 0.4, 0.3) and transform.std == (0.2, 0.25, 0.3)


def test_old_position_ids_buffers_are_checked_not_dropped(tmp_path, clip_tokenizer_dir):
    from safetensors.torch import load_file, save_file

    hf = save_hf_clip(tmp_path, hf_clip_config(), clip_tokenizer_dir, seed=4)
    state = load_file(tmp_path / "model.safetensors")
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    pixels, ids, mask, _ = _texts_and_pixels(hf, clip_tokenizer_dir)
    assert max(_compare(hf, vlmkit.load(tmp_path), pixels, ids, mask).values()) <= TOLERANCE
    state["text_model.embeddings.position_ids"] = torch.arange(16).flip(0)[None]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="position_ids"):
        vlmkit.load(tmp_path)


@pytest.mark.parametrize("pool", ["eos", "argmax"])
def test_export_to_hf_loads_in_transformers_with_the_same_outputs(pool, tmp_path):
    from vlmkit.tokenizers import train_clip_bpe

    torch.manual_seed(0)
    tokenizer = train_clip_bpe(CAPTIONS * 4, vocab_size=600, context_length=16)
    ours = vlmkit.create_model(
        "clip-tiny", **{"vision.image_size": 32, "vision.depth": 2, "vision.width": 64, "text.depth": 2, "text.width": 64,
                        "text.vocab_size": tokenizer.vocab_size, "text.eos_token_id": tokenizer.eos_id,
                        "text.context_length": 16, "text.pool": pool, "vision.activation": "quick_gelu",
                        "text.activation": "quick_gelu", "embed_dim": 24},
    ).eval()
    randomise_(ours, 5)
    ours.tokenizer = tokenizer
    from vlmkit.data.transforms import ImageTransform

    ours.transform = ImageTransform(image_size=32)
    ours.save_pretrained(tmp_path / "hf", format="hf")
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    hf_tokenizer = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path / "hf"))
    texts = ["a red circle", "two green triangles next to the big purple square", "three shapes"]
    ids = ours.tokenize(texts)
    encoded = hf_tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    real = encoded["attention_mask"].bool()  # same text tokens; only the padding id differs (ours: 0, HF: eot)
    assert torch.equal(encoded["input_ids"][real], ids[real])
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    differences = _compare(hf, ours, pixels, ids, None)
    assert max(differences.values()) <= TOLERANCE, differences
    back = vlmkit.load(tmp_path / "hf")  # and the exported folder reads back bit for bit
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_export_refuses_what_hf_clip_cannot_hold(tmp_path):
    model = vlmkit.create_model("clip-rn-tiny")
    with pytest.raises(UserError, match="ResNet"):
        model.save_pretrained(tmp_path, format="hf")
    with pytest.raises(UserError, match="unknown save format"):
        model.save_pretrained(tmp_path, format="onnx")
