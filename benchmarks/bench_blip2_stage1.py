"""BLIP-2 stage-1 training-step speed: vlmkit's `blip2` family vs HF transformers' `Blip2QFormerModel`
with the same three losses written around it, at the same configuration.

Both sides read the same precomputed frozen-ViT features (B, N, W): the image encoder is frozen in
stage 1 on both sides, so what is timed is the Q-Former and its losses. One step = ITC (max over the
queries, both directions, label smoothing 0.1) + ITM (each text with a hard-negative image and each
image with a hard-negative text, drawn from the softmax similarities with the positive excluded) +
ITG ([DEC] caption under the multimodal causal mask, next-token cross-entropy), backward, AdamW.

The HF side is written as LAVIS's `Blip2Qformer.forward` does it: ITC runs the queries (with the image)
and the text (alone, `query_length=0`) in two passes, ITM and ITG pass [queries ; text] with a 4-D mask
(`vlmkit.layers.masks.qformer_mask`, the masks the paper defines and vlmkit's tests check); vlmkit runs
ITC in one pass under the unimodal mask. The models have random weights of the same shape (HF's
stage-1 Q-Former has no saved-checkpoint class to share weights through); dropout is 0 on both sides.
The two alternate in rounds in one process so machine noise hits both; read the ratio.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_blip2_stage1.py [--batch 16] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import vlmkit
from vlmkit.layers.masks import qformer_mask
from vlmkit.losses import sample_hard_negatives

SMOOTHING = 0.1


class HFStage1(nn.Module):
    """LAVIS's stage-1 heads around HF's Q-Former: query tokens, text embeddings, projections, ITM and LM heads."""

    def __init__(self, args) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

        config = Blip2QFormerConfig(
            vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=args.heads,
            intermediate_size=4 * args.width, cross_attention_frequency=2, encoder_hidden_size=args.image_width,
            max_position_embeddings=args.length, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            use_qformer_text_input=True, layer_norm_eps=1e-12, pad_token_id=0)
        config._attn_implementation = "sdpa"
        self.query_tokens = nn.Parameter(torch.randn(1, args.queries, args.width) * 0.02)
        self.embeddings = Blip2TextEmbeddings(config)
        self.qformer = Blip2QFormerModel(config)
        self.vision_proj = nn.Linear(args.width, args.embed)
        self.text_proj = nn.Linear(args.width, args.embed)
        self.itm_head = nn.Linear(args.width, 2)
        self.lm_transform = nn.Sequential(nn.Linear(args.width, args.width), nn.GELU(),
                                          nn.LayerNorm(args.width, eps=1e-12))
        self.lm_bias = nn.Parameter(torch.zeros(args.vocab))
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.num_queries = args.queries
        self.dec_id = args.vocab - 1

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        size, nq = tokens.shape[0], self.num_queries
        queries = self.query_tokens.expand(size, -1, -1)
        real = tokens != 0  # (B, T)

        # ITC: queries with the image, then the text alone; similarity = max over queries.
        query_out = self.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state  # (B, Nq, D)
        text_out = self.qformer(query_embeds=self.embeddings(input_ids=tokens), query_length=0,
                                attention_mask=real.long()).last_hidden_state  # (B, T, D)
        image_feats = F.normalize(self.vision_proj(query_out), dim=-1)  # (B, Nq, E)
        text_feat = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)  # (B, E)
        sim_i2t = torch.einsum("iqe,te->itq", image_feats, text_feat).amax(-1) / self.temperature  # (B, B)
        sim_t2i = sim_i2t.T
        labels = torch.arange(size)
        itc = (F.cross_entropy(sim_i2t, labels, label_smoothing=SMOOTHING)
               + F.cross_entropy(sim_t2i, labels, label_smoothing=SMOOTHING)) / 2

        # ITM: [pairs ; texts with hard-negative images ; images with hard-negative texts], all see all.
        negative_images = sample_hard_negatives(sim_t2i.detach(), None)
        negative_texts = sample_hard_negatives(sim_i2t.detach(), None)
        itm_image = torch.cat([image, image[negative_images], image])
        itm_tokens = torch.cat([tokens, tokens, tokens[negative_texts]])
        itm_queries = self.query_tokens.expand(3 * size, -1, -1)
        embeds = self.embeddings(input_ids=itm_tokens, query_embeds=itm_queries)
        hidden = self.qformer(query_embeds=embeds, query_length=nq, encoder_hidden_states=itm_image,
                              attention_mask=qformer_mask("itm", nq, itm_tokens != 0)).last_hidden_state
        itm_logits = self.itm_head(hidden[:, :nq]).mean(1)
        itm_labels = torch.cat([torch.ones(size), torch.zeros(2 * size)]).long()
        itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: [queries ; [DEC] caption] under the multimodal causal mask.
        inputs = tokens[:, :-1].clone()
        inputs[:, 0] = self.dec_id
        embeds = self.embeddings(input_ids=inputs, query_embeds=queries)
        hidden = self.qformer(query_embeds=embeds, query_length=nq, encoder_hidden_states=image,
                              attention_mask=qformer_mask("itg", nq, inputs != 0)).last_hidden_state[:, nq:]
        logits = self.lm_transform(hidden) @ self.embeddings.word_embeddings.weight.T + self.lm_bias
        targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == 0, -100)
        itg = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=SMOOTHING)
        return itc + itm + itg


def make_ours(args):
    ours = vlmkit.create_model("blip2-tiny", **{
        "embed_dim": args.embed, "num_query_tokens": args.queries, "dec_token_id": args.vocab - 1,
        "vision.width": args.image_width, "vision.depth": 1, "vision.heads": 4,
        "text.vocab_size": args.vocab, "text.context_length": args.length, "text.width": args.width,
        "text.depth": args.depth, "text.heads": args.heads, "text.eos_token_id": 3})
    # Both sides read the same frozen-ViT features: bypass the (frozen) tower and its norm.
    ours.query_encoder.image_features = lambda features: features
    return ours


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32, help="text tokens")
    parser.add_argument("--image-tokens", type=int, default=257, help="frozen-ViT features per image (16 x 16 + 1)")
    parser.add_argument("--image-width", type=int, default=384)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per side per round")
    args = parser.parse_args()

    torch.manual_seed(0)
    hf, ours = HFStage1(args).train(), make_ours(args).train()
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(args.batch, args.image_tokens, args.image_width, generator=generator)
    tokens = torch.randint(5, args.vocab - 1, (args.batch, args.length), generator=generator)
    tokens[:, 0] = 2  # [CLS]
    lengths = torch.randint(args.length // 2, args.length + 1, (args.batch,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        tokens[row, length - 1] = 3  # [SEP]
        tokens[row, length:] = 0  # padding
    batch = {"pixels": image, "tokens": tokens}

    sides = {
        "hf": (hf, lambda: hf(image, tokens)),
        "vlmkit": (ours, lambda: ours(batch).loss),
    }
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for name, (model, _) in sides.items()}

    def step(name: str) -> float:
        loss = sides[name][1]()
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return float(loss)

    for name in sides:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        for name in sides:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - start) / args.steps)
        print(json.dumps({"round": round_index, **{f"{name}_step_s": round(times[name][-1], 4) for name in sides}}))
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "threads": torch.get_num_threads(), "batch": args.batch, "queries": args.queries, "width": args.width,
        "depth": args.depth, "text_tokens": args.length, "image_tokens": args.image_tokens,
        "hf_best_s": round(best["hf"], 4), "vlmkit_best_s": round(best["vlmkit"], 4),
        "speedup_best": round(best["hf"] / best["vlmkit"], 3), "speedup_median": round(median["hf"] / median["vlmkit"], 3),
    }))


if __name__ == "__main__":
    main()
