"""VisualBERT and the shared fusion pieces: UNITER's losses against their formulas, BERT masking, the
pre-train -> fine-tune path (`--init RUN task=...`), eval through capabilities with the records' boxes,
and `vlmkit match` for VisualBERT and BLIP."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vlmkit.encoders.fusion import IGNORE, keep_fresh_heads, mask_tokens
from vlmkit.errors import UserError
from vlmkit.losses import (ipot_plan, masked_region_feature_loss, masked_region_kl_loss, optimal_transport_distance,
                           word_region_alignment_loss)


# ---- losses against their formulas ------------------------------------------------------------

def test_masked_region_losses_follow_their_formulas():
    generator = torch.Generator().manual_seed(0)
    predicted, target = torch.randn(2, 4, 5, generator=generator), torch.randn(2, 4, 5, generator=generator)
    masked = torch.tensor([[True, False, True, False], [False, False, False, True]])
    expected = sum(((predicted[b, t] - target[b, t]) ** 2).sum() for b, t in masked.nonzero().tolist()) / (3 * 5)
    assert torch.allclose(masked_region_feature_loss(predicted, target, masked), expected)
    logits = torch.randn(2, 4, 3, generator=generator)
    distribution = torch.softmax(torch.randn(2, 4, 3, generator=generator), -1)
    distribution[0, 0] = torch.tensor([0.0, 1.0, 0.0])  # a zero entry contributes 0 (0 log 0)
    kl = []
    for b, t in masked.nonzero().tolist():
        p, q = distribution[b, t], torch.softmax(logits[b, t], -1)
        kl.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()) if pi > 0))
    assert masked_region_kl_loss(logits, distribution, masked).item() == pytest.approx(sum(kl) / len(kl), rel=1e-5)
    assert masked_region_feature_loss(predicted, target, torch.zeros_like(masked)).item() == 0.0


def _ipot_reference(cost, beta=0.5, iterations=50):
    """IPOT (Xie et al. 2018, Algorithm 1) for one pair, written as the paper's loops over uniform marginals."""
    m, n = len(cost), len(cost[0])
    a = [[math.exp(-cost[i][j] / beta) for j in range(n)] for i in range(m)]
    plan = [[1.0] * n for _ in range(m)]
    sigma = [1.0 / n] * n
    for _ in range(iterations):
        q = [[a[i][j] * plan[i][j] for j in range(n)] for i in range(m)]
        delta = [1.0 / (m * sum(q[i][j] * sigma[j] for j in range(n))) for i in range(m)]
        sigma = [1.0 / (n * sum(q[i][j] * delta[i] for i in range(m))) for j in range(n)]
        plan = [[delta[i] * q[i][j] * sigma[j] for j in range(n)] for i in range(m)]
    return torch.tensor(plan, dtype=torch.float64)


