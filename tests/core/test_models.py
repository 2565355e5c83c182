"""Every registered configuration, tested for free (timm-style)."""
import math

import pytest
import torch

import vlmkit
from vlmkit.models.registry import build_model, named_config

from vlmkit.capabilities import EmbedsImages, EmbedsTexts, provides
from vlmkit.models.registry import get_family, list_families

TINY = vlmkit.list_models(tiny=True)
DUAL_ENCODERS = [name for name in TINY if all(provides(get_family(named_config(name)[0]), c) for c in (EmbedsImages, EmbedsTexts))]
# Training-free families (ASIF) have no loss: the tests below compare their embeddings instead.
TRAINABLE = [name for name in TINY if get_family(named_config(name)[0]).trainable]
# Parameter counts of the same architectures in OpenCLIP (RN50, ViT-B/32, ViT-B/16, ViT-L/14, OpenAI).
OPENCLIP_PARAMETERS = {"clip-rn50": 102_007_137, "clip-vit-b-32": 151_277_313, "clip-vit-b-16": 149_620_737, "clip-vit-l-14": 427_616_513}


def _batch(model, batch=3, seed=0):
    return model.dummy_batch(batch, seed)


def _outputs(model, batch):
    """What a model computes from a batch: its loss, or a training-free family's image and text embeddings."""
    if model.trainable:
        return [model(batch).loss]
    return [model.encode_image(batch["pixels"]), model.encode_text(batch["tokens"])]


def _create(name):
    family = get_family(named_config(name)[0])
    return vlmkit.create_model(name, **family.example_config)


def test_every_family_has_a_tiny_configuration():
    assert {named_config(name)[0] for name in TINY} == set(list_families())


def test_declaring_a_capability_without_its_methods_fails_at_class_creation():
    from vlmkit.capabilities import Answers
    from vlmkit.models.base import VLModel

    with pytest.raises(TypeError, match="declares the capability Answers but does not implement answer"):
        class Broken(VLModel):  # noqa: F841 - the class statement itself must fail
            family = "broken"
            capabilities = (Answers,)


@pytest.mark.parametrize("name", TRAINABLE)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = _create(name)
    output = model(_batch(model))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip_is_exact(name, tmp_path):
    torch.manual_seed(0)
    model = _create(name).eval()
    batch = _batch(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    for ours, theirs in zip(_outputs(model, batch), _outputs(loaded, batch)):
        assert torch.equal(ours, theirs)
    for name_, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name_]), name_


@pytest.mark.parametrize("name", DUAL_ENCODERS)
def test_save_load_round_trip_gives_the_same_embeddings(name, tmp_path):
    torch.manual_seed(0)
    model = _create(name).eval()
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
        model = _create(name)
        outputs.append(_outputs(model, _batch(model)))
    for first, second in zip(*outputs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("name", sorted(set(TINY) - set(TRAINABLE)))
def test_a_training_free_family_refuses_forward_and_has_nothing_to_train(name):
    model = _create(name)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(vlmkit.UserError, match="training-free"):
        model(_batch(model))


@pytest.mark.parametrize("name", DUAL_ENCODERS)
def test_padding_after_the_end_token_does_not_change_text_features(name):
    torch.manual_seed(0)
    model = _create(name).eval()
    tokens = _batch(model)["tokens"]
    shorter = tokens[:, :12]
    assert torch.allclose(model.encode_text(tokens), model.encode_text(shorter), atol=1e-5)
    # Row by row (no batch-wide trimming) gives the same features as the padded batch.
    one_by_one = torch.cat([model.encode_text(row[None]) for row in tokens])
    assert torch.allclose(model.encode_text(tokens), one_by_one, atol=1e-5)


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


def test_pooled_only_vit_computes_the_same_embedding():
    # The last block computing only the [CLS] row is an optimisation, never a change of result.
    torch.manual_seed(0)
    vit = vlmkit.create_model("clip-tiny").visual.eval()
    pixels = torch.randn(4, 3, 64, 64)
    full, fast = vit(pixels).pooled, vit(pixels, pooled_only=True).pooled
    assert torch.allclose(full, fast, atol=1e-6), (full - fast).abs().max()
    vit.train()
    torch.manual_seed(1)
    loss_full = vit(pixels).pooled.square().sum()
    grads_full = torch.autograd.grad(loss_full, list(vit.parameters()), allow_unused=True)
    loss_fast = vit(pixels, pooled_only=True).pooled.square().sum()
    grads_fast = torch.autograd.grad(loss_fast, list(vit.parameters()), allow_unused=True)
    for a, b in zip(grads_full, grads_fast):
        # float32 rounding of a different summation order, measured against the gradient's own scale
        # (entries reach ~180 here: an absolute 1e-5 is below one rounding step on some CPUs' kernels)
        assert (a is None and b is None) or (a - b).abs().max() <= 1e-6 * a.abs().max() + 1e-7, (a - b).abs().max()


def test_vit_hidden_state_runs_only_the_blocks_up_to_the_layer():
    """`hidden_state(pixels, layer)` equals `hidden_states[layer]` of a full forward, for every layer
    (negative ones too), and the blocks after it never run."""
    from vlmkit.encoders.vit import VisionTransformer

    torch.manual_seed(0)
    tower = VisionTransformer(image_size=32, patch_size=8, width=32, depth=3, heads=2, output_dim=16).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tower(pixels, output_hidden_states=True).hidden_states  # 4 x (2, 17, 32)
        ran = []
        hooks = [block.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
                 for i, block in enumerate(tower.transformer.blocks)]
        for layer in range(-4, 4):
            ran.clear()
            assert torch.equal(tower.hidden_state(pixels, layer), full[layer])
            assert ran == list(range(layer % 4)), (layer, ran)
        for hook in hooks:
            hook.remove()
    with pytest.raises(ValueError, match="outside the 4 hidden states"):
        tower.hidden_state(pixels, 4)
