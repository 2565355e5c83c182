"""CLIP's tower initialisation: OpenCLIP's scheme by default (`init: openclip`), PyTorch's on request."""
import pytest
import torch

from vlmkit.errors import UserError
from vlmkit.models.registry import create_model


def _model(init: str, **overrides):
    torch.manual_seed(0)
    return create_model("clip-tiny", init=init, **overrides)


@pytest.fixture(scope="module")
def openclip_model():
    return _model("openclip", **{"text.depth": 4})


def test_openclip_init_zeroes_attention_biases_and_scales_stds_like_openclip(openclip_model):
    model = openclip_model
    width, depth = model.config.text.width, model.config.text.depth
    block = model.text.transformer.blocks[0]
    assert block.attn.qkv.bias.abs().max() == 0 and block.attn.out.bias.abs().max() == 0
    # OpenCLIP's TextTransformer.init_parameters stds, within sampling error of 128 x 384 draws.
    assert block.attn.qkv.weight.std().item() == pytest.approx(width**-0.5, rel=0.05)
    assert block.attn.out.weight.std().item() == pytest.approx(width**-0.5 * (2 * depth) ** -0.5, rel=0.05)
    assert block.mlp.fc1.weight.std().item() == pytest.approx((2 * width) ** -0.5, rel=0.05)
    assert model.text.proj.weight.std().item() == pytest.approx(width**-0.5, rel=0.05)
    # The ViT: nn.MultiheadAttention's xavier-uniform in-projection (std sqrt(2 / (fan_in + fan_out))), zero biases.
    vit_block = model.visual.transformer.blocks[0]
    vit_width = model.config.vision.width
    assert vit_block.attn.qkv.bias.abs().max() == 0 and vit_block.attn.out.bias.abs().max() == 0
    assert vit_block.attn.qkv.weight.std().item() == pytest.approx((2 / (4 * vit_width)) ** 0.5, rel=0.05)
    assert model.visual.proj.weight.std().item() == pytest.approx(vit_width**-0.5, rel=0.05)


def test_torch_init_keeps_pytorch_defaults_and_the_same_parameters(openclip_model):
    model = _model("torch", **{"text.depth": 4})
    assert model.text.transformer.blocks[0].attn.qkv.bias.abs().max() > 0  # nn.Linear's uniform bias
    assert model.visual.transformer.blocks[0].attn.qkv.bias.abs().max() > 0
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    assert shapes == {name: tensor.shape for name, tensor in openclip_model.state_dict().items()}
    assert model.config.init == "torch" and openclip_model.config.init == "openclip"


def test_unknown_init_is_a_clear_error():
    with pytest.raises(UserError, match="unknown CLIP init 'xavier'; use 'openclip' or 'torch'"):
        _model("xavier")


def test_a_bert_style_text_tower_starts_with_its_token_types_at_berts_std_and_tells_captions_apart():
    """BERT's initializer_range (0.02) for the token-type rows too. With nn.Embedding's N(0, 1) the one type row
    shared by every token drowned the token rows (std 0.02) under the embedding LayerNorm: a fresh `align-tiny`
    gave every caption the same feature (1 - mean cosine 7e-6) and trained at chance (loss ln 128 for 300 steps)."""
    torch.manual_seed(0)
    model = create_model("align-tiny")
    assert model.text.type_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    tokens = torch.randint(5, 1000, (8, 12))
    tokens[:, 0] = 2  # [CLS]
    with torch.no_grad():
        features = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    mean_off_diagonal = ((features @ features.T).sum() - 8) / 56
    assert 1 - mean_off_diagonal.item() > 1e-3  # 7.8e-3 now
