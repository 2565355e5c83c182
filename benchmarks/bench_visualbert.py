"""A VisualBERT pre-training step (MLM + ITM, forward + backward + AdamW) of vlmkit's `visualbert` against HF's
`VisualBertForPreTraining` at the same configuration and the same weights (vlmkit loads HF's folder), timed
side by side in one run, alternating, so a noisy shared machine slows both alike. Prints one JSON object with
the median step times and the ratio (HF time / vlmkit time: above 1 = vlmkit faster).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_visualbert.py [--steps 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text", type=int, default=24, help="text tokens per sample")
    parser.add_argument("--regions", type=int, default=36, help="visual tokens per sample (the papers' 36 boxes)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import transformers

    import vlmkit
    from vlmkit.encoders.fusion import IGNORE, masked_lm_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = transformers.VisualBertConfig(vocab_size=4096, hidden_size=args.width, num_hidden_layers=args.layers,
                                           num_attention_heads=args.width // 64, intermediate_size=4 * args.width,
                                           visual_embedding_dim=2048, max_position_embeddings=64, pad_token_id=0,
                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = transformers.VisualBertForPreTraining(config)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = vlmkit.load(folder)
    hf, ours = hf.to(device).train(), ours.to(device).train()

    tokens = torch.randint(5, 4096, (args.batch, args.text), device=device)
    tokens[::2, args.text - 4:] = 0  # padding in half of the rows
    text_mask = (tokens != 0).long()
    embeds = torch.randn(args.batch, args.regions, 2048, device=device)
    visual_mask = torch.ones(args.batch, args.regions, dtype=torch.long, device=device)
    labels = torch.full_like(tokens, IGNORE)
    labels[:, 1:4] = tokens[:, 1:4]
    matched = torch.randint(0, 2, (args.batch,), device=device)  # vlmkit: 1 = match
    hf_labels = torch.cat([labels, torch.full((args.batch, args.regions), IGNORE, device=device)], dim=1)

    def hf_step(optimizer):
        out = hf(input_ids=tokens, attention_mask=text_mask, visual_embeds=embeds, visual_attention_mask=visual_mask,
                 labels=hf_labels, sentence_image_labels=1 - matched)  # HF: 0 = match
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def our_step(optimizer):
        hidden = ours.encode(tokens, embeds, visual_mask.bool())  # what VisualBert.forward runs in pre-training
        loss = masked_lm_loss(ours.mlm_logits, hidden[:, :tokens.shape[1]], labels) + F.cross_entropy(ours.heads.itm(ours.pool(hidden)), matched)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    optimizers = {"hf": torch.optim.AdamW(hf.parameters(), lr=1e-5), "vlmkit": torch.optim.AdamW(ours.parameters(), lr=1e-5)}
    steps = {"hf": hf_step, "vlmkit": our_step}
    times: dict[str, list[float]] = {"hf": [], "vlmkit": []}
    for index in range(args.warmup + args.steps):
        for name in (("hf", "vlmkit") if index % 2 == 0 else ("vlmkit", "hf")):  # alternate who goes first
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name](optimizers[name])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    hf_median, our_median = statistics.median(times["hf"]), statistics.median(times["vlmkit"])
    result = {"hf_step_s": round(hf_median, 4), "vlmkit_step_s": round(our_median, 4),
              "speedup": round(hf_median / our_median, 3), "device": str(device), "threads": torch.get_num_threads(),
              "config": {k: getattr(args, k) for k in ("batch", "width", "layers", "text", "regions", "steps")}}
    print(json.dumps(result))
    print(f"VisualBERT pre-training step: vlmkit {our_median * 1000:.1f} ms, HF {hf_median * 1000:.1f} ms, "
          f"ratio {hf_median / our_median:.2f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