def test_ipot_plan_matches_the_algorithm_and_ignores_padding():
    generator = torch.Generator().manual_seed(1)
    text, image = torch.randn(1, 3, 8, generator=generator, dtype=torch.float64), torch.randn(1, 4, 8, generator=generator,
                                                                                                dtype=torch.float64)
    cost = 1 - torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(image, dim=-1).transpose(1, 2)
    real_t, real_i = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    plan = ipot_plan(cost, real_t, real_i)
    assert torch.allclose(plan[0], _ipot_reference(cost[0].tolist()), atol=1e-10)
    # uniform marginals: exact over regions (the last update), close over words (one inner step per iteration)
    assert torch.allclose(plan.sum(1), torch.full((1, 4), 1 / 4, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(plan.sum(2), torch.full((1, 3), 1 / 3, dtype=torch.float64), atol=1e-3)
    # the same pair padded with a word and two regions: the same plan on the real part, no mass elsewhere
    padded_t = torch.cat([text, torch.randn(1, 1, 8, dtype=torch.float64)], 1)
    padded_i = torch.cat([image, torch.randn(1, 2, 8, dtype=torch.float64)], 1)
    mask_t, mask_i = torch.tensor([[True] * 3 + [False]]), torch.tensor([[True] * 4 + [False] * 2])
    distance = optimal_transport_distance(padded_t, padded_i, mask_t, mask_i)
    assert distance.item() == pytest.approx((cost[0] * plan[0]).sum().item(), abs=1e-6)
    both = torch.cat([padded_t, padded_t]), torch.cat([padded_i, padded_i])
    wra = word_region_alignment_loss(*both, torch.cat([mask_t, mask_t]), torch.cat([mask_i, mask_i]),
                                     torch.tensor([True, False]))
    assert abs(wra.item()) < 1e-9  # matched distance - unmatched distance of the same pair


def test_bert_masking_and_fresh_heads():
    tokens = torch.randint(5, 100, (64, 30), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    maskable[:, 0] = False
    masked, labels = mask_tokens(tokens, maskable, 4, 100, 0.15, torch.Generator().manual_seed(1))
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and torch.equal(labels[chosen], tokens[chosen])
    assert 0.12 < chosen.float().mean() < 0.18
    assert 0.72 < (masked[chosen] == 4).float().mean() < 0.88  # 80% [MASK]
    assert torch.equal(masked[~chosen], tokens[~chosen])
    state = {"heads.answer.logit_fc.3.weight": torch.zeros(5, 8), "bert.x": torch.ones(2)}
    expected = {"heads.answer.logit_fc.3.weight": torch.ones(7, 8), "bert.x": torch.zeros(2)}
    fitted = keep_fresh_heads(state, expected)
    assert fitted["heads.answer.logit_fc.3.weight"].shape == (7, 8) and torch.equal(fitted["bert.x"], torch.ones(2))


# ---- training and evaluation, end to end --------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vlmkit.data.synthetic import generate
    from vlmkit.train.recipe import load_recipe
    from vlmkit.train.trainer import Trainer

    root = tmp_path_factory.mktemp("visualbert")
    generate(root / "data", n=30, seed=5, progress=False)
    data = str(root / "data" / "train.jsonl")
    common = {"steps": 2, "batch_size": 6, "save_every": 2, "log_every": 1, "warmup_steps": 1}
    Trainer(load_recipe("visualbert-tiny", common), data, root / "pre").train()
    Trainer(load_recipe("visualbert-tiny", {**common, "init": str(root / "pre"), "task": "vqa"}), data, root / "vqa").train()
    Trainer(load_recipe("blip-tiny", {**common, "steps": 1, "save_every": 1}), data, root / "blip").train()
    return root


def test_pretrain_then_finetune_keeps_the_encoder_and_logs_the_task(runs):
    from vlmkit.io import load_safetensors

    pre, vqa = load_safetensors(runs / "pre" / "model.safetensors"), load_safetensors(runs / "vqa" / "model.safetensors")
    assert set(pre) == set(vqa)
    assert json.loads((runs / "vqa" / "recipe.json").read_text())["task"] == "vqa"
    # two fine-tuning steps moved the encoder only a little from the pre-trained weights
    key = "bert.transformer.blocks.0.attn.qkv.weight"
    assert 0 < (pre[key] - vqa[key]).abs().max() < 0.05


def test_eval_vqa_reads_the_records_boxes_and_task_errors(runs):
    import vlmkit
    from vlmkit.data.formats import read_records
    from vlmkit.models.registry import get_family
    from vlmkit.tasks.generative import evaluate_vqa
    from vlmkit.train.recipe import family_training_options, load_recipe

    model = vlmkit.load(runs / "vqa")
    records = read_records(str(runs / "data" / "test.jsonl"))
    regions = model.region_inputs(records[:3])
    counts = [len(r.get("objects") or []) for r in records[:3]]
    assert regions["region_mask"].sum(1).tolist() == counts
    classes = list(model.config.region_classes)  # an object name never seen in training is -1
    names = [obj["name"] for r in records[:3] for obj in r["objects"]]
    assert regions["region_labels"][regions["region_mask"]].tolist() == [classes.index(n) if n in classes else -1 for n in names]
    result = evaluate_vqa(model, records)
    assert 0 <= result["accuracy"] <= 1 and result["n"] == sum(len(r["qa"]) for r in records)
    with pytest.raises(UserError, match="drop task=vqa"):
        family_training_options(load_recipe("clip-tiny", {"task": "vqa"}), get_family("clip"))
    with pytest.raises(UserError, match="unknown fusion task"):
        get_family("visualbert").parse_training_options({"task": "caption"})


@pytest.mark.parametrize("run", ["vqa", "blip"])
def test_match_prints_probabilities(runs, run, capsys):
    from vlmkit.cli import main

    image = str(runs / "data" / "images" / "test-000000.png")
    assert main(["match", image, "a red circle", "two shapes", "--model", str(runs / run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["text"] for m in result["matches"]] == ["a red circle", "two shapes"]
    assert all(0 <= m["probability"] <= 1 for m in result["matches"])
    assert main(["match", image, " ", "--model", str(runs / run)]) == 2


def test_fusion_dataset_batches_carry_their_task_and_skip_bad_boxes(runs):
    from vlmkit.data.formats import read_records
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.encoders.fusion import BAD_BOXES, FusionTaskDataset, FusionTraining
    from vlmkit.encoders.regions import VisualInputConfig
    from vlmkit.tokenizers import Tokenizer

    records = read_records(str(runs / "data" / "train.jsonl"))[:4]
    records[1] = {**records[1], "objects": [{"name": "red circle", "box": [10, 10, 10, 30]}]}  # zero width
    tokenizer = Tokenizer.load(runs / "pre")
    for task, keys in (("pretrain", {"mlm_labels", "itm_labels"}), ("vqa", {"answer_scores"}),
                       ("reasoning", {"statement_labels"}), ("retrieval", {"itm_labels"})):
        dataset = FusionTaskDataset(records, ImageTransform(64, train=True), tokenizer, FusionTraining(task=task),
                                    "visualbert", ["2", "yes", "no"], ["red circle"], VisualInputConfig(), 64, 1024)
        batch = dataset.collate([dataset[i] for i in range(4)])
        targets = {"mlm_labels", "itm_labels", "answer_scores", "statement_labels"} & set(batch)
        assert targets == keys, task
        assert batch["num_skipped"] == 1 and batch["skip_reasons"] == {BAD_BOXES: 1} and len(batch["pixels"]) == 3
        assert batch["boxes"].shape[:2] == batch["region_mask"].shape and batch["region_mask"].sum(1).tolist() == [
            len(records[i]["objects"]) for i in (0, 2, 3)]


def test_grounding_probe_masks_each_colour_and_shape_word_and_scores_both_images(runs):
    """scripts/grounding_probe.py (the README's "Which pre-training reads the image"): every one-token colour /
    shape word of a caption is masked once, and the two scores are fractions of those words."""
    import importlib.util
    from pathlib import Path

    from vlmkit.data.formats import read_records

    script = Path(__file__).resolve().parents[2] / "scripts" / "grounding_probe.py"
    spec = importlib.util.spec_from_file_location("grounding_probe", script)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    records = [r for r in read_records(str(runs / "data" / "test.jsonl")) if r.get("objects") and r.get("texts")]
    parts = probe.object_parts(records)
    import vlmkit

    tokenizer = vlmkit.load(runs / "pre").tokenizer
    items = probe.masked_words(records, tokenizer, parts)
    assert items and all(int((row == tokenizer.mask_id).sum()) == 1 and row[position] == tokenizer.mask_id
                         for _, _, row, position, _ in items)
    probed_words = sum(word in parts["colour"] | parts["shape"] for r in records for word in probe.caption_words(r["texts"][0]))
    assert len(items) <= probed_words
    result = probe.probe(str(runs / "pre"), records, parts)
    assert sum(result["words"].values()) == len(items)
    assert all(0.0 <= result[f"{part}_{which}_image"] <= 1.0 for part in parts for which in ("own", "other"))
    assert -1.0 <= result["fused_visual_cosine"] <= 1.0
