"""Whether `vlmkit serve` runs torch's CPU ops through oneDNN (`torch.backends.mkldnn`).

oneDNN builds and keeps a primitive (a compiled kernel) for every new input shape of the ops it
runs on CPU: exact GELU and convolutions here. A server sees batches of ever new shapes (texts
trimmed to the longest of their batch, any batch size, classify's labels x templates), so with
oneDNN its native memory grows and glibc's heap fragments around the kept primitives (README,
server section: 408 -> 483 MB over 40,000 requests of the load mix, against a flat 366 MB
without). Without oneDNN a transformer tower runs as fast (GELU falls back to torch's own kernel,
the ViT patchify is a matmul: `layers.patch.PatchEmbedding`), but a CNN runs several times slower.
So `auto` turns it on only for a model that is faster with it: one with convolutions (besides the
patchify) whose image tower runs at least `SPEEDUP_NEEDED` times faster with oneDNN, timed at
start-up on 16 random images (a tiny ViT's conv stem: ~1.05x, so off; a ResNet tower: 6-12x, so
on). A model with convolutions outside its image tower, or whose image tower does not run on
pixels alone (a dVAE), keeps oneDNN untimed.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from vlmkit.layers.patch import PatchEmbedding

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# oneDNN's memory growth is worth it only for a clearly faster model: a ResNet tower is 6-12x faster with
# it, a tiny ViT's conv stem (align-tiny) 0.9-1.3x depending on the process (AMD EPYC, 80 fresh processes; a
# threshold inside that range made the server's choice flip between restarts).
SPEEDUP_NEEDED = 1.5
TIMED_PAIRS = 5  # timed pairs (with, without oneDNN) for a model whose first pair is not clear-cut


def convolutions(module: nn.Module) -> list[nn.Module]:
    """The convolutions of `module`, the ViT patchify (a matmul) left out."""
    return [m for m in module.modules() if isinstance(m, CONVOLUTIONS) and not isinstance(m, PatchEmbedding)]


def timed_pair(tower: nn.Module, pixels: torch.Tensor) -> tuple[float, float]:
    """Seconds of one forward pass of `tower` on `pixels` with oneDNN, then of one without.

    Leaves oneDNN off; gradients are the caller's to turn off."""
    seconds = []
    for enabled in (True, False):
        torch.backends.mkldnn.enabled = enabled
        start = time.perf_counter()
        tower(pixels)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def onednn_wanted(models: dict, choice: str) -> bool:
    """`on` / `off` as asked; `auto`: on if any loaded model `onednn_pays`."""
    if choice != "auto":
        return choice == "on"
    return any(onednn_pays(model) for model in models.values())


def onednn_pays(model: nn.Module, images: int = 16) -> bool:
    """Whether `model` is served faster enough with oneDNN to be worth its memory growth (module docstring).

    Timed on `images` random images, not fewer: torch's own convolution falls behind oneDNN's only
    at larger batches (a small ResNet tower: 0.9x oneDNN's time at 4 images, 6x at 16, 5.7x at 32).
    One forward pass with oneDNN (building its primitives), then timed pairs (with oneDNN, without):
    one pair when its ratio is clear-cut (below 1 or above 3), else up to `TIMED_PAIRS`, judged by
    the median of their ratios, stopping once most of them lie on one side of `SPEEDUP_NEEDED`
    (clip-rn50 at 224 px, ~2x: three pairs, ~28 s on one thread on an AMD EPYC). The median, not
    the ratio of each side's fastest pass: one unusually fast pass decides a minimum (the serve fixture's
    conv-stem ViT, align-tiny, 40 fresh processes: ratio of minima up to 1.33 over 7 pairs, median
    of 5 pair ratios up to 1.17; over 80 processes the median reached 1.28 once, a process whose
    every pair ran ~1.27x: hence a threshold of 1.5x). A tiny tower takes well under a second.
    """
    convs = convolutions(model)
    if not convs:
        return False
    tower = model.tower("image") if "image" in getattr(model, "towers", {}) else None
    in_tower = {id(m) for m in convolutions(tower)} if tower is not None else set()
    if any(id(conv) not in in_tower for conv in convs) or any(p.device.type != "cpu" for p in model.parameters()):
        return True  # convolutions elsewhere (a detector head, a U-Net), or not on CPU: leave oneDNN as torch has it
    ratios, previous, training = [], torch.backends.mkldnn.enabled, tower.training  # time without / with
    tower.eval()
    try:
        pixels = model.dummy_batch(images)["pixels"]  # (B, 3, H, W) of the model's image size
        if pixels.ndim != 4:
            return True
        with torch.no_grad():
            torch.backends.mkldnn.enabled = True
            tower(pixels)  # oneDNN builds its primitives; first-call allocations
            while len(ratios) < TIMED_PAIRS:
                with_onednn, without = timed_pair(tower, pixels)
                ratios.append(without / with_onednn)
                faster = sum(ratio >= SPEEDUP_NEEDED for ratio in ratios)
                if len(ratios) == 1 and not 1.0 < ratios[0] < 2 * SPEEDUP_NEEDED:
                    break  # clear-cut at once
                if max(faster, len(ratios) - faster) > TIMED_PAIRS // 2:
                    break  # a majority on one side: more pairs cannot move the median across
    except Exception:  # noqa: BLE001 - no pixels to time, or a tower that does not run on them alone (a dVAE): keep oneDNN
        return True
    finally:
        torch.backends.mkldnn.enabled = previous
        tower.train(training)
    return statistics.median(ratios) >= SPEEDUP_NEEDED
