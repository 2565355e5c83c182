"""Full-size HF CLIP parity: ViT-B/32-, ViT-B/16- and ViT-L/14-shaped random CLIPModels, fp32.

Too slow for the test suite on a 2-core machine (building, saving and running ViT-L/14 takes about
a minute), so it lives here; tests/interop/test_hf_clip.py checks the same on tiny configs. For each
shape: random weights (norm gains around 1, everything else small noise) are saved with
`save_pretrained`, loaded with `vlmkit.load`, and image features, text features (a padded batch of
texts of different lengths, HF's tokenizer conventions: padding with <|endoftext|>) and logits are
compared with transformers' own. Prints one JSON line per model; exits 1 if any max abs difference
exceeds 1e-5.

    PYTHONPATH=src python benchmarks/parity_hf_clip_full.py [--models b32 b16 l14] [--activation quick_gelu]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

SHAPES = {
    "b32": dict(vision=(768, 12, 12, 32, 224), text=(512, 12, 8), projection=512),
    "b16": dict(vision=(768, 12, 12, 16, 224), text=(512, 12, 8), projection=512),
    "l14": dict(vision=(1024, 24, 16, 14, 224), text=(768, 12, 12), projection=768),
}


def _features(output):
    # transformers 4 returns the projected features; 5 returns an output whose pooler_output they are.
    return output if hasattr(output, "abs") else output.pooler_output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--activation", default="quick_gelu", choices=("quick_gelu", "gelu"))
    args = parser.parse_args()

    import torch
    import transformers

    import vlmkit

    transformers.logging.set_verbosity_error()
    worst = 0.0
    for name in args.models:
        shape = SHAPES[name]
        width, depth, heads, patch, size = shape["vision"]
        text_width, text_depth, text_heads = shape["text"]
        config = transformers.CLIPConfig(
            vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=heads,
                               patch_size=patch, image_size=size, hidden_act=args.activation),
            text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_depth,
                             num_attention_heads=text_heads, hidden_act=args.activation, pad_token_id=49407),
            projection_dim=shape["projection"],
        )
        generator = torch.Generator().manual_seed(0)
        with torch.device("meta"):
            hf = transformers.CLIPModel(config)
        state = {}
        for key, tensor in hf.state_dict().items():
            if key == "logit_scale":
                state[key] = torch.tensor(2.6592)
            elif tensor.ndim == 1 and key.endswith("weight"):  # norm gains
                state[key] = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
            else:
                state[key] = 0.02 * torch.randn(tensor.shape, generator=generator)
        hf.load_state_dict(state, assign=True)  # non-persistent buffers stay on meta: save only
        del state
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            hf = transformers.CLIPModel.from_pretrained(folder).eval()  # the reference, as users load it
            ours = vlmkit.load(folder)
        pixels = torch.randn(2, 3, size, size, generator=generator)
        ids = torch.randint(1, 49406, (3, 77), generator=generator)
        ids[:, 0] = 49406
        for row, end in enumerate((5, 20, 76)):
            ids[row, end:] = 49407  # <|endoftext|>, then padding with it (HF's openai convention)
        mask = (torch.arange(77)[None] <= torch.tensor([5, 20, 76])[:, None]).long()
        with torch.no_grad():
            output = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask)
            image_hf = _features(hf.get_image_features(pixel_values=pixels))
            text_hf = _features(hf.get_text_features(input_ids=ids, attention_mask=mask))
            image, text = ours.encode_image(pixels), ours.encode_text(ids)
            logits, _ = ours.logits(pixels, ids)
        result = {
            "model": name, "activation": args.activation, "parameters": sum(p.numel() for p in ours.parameters()),
            "image_max_abs_diff": (image - image_hf).abs().max().item(),
            "text_max_abs_diff": (text - text_hf).abs().max().item(),
            "logits_max_abs_diff": (logits - output.logits_per_image).abs().max().item(),
            "image_feature_mean_abs": image_hf.abs().mean().item(),
        }
        worst = max(worst, result["image_max_abs_diff"], result["text_max_abs_diff"], result["logits_max_abs_diff"])
        print(json.dumps(result))
        sys.stdout.flush()
        del hf, ours
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
