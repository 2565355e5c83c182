"""Load time of an HF CLIP folder: vlmkit.load vs transformers.CLIPModel.from_pretrained, side by side.

A ViT-B/32-shaped random CLIPModel (151M parameters, ~600 MB of safetensors) is saved to a temporary
folder once; then the two loaders run alternately, several times each (the first run of each is a
warm-up that also fills the page cache), and the medians and their ratio are printed as one JSON
line. Both loaders build on the meta device and take the tensors from the memory-mapped file.

    PYTHONPATH=src python benchmarks/bench_load.py [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1: fair on a shared machine)")
    args = parser.parse_args()

    import torch
    import transformers

    import vlmkit

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        config = transformers.CLIPConfig(
            text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=32),
            projection_dim=512,
        )
        with torch.device("meta"):
            shell = transformers.CLIPModel(config)
        # Random weights without the slow init: every tensor gets normal noise directly.
        state = {name: torch.randn(tensor.shape) * 0.02 for name, tensor in shell.state_dict().items()}
        shell.load_state_dict(state, assign=True)
        shell.save_pretrained(folder)
        size = sum(path.stat().st_size for path in Path(folder).iterdir())
        del shell, state

        def time_vlmkit():
            start = time.perf_counter()
            model = vlmkit.load(folder)
            return time.perf_counter() - start, model

        def time_hf():
            start = time.perf_counter()
            model = transformers.CLIPModel.from_pretrained(folder)
            return time.perf_counter() - start, model

        times = {"vlmkit": [], "transformers": []}
        pixels = torch.randn(1, 3, 224, 224)
        for repeat in range(args.repeats + 1):
            for name, run in (("vlmkit", time_vlmkit), ("transformers", time_hf)) if repeat % 2 == 0 else (("transformers", time_hf), ("vlmkit", time_vlmkit)):
                seconds, model = run()
                if repeat == 0:  # warm-up; and check both loaded the same numbers
                    with torch.no_grad():
                        output = model.encode_image(pixels) if name == "vlmkit" else model.get_image_features(pixel_values=pixels)
                    times.setdefault("features", {})[name] = output if isinstance(output, torch.Tensor) else output.pooler_output
                else:
                    times[name].append(seconds)
                del model
        difference = (times["features"]["vlmkit"] - times["features"]["transformers"]).abs().max().item()
        ours, theirs = statistics.median(times["vlmkit"]), statistics.median(times["transformers"])
        print(json.dumps({
            "benchmark": "load ViT-B/32-shaped HF CLIP folder", "checkpoint_mb": round(size / 1e6, 1),
            "repeats": args.repeats, "threads": args.threads,
            "vlmkit_median_s": round(ours, 3), "transformers_median_s": round(theirs, 3),
            "ratio_vlmkit_over_transformers": round(ours / theirs, 3),
            "vlmkit_s": [round(t, 3) for t in times["vlmkit"]], "transformers_s": [round(t, 3) for t in times["transformers"]],
            "image_features_max_abs_diff": difference,
        }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
