"""VisualGPT: the self-resurrecting activation unit against its formula, and a decoder started from an LM run."""
import json

import pytest
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.layers.srau import PAPER_TAU, SelfResurrectingGate, srau_gates


def test_srau_gates_follow_the_formula_and_switch_off_at_tau():
    gate = torch.tensor([0.05, 0.15, 0.5, 0.85, 0.95])
    visual, linguistic = srau_gates(gate, tau=0.2)
    # B_vis = B * 1[B > tau], B_lan = (1 - B) * 1[(1 - B) > tau]
    assert torch.allclose(visual, torch.tensor([0.0, 0.0, 0.5, 0.85, 0.95]))
    assert torch.allclose(linguistic, torch.tensor([0.95, 0.85, 0.5, 0.0, 0.0]))
    assert int((visual == 0).sum()) == 2 and int((linguistic == 0).sum()) == 2  # exactly zero, not small
    assert bool(((visual > 0) | (linguistic > 0)).all())  # tau < 0.5: every channel keeps one side open
    visual, linguistic = srau_gates(gate, tau=0.0)  # no threshold: a plain sigmoid interpolation
    assert torch.allclose(visual, gate) and torch.allclose(linguistic, 1 - gate)
    assert PAPER_TAU == 0.2


def test_srau_module_mixes_language_and_vision_as_its_gate_says_and_reports_sparsity():
    torch.manual_seed(0)
    unit = SelfResurrectingGate(8, tau=0.3)
    with torch.no_grad():
        unit.fc.weight.mul_(8)  # spread the gates so that both thresholds bite
    language, visual = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    gate = torch.sigmoid(unit.fc(torch.cat([language, visual], dim=-1)))
    expected = gate * (gate > 0.3) * visual + (1 - gate) * ((1 - gate) > 0.3) * language
    out = unit(language, visual)
    assert torch.allclose(out, expected, atol=1e-6)
    off = (((gate <= 0.3).float().mean() + ((1 - gate) <= 0.3).float().mean()) / 2).item()
    assert 0 < off < 0.5 and abs(unit.last_sparsity.item() - off) < 1e-6
    # A switched-off channel takes the other side whole... scaled by its own gate, and gradients still reach W.
    only_language = gate <= 0.3
    assert torch.allclose(out[only_language], ((1 - gate) * language)[only_language], atol=1e-6)
    out.sum().backward()
    assert unit.fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="tau"):
        SelfResurrectingGate(8, tau=1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The built-in data (small), an LM pretrained on it, and VisualGPT started from that LM."""
    from vlmkit.data.synthetic import generate

    root = tmp_path_factory.mktemp("visualgpt")
    generate(root / "data", n=30, seed=4, progress=False)
    data = str(root / "data" / "train.jsonl")
    lm, visualgpt = root / "lm", root / "visualgpt"
    small = ["batch_size=4", "warmup_steps=1", "log_every=1", "threads=1"]
    assert main(["train", "--recipe", "lm-tiny", "--data", data, "--out", str(lm), "steps=3", "save_every=3",
                 "vocab_size=600", "model.lm.depth=2", "model.lm.width=64", "model.lm.mlp_hidden=128", *small]) == 0
    assert main(["train", "--recipe", "visualgpt-tiny", "--data", data, "--out", str(visualgpt), "steps=3", "save_every=3",
                 f"init_text={lm}", "lr=0.01", *small]) == 0
    return {"data": root / "data", "lm": lm, "visualgpt": visualgpt}


def test_init_text_copies_the_lm_into_the_decoder_and_the_fusion_is_new(runs):
    from vlmkit.interop.towers import PretrainedTowers
    from vlmkit.models.registry import get_family, named_config

    lm = vlmkit.load(runs["lm"])
    family, config = named_config("visualgpt-tiny")
    cls = get_family(family)
    towers = PretrainedTowers(str(runs["lm"]), None)
    config = cls.adapt_config_to_tokenizer(towers.configure(config, {}, cls), towers.tokenizer)
    models = {}
    for gate in ("srau", "plain"):
        torch.manual_seed(0)
        model = cls.from_config_dict({**config, "gate": gate})
        towers.load_into(model)
        for key, tensor in lm.lm.state_dict().items():
            assert torch.equal(model.lm.state_dict()[key], tensor), key
        models[gate] = model
    srau_keys = {key for key in models["srau"].state_dict() if ".gates." in key}
    assert len(srau_keys) == 2 * 3 * 2  # depth 2 blocks x 3 levels x (weight, bias) of Linear(2D -> D)
    assert not any(".gates." in key for key in models["plain"].state_dict())
    # The trained run: the decoder learned (not locked) from that start, the loss went down, gates were logged.
    trained = vlmkit.load(runs["visualgpt"])
    assert trained.config.lm.width == 64 and trained.tokenizer.vocab_size == lm.tokenizer.vocab_size
    assert any(not torch.equal(trained.lm.state_dict()[k], v) for k, v in lm.lm.state_dict().items())
    logs = [json.loads(line) for line in (runs["visualgpt"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert logs[-1]["loss"] < logs[0]["loss"] and all(0 <= log["gate_sparsity"] < 1 for log in logs)


def test_caption_and_eval_caption_through_the_generates_capability(runs, capsys):
    model = vlmkit.load(runs["visualgpt"])
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for beams in (1, 2):
        assert model.generate(pixels, num_beams=beams, max_new_tokens=6) == \
            model.generate(pixels, num_beams=beams, max_new_tokens=6, use_cache=False)
    test = runs["data"] / "test.jsonl"
    image = str(runs["data"] / json.loads(test.read_text().splitlines()[0])["image"])
    assert main(["caption", image, "--model", str(runs["visualgpt"]), "--max-new-tokens", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["captions"][0]["image"] == image
    assert main(["eval", "caption", "--model", str(runs["visualgpt"]), "--data", str(test), "--max-new-tokens", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] > 0 and result["CIDEr"] >= 0
