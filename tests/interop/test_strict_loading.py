"""Loading is strict: a missing, unexpected or mis-shaped tensor is a UserError naming keys and format."""
import pytest
import torch
from interop_helpers import GOLDEN, hf_clip_config, save_hf_clip
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit.errors import UserError

HF = "assumed format: HF transformers CLIPModel"


@pytest.fixture
def hf_folder(tmp_path):
    save_hf_clip(tmp_path, hf_clip_config())
    return tmp_path


def _edit(path, change):
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_key_is_named(hf_folder):
    _edit(hf_folder / "model.safetensors", lambda state: state.pop("text_model.encoder.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(UserError, match=rf"{HF}.*missing keys: text_model.encoder.layers.1.self_attn.k_proj.bias"):
        vlmkit.load(hf_folder)


def test_unexpected_key_is_named(hf_folder):
    _edit(hf_folder / "model.safetensors", lambda state: state.__setitem__("vision_model.extra_head.weight", torch.zeros(2)))
    with pytest.raises(UserError, match=rf"{HF}.*unexpected keys: vision_model.extra_head.weight"):
        vlmkit.load(hf_folder)


def test_shape_mismatch_is_named(hf_folder):
    def widen(state):
        state["visual_projection.weight"] = torch.zeros(25, 32)

    _edit(hf_folder / "model.safetensors", widen)
    with pytest.raises(UserError, match=rf"{HF}.*shape mismatches: visual_projection.weight \(25, 32\) \(model expects \(24, 32\)\)"):
        vlmkit.load(hf_folder)


def test_openclip_file_missing_and_unexpected_keys(tmp_path):
    state = load_file(GOLDEN / "openclip_vit_gelu.safetensors")
    state.pop("visual.ln_post.bias")
    state["visual.attn_pool.query"] = torch.zeros(3)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(UserError) as error:
        vlmkit.load(tmp_path / "broken.safetensors")
    message = str(error.value)
    assert "OpenAI/OpenCLIP CLIP state dict" in message and "missing keys: visual.ln_post.bias" in message
    assert "unexpected keys: visual.attn_pool.query" in message and str(tmp_path / "broken.safetensors") in message


def test_an_hf_weights_file_given_alone_says_what_to_do(hf_folder):
    with pytest.raises(UserError, match="no 'text_projection'.*not an OpenAI/OpenCLIP CLIP state dict"):
        vlmkit.load(hf_folder / "model.safetensors")


def test_unknown_folders_files_and_options(tmp_path, hf_folder):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(UserError, match="model_type 't5'"):
        vlmkit.load(tmp_path / "t5")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a known checkpoint file"):
        vlmkit.load(tmp_path / "notes.txt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read .*bad.pt"):
        vlmkit.load(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="do not apply to the HF transformers CLIPModel format"):
        vlmkit.load(hf_folder, model_name="ViT-B-32")
    with pytest.raises(UserError, match="unknown load option"):
        vlmkit.load(hf_folder, strict=False)


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    torch.save({"model": argparse.Namespace(payload=1)}, tmp_path / "evil.pt")  # an arbitrary object
    with pytest.raises(UserError, match="pickle-free"):
        vlmkit.load(tmp_path / "evil.pt")
