"""Builders shared by the interop tests: tiny random HF CLIP folders with tokenizer and preprocessor files."""
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CAPTIONS = [
    "a red circle above a blue square", "two green triangles", "a small yellow star on the left",
    "the big purple square is next to a tiny orange circle", "three shapes", "nothing but a grey background",
]


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every float tensor (norm weights off 1, biases off 0) so a swapped weight cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                scale = 0.1 if tensor.ndim <= 1 or "embedding" in name else 0.02
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))


def hf_clip_config(activation="quick_gelu", vocab_size=600, legacy_eos=False, **vision):
    """A tiny CLIPConfig: 4 heads, 2 layers per tower, an MLP ratio that is not 4."""
    eos = 2 if legacy_eos else vocab_size - 1
    vision_config = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8, hidden_act=activation)
    vision_config.update(vision)
    return transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=vocab_size, max_position_embeddings=16, hidden_act=activation,
                         bos_token_id=vocab_size - 2, eos_token_id=eos, pad_token_id=vocab_size - 1),
        vision_config=vision_config, projection_dim=24,
    )


def save_hf_clip(folder, config, tokenizer_dir=None, seed=0, safe_serialization=True):
    """A random (and randomised) CLIPModel saved to `folder` with tokenizer and preprocessor files."""
    import shutil

    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    randomise_(model, seed)
    model.save_pretrained(folder)
    if not safe_serialization:  # transformers 5 writes safetensors only: make the legacy pickle file by hand
        (Path(folder) / "model.safetensors").unlink()
        torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")
    if tokenizer_dir is not None:
        for file in Path(tokenizer_dir).iterdir():
            shutil.copy(file, Path(folder) / file.name)
    size = config.vision_config.image_size
    transformers.CLIPImageProcessor(size={"shortest_edge": size + 4}, crop_size={"height": size, "width": size},
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return model


def features(output) -> torch.Tensor:
    """get_image_features / get_text_features: a tensor (transformers 4) or an output object (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
