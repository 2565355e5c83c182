"""LXMERT training-step speed: vlmkit's `lxmert` family vs HF's LXMERT, same weights: a QA or a pre-training step.

`--task qa` (the default): a randomly initialised HF LxmertForQuestionAnswering (dropout 0, so both
sides compute the same function) is saved to a temporary folder and loaded by `vlmkit.load` (strict,
parity-tested in tests/interop/test_hf_lxmert.py). One step = forward on the same tokens / region
features / boxes, cross-entropy of the QA logits against the same labels, backward, AdamW step.

`--task pretrain`: HF `LxmertForPreTraining` against the family's own pre-training forward (what
`vlmkit train --recipe lxmert-tiny` runs) on the same weights and the same batch: masked language
modelling on 15% of the tokens of the matched pairs, image-text matching (half the pairs matched),
and masked object prediction on 15% of the matched pairs' regions (their features zeroed: feature
regression, object and attribute classes), HF given the very regions vlmkit's forward masks. The
losses are each side's own (LXMERT's: HF averages the region losses over all regions x 6.67,
vlmkit over the masked ones); HF's heads run on every position, vlmkit's only where a label is.
`--vocab 30522` is BERT's vocabulary, which LXMERT's checkpoints carry.

`--regions` visual tokens (36 in the paper), `--length` text tokens, batch `--batch`. The two alternate
in rounds in one process so machine noise hits both; read the ratio. Prints one JSON line per
measurement and a summary.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lxmert.py [--task qa|pretrain] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import vlmkit


def make_hf(args):
    from transformers import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering

    config = LxmertConfig(vocab_size=args.vocab, hidden_size=args.width, num_attention_heads=args.heads,
                          intermediate_size=4 * args.width, l_layers=args.l_layers, r_layers=args.r_layers,
                          x_layers=args.x_layers, visual_feat_dim=args.feat, visual_pos_dim=4, num_qa_labels=args.answers,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    torch.manual_seed(0)
    return (LxmertForPreTraining if args.task == "pretrain" else LxmertForQuestionAnswering)(config)


def pretraining_steps(args, hf, ours, optimizers, ids, feats, boxes, generator):
    """(HF step, vlmkit step) of a pre-training step on one batch: MLM on the matched pairs' masked tokens,
    ITM, and masked object prediction on the regions vlmkit's forward masks (HF is given the same ones)."""
    from vlmkit.encoders.fusion import IGNORE
    from vlmkit.encoders.twostream import mask_regions

    config = hf.config
    matched = torch.arange(args.batch) % 2 == 0  # (B,) half the pairs match
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & matched[:, None]  # (B, L) masked tokens
    chosen[0, 1] = True
    tokens = ids.masked_fill(chosen, 103)  # BERT's [MASK]
    mlm_labels = ids.masked_fill(~chosen, IGNORE)
    objects = torch.randint(config.num_object_labels, (args.batch, args.regions), generator=generator)
    attributes = torch.randint(config.num_attr_labels, (args.batch, args.regions), generator=generator)
    batch_seed = 7
    masked = mask_regions(matched[:, None].expand(args.batch, args.regions), ours.training_options.region_mask_probability,
                          torch.Generator().manual_seed(batch_seed))  # (B, N): what vlmkit's forward masks
    conf = masked.float()
    hf_inputs = dict(input_ids=tokens, attention_mask=torch.ones_like(tokens), visual_feats=feats.masked_fill(masked[..., None], 0.0),
                     visual_pos=boxes, labels=mlm_labels, matched_label=matched.long(),
                     obj_labels={"obj": (objects, conf), "attr": (attributes, conf), "feat": (feats, conf)})
    batch = {"tokens": tokens, "mlm_labels": mlm_labels, "itm_labels": matched.long(), "visual_feats": feats,
             "visual_pos": boxes, "region_labels": objects, "region_attr_labels": attributes, "batch_seed": batch_seed}
    print(json.dumps({"masked_tokens": int(chosen.sum()), "masked_regions": int(masked.sum()),
                      "hf_loss": round(hf(**hf_inputs).loss.item(), 4), "vlmkit_loss": round(ours(batch).loss.item(), 4)}))

    def step_hf():
        hf(**hf_inputs).loss.backward()
        optimizers["hf"].step(), optimizers["hf"].zero_grad(set_to_none=True)

    def step_vlmkit():
        ours(batch).loss.backward()
        optimizers["vlmkit"].step(), optimizers["vlmkit"].zero_grad(set_to_none=True)

    return step_hf, step_vlmkit


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=("qa", "pretrain"), default="qa")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per side per round")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--l-layers", type=int, default=3)
    parser.add_argument("--r-layers", type=int, default=2)
    parser.add_argument("--x-layers", type=int, default=2)
    parser.add_argument("--feat", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--answers", type=int, default=500)
    args = parser.parse_args()
    hf = make_hf(args)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = vlmkit.load(folder)
    hf.train(), ours.train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, args.vocab, (args.batch, args.length), generator=generator)
    feats = torch.rand(args.batch, args.regions, args.feat, generator=generator)
    corners = torch.rand(args.batch, args.regions, 2, 2, generator=generator).sort(dim=2).values
    boxes = corners.transpose(2, 3).reshape(args.batch, args.regions, 4)
    labels = torch.randint(args.answers, (args.batch,), generator=generator)
    attention = torch.ones_like(ids)
    optimizers = {"hf": torch.optim.AdamW(hf.parameters(), lr=1e-5), "vlmkit": torch.optim.AdamW(ours.parameters(), lr=1e-5)}

    if args.task == "pretrain":
        step_hf, step_vlmkit = pretraining_steps(args, hf, ours, optimizers, ids, feats, boxes, generator)
    else:
        def step_hf():
            logits = hf(input_ids=ids, attention_mask=attention, visual_feats=feats, visual_pos=boxes).question_answering_score
            F.cross_entropy(logits, labels).backward()
            optimizers["hf"].step(), optimizers["hf"].zero_grad(set_to_none=True)

        def step_vlmkit():
            F.cross_entropy(ours.answer_logits(ids, feats, boxes), labels).backward()
            optimizers["vlmkit"].step(), optimizers["vlmkit"].zero_grad(set_to_none=True)

    with torch.no_grad():  # the same function before any step
        difference = (ours.answer_logits(ids, feats, boxes)
                      - hf(input_ids=ids, attention_mask=attention, visual_feats=feats, visual_pos=boxes).question_answering_score)
    print(json.dumps({"max_abs_logit_difference": difference.abs().max().item()}))
    for step in (step_hf, step_vlmkit):  # warm-up
        step()
    times = {"hf": [], "vlmkit": []}
    for round_index in range(args.rounds):
        for name, step in (("hf", step_hf), ("vlmkit", step_vlmkit)) if round_index % 2 == 0 else \
                (("vlmkit", step_vlmkit), ("hf", step_hf)):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            elapsed = (time.perf_counter() - start) / args.steps
            times[name].append(elapsed)
            print(json.dumps({"round": round_index, "side": name, "seconds_per_step": round(elapsed, 4)}))
    hf_median, ours_median = statistics.median(times["hf"]), statistics.median(times["vlmkit"])
    print(json.dumps({"summary": f"lxmert {args.task} training step", "vocab": args.vocab, "batch": args.batch, "regions": args.regions, "length": args.length,
                      "width": args.width, "hf_s": round(hf_median, 4), "vlmkit_s": round(ours_median, 4),
                      "speedup": round(hf_median / ours_median, 3),
                      "speedup_best": round(min(times["hf"]) / min(times["vlmkit"]), 3), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
