"""Why `vlmkit serve` runs without oneDNN for transformer models: it keeps native memory per input shape.

The server sees batches of ever new shapes (texts trimmed to the longest in the batch, any batch
size); oneDNN builds and keeps a primitive for each new shape of the ops it runs (exact GELU,
convolutions), so the server's memory grew with the variety of its traffic (README, server
section). These tests pin the choice (`serve.onednn`) and the effect it is made for.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.serve.onednn import onednn_pays, onednn_wanted


def test_auto_keeps_onednn_only_for_models_that_are_faster_with_it(model_runs):
    vit, with_stem, cnn = (vlmkit.load(model_runs[family]) for family in ("blip", "clip", "vsepp"))
    assert not onednn_pays(vit)  # no convolution: its patchify is a matmul (layers.patch.PatchEmbedding), not timed
    assert not onednn_pays(with_stem)  # align-tiny's conv stem: ~1.05x (0.9-1.3x by process), under 1.5x
    assert onednn_pays(cnn)  # a ResNet tower: 6-12x slower without it at 16 images
    assert not onednn_wanted({"vit": vit, "clip": with_stem}, "auto") and onednn_wanted({"vit": vit, "cnn": cnn}, "auto")
    assert onednn_wanted({"vit": vit}, "on") and not onednn_wanted({"cnn": cnn}, "off")
    assert onednn_pays(vlmkit.load(model_runs["vild"]))  # convolutions outside its image tower (the RPN head): kept
    assert onednn_pays(vlmkit.load(model_runs["dvae"]))  # an image tower that is not run on pixels alone: kept, untimed


PROBE = """
import ctypes, json, sys, threading, torch, vlmkit
torch.set_num_threads(1)
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
model = vlmkit.load(sys.argv[1]).eval()
size, context, kept = model.dummy_batch(1)["pixels"].shape[-1], model.tokenizer.context_length, {}

def batches(sizes):  # image and text batches of these sizes, in this thread
    for n in sizes:
        model.encode_image(torch.randn(n, 3, size, size))
        model.encode_text(torch.randint(1, 400, (n, context)))

def work():  # a thread of its own, as the server's model thread (its own malloc arena)
    with torch.no_grad():
        phases = (("off", False, 4), ("on", True, 44))
        beyond = max(first for *_, first in phases) + 40  # a batch size larger than any measured below
        for name, onednn, first in phases:
            torch.backends.mkldnn.enabled = onednn
            # First-call allocations that are not per shape: small batches, and one larger than any measured
            # (MKL's GEMM keeps a work buffer sized by the largest matmul so far, ~1.4 MB on an AMD EPYC;
            # a high-water mark, not memory per shape, which is what this measures).
            batches([*range(first - 3, first), beyond])
            start = libc.mallinfo2().uordblks
            batches(range(first, first + 40))  # 80 batch shapes this process has not seen
            kept[name] = libc.mallinfo2().uordblks - start

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps(kept))
"""


def test_without_onednn_new_batch_shapes_keep_no_native_memory(model_runs, tmp_path):
    """In a fresh process (the test process's own state blurs glibc's counters): native bytes kept
    after 80 image and text batches of new sizes, oneDNN off then on."""
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("glibc's mallinfo2 is not available here")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), model_runs["clip"]], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kept = json.loads(done.stdout.strip().splitlines()[-1])
    assert kept["off"] < 512 * 1024, f"{kept['off'] / 2**20:.2f} MB kept over 80 new batch shapes without oneDNN"
    assert kept["on"] > 4 * 2**20 and kept["on"] > 8 * kept["off"], kept  # what oneDNN keeps (measured ~5.5 MB)
