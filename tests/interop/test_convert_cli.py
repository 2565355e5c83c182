"""`vlmkit convert SRC DST --to ...` in both directions, through the real command line."""
import json
import subprocess
import sys

import torch
from interop_helpers import GOLDEN, features, hf_clip_config, save_hf_clip, transformers

import vlmkit


def _vlmkit(*args):
    """The real command line, in a subprocess (used once: each start costs seconds)."""
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", *map(str, args)], capture_output=True, text=True, timeout=120)


def _main(capsys, *args):
    """The same entry point in this process: (exit code, stdout, stderr)."""
    from vlmkit.cli import main

    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_convert_hf_to_vlmkit_and_back_to_hf(tmp_path, clip_tokenizer_dir, capsys):
    hf = save_hf_clip(tmp_path / "hf", hf_clip_config("gelu"), clip_tokenizer_dir, seed=3)
    done = _vlmkit("convert", tmp_path / "hf", tmp_path / "ours")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["family"] == "clip" and summary["to"] == "vlmkit"
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["family"] == "clip"
    code, out, err = _main(capsys, "convert", tmp_path / "ours", tmp_path / "hf2", "--to", "hf")
    assert code == 0, err
    again = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf2")).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = vlmkit.load(tmp_path / "ours").tokenize(["a red circle", "two green triangles"])
    with torch.no_grad():
        for get in ("get_image_features", "get_text_features"):
            inputs = {"pixel_values": pixels} if "image" in get else {"input_ids": ids}
            assert torch.allclose(features(getattr(hf, get)(**inputs)), features(getattr(again, get)(**inputs)), atol=1e-6, rtol=0)


def test_convert_openclip_file_to_hf(tmp_path, capsys):
    code, out, err = _main(capsys, "convert", GOLDEN / "openclip_vit_gelu.safetensors", tmp_path / "hf", "--to", "hf", "--activation", "gelu")
    assert code == 0, err
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == "gelu" and config["text_config"]["eos_token_id"] == 2  # argmax pooling


def test_convert_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    code, out, err = _main(capsys, "convert", GOLDEN / "openclip_rn.safetensors", tmp_path / "taken")
    assert code == 2 and "already exists" in err and out == ""
    code, out, err = _main(capsys, "convert", GOLDEN / "openclip_rn.safetensors", tmp_path / "rn_hf", "--to", "hf")
    assert code == 2 and "ResNet" in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no half-written or staging folder
