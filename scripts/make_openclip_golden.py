"""Generate the OpenCLIP golden files that tests/interop/test_openclip_golden.py checks vlmkit against.

OpenCLIP needs torchvision, which cannot live next to vlmkit's CPU torch, so the expected numbers
are computed once here, in a separate throwaway environment, and committed as small files:

    tests/golden/openclip_<name>.safetensors     the model's state dict, exactly as OpenCLIP names it
    tests/golden/openclip_<name>.io.safetensors  inputs (pixels, token ids with padding) and the
                                                 expected image/text features and logits
    tests/golden/openclip_<name>.json            OpenCLIP's model config and the versions used

Models: a ViT with QuickGELU, a ViT with GELU, and a modified ResNet, each tiny. Every parameter
and BatchNorm statistic is randomised (not left at 1/0), so a swapped weight/bias or a missed
transpose cannot go unnoticed. Weights are rounded to float16 for storage (half the size) and the
expected outputs are computed in float32 from those rounded weights, so the comparison stays an
exact fp32 one; vlmkit upcasts float16 checkpoints to float32 by default.

To regenerate (about 5 minutes, ~5.5 GB for torch + torchvision):

    python3 -m venv /tmp/ocenv
    /tmp/ocenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/ocenv/bin/pip download --no-deps -d /tmp/ocwheels open_clip_torch
    /tmp/ocenv/bin/pip install --no-deps /tmp/ocwheels/open_clip_torch-*.whl
    /tmp/ocenv/bin/pip install ftfy regex safetensors tqdm huggingface_hub
    /tmp/ocenv/bin/python scripts/make_openclip_golden.py      # from the repository root

(open_clip 3.3.0 and torch 2.14.1 made the committed files; timm is not needed for these models.)
The script does not import vlmkit. It overwrites the files; `git diff --stat tests/golden` shows
whether anything changed.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "golden"
VOCAB, CONTEXT = 320, 16  # a tiny vocabulary: <|endoftext|> is its highest id (319), as in OpenAI's
MODELS = {
    # Vision: 2 heads of 64 (heads = width // head_width, as OpenAI's build_model infers), 1 block,
    # MLP ratio 2; text: 1 head, 2 blocks. QuickGELU, as OpenAI's weights.
    "vit_quickgelu": {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 1, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 64, "heads": 1, "layers": 2},
    },
    # The other way round, with GELU (most OpenCLIP-trained weights).
    "vit_gelu": {
        "embed_dim": 32, "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 128, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
    },
    # ModifiedResNet: stem width 4 -> 128 channels into the attention pool (2 heads of 64), 64 px images.
    "rn": {
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "width": 4, "layers": [1, 1, 1, 1]},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 64, "heads": 1, "layers": 1},
    },
}


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter and BatchNorm statistic a random value, then round to float16 and back."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                value = 0.5 + torch.rand(tensor.shape, generator=generator)  # positive variances
            elif name == "logit_scale":
                value = torch.tensor(2.0)
            elif tensor.ndim == 1 or name.endswith("embedding") or "running_mean" in name:
                value = tensor + 0.1 * torch.randn(tensor.shape, generator=generator)  # norms and biases off 1/0
            else:
                value = tensor + 0.02 * torch.randn(tensor.shape, generator=generator)
            tensor.copy_(value.half().float())


def inputs(config: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three images and three texts of different lengths: [sot] tokens [eot] then zero padding."""
    size = config["vision_cfg"]["image_size"]
    pixels = torch.randn(3, 3, size, size, generator=generator)
    tokens = torch.randint(1, VOCAB - 2, (3, CONTEXT), generator=generator)
    tokens[:, 0] = VOCAB - 2  # <|startoftext|>
    for row, end in enumerate([4, 9, CONTEXT - 1]):  # the last one fills the context exactly
        tokens[row, end] = VOCAB - 1  # <|endoftext|>, the argmax id OpenCLIP pools at
        tokens[row, end + 1:] = 0
    return pixels, tokens


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for index, (name, config) in enumerate(MODELS.items()):
        generator = torch.Generator().manual_seed(1000 + index)
        torch.manual_seed(index)
        model = CLIP(**config).eval()
        randomise(model, generator)
        pixels, tokens = inputs(config, generator)
        with torch.no_grad():
            image = model.encode_image(pixels)  # (3, D), not normalised
            text = model.encode_text(tokens)
            image_n, text_n, scale = model(pixels, tokens)[:3]
            logits = scale * image_n @ text_n.T  # (images, texts)
        state = {key: value.half().contiguous() if value.is_floating_point() else value.contiguous()
                 for key, value in model.state_dict().items()}
        save_file(state, OUT / f"openclip_{name}.safetensors", metadata={"format": "pt"})
        save_file({"pixels": pixels, "tokens": tokens, "image_features": image, "text_features": text,
                   "logits_per_image": logits}, OUT / f"openclip_{name}.io.safetensors")
        meta = {"model_cfg": config, "open_clip": open_clip.__version__, "torch": torch.__version__,
                "weights_dtype": "float16 (outputs computed in float32 from the rounded weights)"}
        (OUT / f"openclip_{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        size = (OUT / f"openclip_{name}.safetensors").stat().st_size
        print(f"{name}: {sum(v.numel() for v in state.values())} tensors' elements, {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
