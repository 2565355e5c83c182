"""Train a CLIP with OpenCLIP's own trainer (open_clip_train.main) and write it as an OpenCLIP hub folder.

Runs in OpenCLIP's environment (setup.sh), never in vlmkit's: torchvision and open_clip live only there.
The folder (open_clip_config.json + open_clip_model.safetensors) is what `vlmkit.load` reads, so both
sides of the comparison are scored by the same evaluation code (`vlmkit eval zeroshot / retrieval`);
`--check` also scores zero-shot (top-1, top-5) with OpenCLIP's own model and tokenizer, to show the two agree;
it is the only scorer for an arch whose text tower is an HF model (`minilm-arch.json`), which vlmkit does
not read from an OpenCLIP folder.

Usage (OpenCLIP's python): oc_train.py --csv DATA/train.csv --arch arch.json --out RUN [--epochs 1 --batch 128
       --lr 5e-4 --wd 0.1 --warmup 100 --seed 0] [--check DATA/test.jsonl [--templates DATA/templates.txt]]
       [--hf-text MINILM_FOLDER with --arch minilm-arch.json: the pretrained text tower, loaded by transformers]
       [--init-text FILE: the text tower's starting weights from an OpenCLIP state dict (safetensors) of this arch,
        e.g. `vlmkit convert runs/distilled_text X --to openclip`; the image tower keeps OpenCLIP's own init]
--check scores the records with a 'label'; without --templates it uses vlmkit's default templates.
OpenCLIP counts epochs over CSV rows (one per image-caption pair): one epoch of a CSV with C captions
per image sees each image C times, in floor(rows / batch) steps.
"""
import argparse
import glob
import json
import os
import sys

import torch

MODEL = "side-by-side-arch"  # no "vit" in the name: open_clip_train then picks beta2 0.999, eps 1e-8
# `vlmkit eval zeroshot` without --templates (vlmkit.tasks.zeroshot.DEFAULT_TEMPLATES; vlmkit is not importable here)
VLMKIT_DEFAULT_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}.", "a rendering of a {}.")


def train(args) -> None:
    import open_clip
    from open_clip_train.main import main as openclip_main

    cfgdir = os.path.join(args.out, "cfg")
    os.makedirs(cfgdir, exist_ok=True)
    arch = json.load(open(args.arch))
    if args.hf_text:  # an HF text tower (its weights and tokenizer) from a local folder: no download
        arch["text_cfg"] = {**arch["text_cfg"], "hf_model_name": args.hf_text, "hf_tokenizer_name": args.hf_text}
    json.dump(arch, open(os.path.join(cfgdir, f"{MODEL}.json"), "w"))
    open_clip.add_model_config(cfgdir)
    if args.init_text:
        _start_text_tower_from(args.init_text)
    openclip_main([
        "--model", MODEL, "--train-data", args.csv, "--dataset-type", "csv", "--csv-img-key", "filepath",
        "--csv-caption-key", "title", "--csv-separator", ",", "--batch-size", str(args.batch),
        "--epochs", str(args.epochs), "--lr", str(args.lr), "--wd", str(args.wd), "--warmup", str(args.warmup),
        "--workers", "0", "--device", "cpu", "--precision", "fp32", "--logs", args.out, "--name", "oc",
        "--save-frequency", "1", "--seed", str(args.seed), "--log-every-n-steps", "20",
    ])
    checkpoint = sorted(glob.glob(os.path.join(args.out, "oc", "checkpoints", "epoch_*.pt")), key=os.path.getmtime)[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    state = {key.removeprefix("module."): value.contiguous() for key, value in state.items()}
    from safetensors.torch import save_file

    save_file(state, os.path.join(args.out, "open_clip_model.safetensors"))
    json.dump({"model_cfg": {**arch, "quick_gelu": False}, "preprocess_cfg": {}},
              open(os.path.join(args.out, "open_clip_config.json"), "w"))


TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _start_text_tower_from(path: str) -> None:
    """Make open_clip_train's model start its text tower (every key but `visual.*` and the logit scale) from
    `path`, loaded strictly for those keys; the image tower and the logit scale keep OpenCLIP's initialisation."""
    import open_clip_train.main as trainer
    from safetensors.torch import load_file

    text = {key: value for key, value in load_file(path).items() if key.startswith(TEXT_KEYS)}
    build = trainer.create_model_and_transforms

    def build_then_load(*args, **kwargs):
        built = build(*args, **kwargs)
        own = {key for key in built[0].state_dict() if key.startswith(TEXT_KEYS)}
        if own != set(text):
            sys.exit(f"--init-text {path}: text keys differ from the arch's: {sorted(own ^ set(text))[:5]}")
        built[0].load_state_dict(text, strict=False)
        print(f"text tower started from {path} ({len(text)} tensors)", file=sys.stderr)
        return built

    trainer.create_model_and_transforms = build_then_load


@torch.no_grad()
def check(args) -> None:
    """Zero-shot top-1 with OpenCLIP's own model, preprocessing and tokenizer (the cross-check)."""
    import open_clip
    from PIL import Image

    open_clip.add_model_config(os.path.join(args.out, "cfg"))
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(args.out, "open_clip_model.safetensors")))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    rows = [json.loads(line) for line in open(args.check) if line.strip()]
    rows = [row for row in rows if row.get("label") is not None]  # as `vlmkit eval zeroshot`: labelled records only
    classes = sorted({row["label"] for row in rows})
    templates = ([line.strip() for line in open(args.templates) if line.strip()] if args.templates
                 else list(VLMKIT_DEFAULT_TEMPLATES))
    weights = []
    for name in classes:
        text = torch.nn.functional.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
        weights.append(torch.nn.functional.normalize(text.mean(0), dim=0))
    weights = torch.stack(weights)
    root = os.path.dirname(args.check)
    images = torch.stack([preprocess(Image.open(os.path.join(root, row["image"])).convert("RGB")) for row in rows])
    features = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    labels = torch.tensor([classes.index(row["label"]) for row in rows])
    top5 = (features @ weights.T).topk(min(5, len(classes)), dim=1).indices  # (N, 5), best first
    top1 = top5[:, 0].eq(labels).float().mean().item()
    top5 = top5.eq(labels[:, None]).any(1).float().mean().item()
    print(json.dumps({"openclip_native_top1": top1, "openclip_native_top5": top5, "n": len(rows), "classes": len(classes)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--csv"), parser.add_argument("--arch"), parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=1), parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4), parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=100), parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check"), parser.add_argument("--templates")
    parser.add_argument("--hf-text", help="local HF model folder for an arch with an HF text tower (minilm-arch.json)")
    parser.add_argument("--init-text", help="an OpenCLIP state dict (safetensors) whose text tower the run starts from")
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.check_only:
        train(args)
    if args.check:
        check(args)
    sys.exit(0)
