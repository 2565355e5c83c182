"""Shared pieces of the training reliability tests (a uniquely named module: conftest.py belongs to the corpus).

A tiny CLIP (one 32-wide block per tower) on a 30-scene synthetic set: a step takes milliseconds, so
a test can train, break and resume runs many times.
"""
from __future__ import annotations

import json
from pathlib import Path

from vlmkit.cli import main

TINY = ["model.vision.depth=1", "model.text.depth=1", "model.vision.width=32", "model.text.width=32",
        "model.vision.heads=2", "model.text.heads=2", "model.embed_dim=16", "batch_size=4", "warmup_steps=2",
        "log_every=1"]


def make_data(folder: Path) -> Path:
    """The synthetic training set's JSONL (30 scenes with images)."""
    from vlmkit.data.synthetic import generate

    generate(folder, n=30, seed=3, progress=False)
    return folder / "train.jsonl"


def train_args(run: Path, data: Path | None, *extra: str, resume: bool = False) -> list[str]:
    """`vlmkit train` arguments for the tiny recipe (a fresh run needs `data`)."""
    args = ["train", "--out", str(run)]
    args += ["--resume"] if resume else ["--recipe", "clip-vit-tiny", "--data", str(data), *TINY]
    return args + list(extra)


def train(run: Path, data: Path | None, *extra: str, resume: bool = False) -> int:
    """Run `vlmkit train` in this process; its exit code."""
    return main(train_args(run, data, *extra, resume=resume))


def logged(run: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys) -> str:
    """The error the last command printed on stderr, checked to be one `vlmkit: error:` line."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("vlmkit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
