"""OpenAI/OpenCLIP state dicts against golden outputs computed by OpenCLIP itself.

The files in tests/golden come from scripts/make_openclip_golden.py (see its docstring to
regenerate): OpenCLIP 3.3 models with every parameter randomised, their state dicts, fixed inputs
and OpenCLIP's image/text features and logits.
"""
import json

import pytest
import torch
from interop_helpers import GOLDEN
from safetensors.torch import load_file

import vlmkit
from vlmkit.errors import UserError

TOLERANCE = 1e-5
GOLDENS = {"vit_quickgelu": None, "vit_gelu": "gelu", "rn": None}  # name -> activation option


def _differences(model, io):
    with torch.no_grad():
        image = model.encode_image(io["pixels"])
        text = model.encode_text(io["tokens"])
        logits, _ = model.logits(io["pixels"], io["tokens"])
    return {"image": (image - io["image_features"]).abs().max().item(),
            "text": (text - io["text_features"]).abs().max().item(),
            "logits": (logits - io["logits_per_image"]).abs().max().item()}


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_openclip_state_dict_matches_openclip(name):
    io = load_file(GOLDEN / f"openclip_{name}.io.safetensors")
    assert io["image_features"].abs().mean() > 0.05 and io["text_features"].abs().mean() > 0.05
    model = vlmkit.load(GOLDEN / f"openclip_{name}.safetensors", activation=GOLDENS[name])
    config = json.loads((GOLDEN / f"openclip_{name}.json").read_text())["model_cfg"]
    assert model.config.vision.type == ("resnet" if name == "rn" else "vit")
    assert model.config.embed_dim == config["embed_dim"] and model.config.text.depth == config["text_cfg"]["layers"]
    assert model.transform.image_size == config["vision_cfg"]["image_size"]
    differences = _differences(model, io)
    assert max(differences.values()) <= TOLERANCE, differences


def test_the_activation_matters_so_the_golden_test_can_fail():
    io = load_file(GOLDEN / "openclip_vit_gelu.io.safetensors")
    model = vlmkit.load(GOLDEN / "openclip_vit_gelu.safetensors")  # default: QuickGELU, wrong for this file
    assert model.config.text.activation == "quick_gelu"
    assert max(_differences(model, io).values()) > 100 * TOLERANCE


def test_torch_checkpoint_with_state_dict_wrapper_and_ddp_prefix(tmp_path):
    state = load_file(GOLDEN / "openclip_rn.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in state.items()}}, tmp_path / "epoch_3.pt")
    io = load_file(GOLDEN / "openclip_rn.io.safetensors")
    assert max(_differences(vlmkit.load(tmp_path / "epoch_3.pt"), io).values()) <= TOLERANCE


def test_forcing_an_architecture_by_name_checks_the_shapes():
    with pytest.raises(UserError, match=r"assumed format: OpenAI/OpenCLIP CLIP state dict, ViT-B-32.*shape mismatches"):
        vlmkit.load(GOLDEN / "openclip_vit_quickgelu.safetensors", model_name="ViT-B-32")
    with pytest.raises(UserError, match="unknown OpenCLIP model name 'ViT-Q-99'"):
        vlmkit.load(GOLDEN / "openclip_vit_quickgelu.safetensors", model_name="ViT-Q-99")


def test_named_architecture_builds_the_openai_shapes():
    from vlmkit.interop.openclip import KNOWN_MODELS, config_from_spec

    config = config_from_spec(KNOWN_MODELS["ViT-B-32"], "quick_gelu")
    assert config["vision"]["heads"] == 12 and config["text"]["heads"] == 8 and config["embed_dim"] == 512
    config = config_from_spec(KNOWN_MODELS["RN50"], "quick_gelu")
    assert config["vision"]["heads"] == 32 and config["vision"]["resnet_layers"] == [3, 4, 6, 3]


@pytest.mark.parametrize("name", ["vit_quickgelu", "rn"])
def test_export_to_openclip_layout_round_trips(name, tmp_path):
    source = GOLDEN / f"openclip_{name}.safetensors"
    model = vlmkit.load(source)
    from vlmkit.interop import export

    export(model, tmp_path / "oc", to="openclip")
    written = load_file(tmp_path / "oc" / "open_clip_model.safetensors")
    original = load_file(source)
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        assert torch.equal(written[key], value.float() if value.is_floating_point() else value), key
    again = vlmkit.load(tmp_path / "oc")  # the hub-style folder, activation from open_clip_config.json
    io = load_file(GOLDEN / f"openclip_{name}.io.safetensors")
    assert max(_differences(again, io).values()) <= TOLERANCE


def _with_text_pool(model, pool: str, eos_token_id: int):
    """The same weights in a CLIP whose text tower pools differently (what a vlmkit-trained CLIP has)."""
    import dataclasses

    text = dataclasses.replace(model.config.text, pool=pool, eos_token_id=eos_token_id)
    other = type(model)(dataclasses.replace(model.config, text=text))
    other.load_state_dict(model.state_dict())
    other.transform, other.tokenizer = model.transform, getattr(model, "tokenizer", None)
    return other.eval()


def test_first_eos_pooling_exports_when_the_end_token_is_the_highest_id(tmp_path):
    # vlmkit's own CLIP runs pool at the first end token; with CLIP's BPE (<|endoftext|> = vocab - 1) that
    # is OpenCLIP's argmax position, so the OpenCLIP folder embeds every text identically.
    original = vlmkit.load(GOLDEN / "openclip_vit_quickgelu.safetensors")
    vocab = original.config.text.vocab_size
    first_eos = _with_text_pool(original, "eos", vocab - 1)
    io = load_file(GOLDEN / "openclip_vit_quickgelu.io.safetensors")
    assert max(_differences(first_eos, io).values()) <= TOLERANCE
    from vlmkit.interop import export

    export(first_eos, tmp_path / "oc", to="openclip")
    again = vlmkit.load(tmp_path / "oc")
    assert again.config.text.pool == "argmax"
    assert max(_differences(again, io).values()) <= TOLERANCE
    # An end token that is not the highest id would pool elsewhere under OpenCLIP: refused, saying why.
    with pytest.raises(UserError, match="highest id"):
        export(_with_text_pool(original, "eos", vocab - 2), tmp_path / "bad", to="openclip")
    assert not (tmp_path / "bad" / "open_clip_config.json").exists()
