"""Every registered configuration, tested for free (timm-style)."""
import math

import pytest
import torch

import vlmkit
from vlmkit.models.registry import build_model, named_config

TINY = [name for name in vlmkit.list_models() if name.endswith("-tiny")]
# Parameter counts of the same architectures in OpenCLIP (RN50, ViT-B/32, ViT-B/16, ViT-L/14, OpenAI).
OPENCLIP_PARAMETERS = {"clip-rn50": 102_007_137, "clip-vit-b-32": 151_277_313, "clip-vit-b-16": 149_620_737, "clip-vit-l-14": 427_616_513}


def _batch(model, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    pixels = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size, generator=generator)
    tokens = torch.randint(1, config.text.vocab_size - 2, (batch, config.text.context_length), generator=generator)
    end = config.text.eos_token_id if config.text.eos_token_id is not None else config.text.vocab_size - 1
    for row, length in enumerate([5, 9, 3][:batch]):
        tokens[row, length] = end
        tokens[row, length + 1 :] = config.text.pad_token_id
    return {"pixels": pixels, "tokens": tokens}


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = vlmkit.create_model(name)
    output = model(_batch(model))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip_is_exact(name, tmp_path):
    torch.manual_seed(0)
    model = vlmkit.create_model(name).eval()
    batch = _batch(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    for a, b in ((model.encode_image(batch["pixels"]), loaded.encode_image(batch["pixels"])),
                 (model.encode_text(batch["tokens"]), loaded.encode_text(batch["tokens"]))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", TINY)
def test_same_seed_same_model_and_outputs(name):
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = vlmkit.create_model(name)
        outputs.append(model(_batch(model)).loss)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", TINY)
def test_padding_after_the_end_token_does_not_change_text_features(name):
    torch.manual_seed(0)
    model = vlmkit.create_model(name).eval()
    tokens = _batch(model)["tokens"]
    shorter = tokens[:, :12]
    assert torch.allclose(model.encode_text(tokens), model.encode_text(shorter), atol=1e-5)


@pytest.mark.parametrize("name", sorted(OPENCLIP_PARAMETERS))
def test_full_size_configs_match_openclip_parameter_counts(name):
    family, config = named_config(name)
    with torch.device("meta"):
        model = build_model(family, config)
    assert sum(p.numel() for p in model.parameters()) == OPENCLIP_PARAMETERS[name]


def test_vit_runs_at_another_image_size_by_resampling_positions():
    torch.manual_seed(0)
    model = vlmkit.create_model("clip-tiny").eval()
    assert model.encode_image(torch.randn(2, 3, 96, 96)).shape == (2, 128)


def test_logit_scale_is_clamped_after_a_step():
    model = vlmkit.create_model("clip-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.after_optimizer_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_unknown_model_and_unknown_config_key_are_clear_errors():
    with pytest.raises(vlmkit.UserError, match="unknown model 'nope'"):
        vlmkit.create_model("nope")
    with pytest.raises(vlmkit.UserError, match="unknown key"):
        vlmkit.create_model("clip-tiny", **{"vision.depthh": 2})


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = vlmkit.create_model("clip-tiny")
        for module in model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = checkpointing
        model(_batch(model)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
