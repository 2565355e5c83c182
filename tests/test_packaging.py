"""The built wheel, not the checkout, is a working vlmkit: recipes included, the CLI runs end to end.

The wheel is built from a copy of the sources, installed into a fresh virtual environment (no
system site-packages, so neither this checkout nor anything installed for the tests can leak in),
and driven from a folder outside the checkout: `vlmkit data synth`, `vlmkit train --recipe
clip-tiny` (the recipe must come from the wheel; matplotlib is absent, so the loss curve is
skipped with a note) and `vlmkit eval zeroshot`, each printing JSON.

torch goes in first, pinned, as the Makefile does (`VLMKIT_TORCH`, which `make test` sets from
its TORCH; by default the running torch's version): on this project's machines pip resolves it
to the CPU wheel on disk in about 25 s, and no requirement can then pull another build.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("VLMKIT_TORCH") or f"torch=={torch.__version__.split('+')[0]}"


def _run(command: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    return result


def _json_stdout(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout)  # the whole of stdout is one JSON object


def _runtime_requirements(wheel: Path) -> list[str]:
    """Requires-Dist lines of the wheel's METADATA that no extra asks for."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    requirements = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [requirement for requirement in requirements if "extra ==" not in requirement]


def test_the_installed_wheel_ships_the_recipes_and_runs_the_cli(tmp_path):
    started = phase_start = time.perf_counter()
    phases = {}

    def phase(name: str) -> None:
        nonlocal phase_start
        phases[name] = round(time.perf_counter() - phase_start)
        phase_start = time.perf_counter()

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"

    # Build from a copy, so the checkout gets no build/ or egg-info.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    wheels = tmp_path / "wheels"
    # The test environment's setuptools if it has one (Python < 3.12 venvs do), else pip's isolated build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", wheels, source], tmp_path, env)
    (wheel,) = wheels.glob("vlmkit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    shipped = {Path(name).stem for name in names if name.startswith("vlmkit/configs/") and name.endswith(".yaml")}
    assert shipped == {path.stem for path in (ROOT / "src" / "vlmkit" / "configs").glob("*.yaml")} and "clip-tiny" in shipped
    assert "vlmkit/assets/bpe_simple_vocab_16e6.txt.gz" in names
    assert {f"vlmkit/serve/static/{name}" for name in ("index.html", "app.js", "style.css")} <= names  # the web page
    phase("build")

    # A fresh environment: torch pinned first, then the wheel alone, then its runtime requirements.
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(environment)
    python, vlmkit = environment / "bin" / "python", environment / "bin" / "vlmkit"
    pip = [python, "-m", "pip", "install", "-q"]
    _run(pip + [TORCH], tmp_path, env, timeout=600)
    phase("venv + torch")
    installed_torch = _run([python, "-c", "import torch; print(torch.__version__)"], tmp_path, env).stdout.strip()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"torch=={installed_torch}\n")  # nothing may replace the pinned build
    _run(pip + ["--no-deps", wheel], tmp_path, env)
    _run(pip + ["-c", constraints] + _runtime_requirements(wheel), tmp_path, env, timeout=600)
    installed_at = Path(_run([python, "-c", "import vlmkit; print(vlmkit.__file__)"], tmp_path, env).stdout.strip())
    assert environment in installed_at.parents, installed_at
    phase("wheel + requirements")

    # Drive the CLI from a folder that is neither the checkout nor the source copy.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([vlmkit, "data", "synth", "--out", "data", "--n", "60", "--seed", "1", "--no-progress"], elsewhere, env)
    assert (elsewhere / "data" / "train.jsonl").is_file() and (elsewhere / "data" / "test.jsonl").is_file()
    trained = _run([vlmkit, "train", "--recipe", "clip-tiny", "--data", "data/train.jsonl", "--out", "run",
                    "steps=2", "batch_size=8", "warmup_steps=1", "save_every=2", "log_every=1"], elsewhere, env)
    summary = _json_stdout(trained)
    assert summary["steps"] == 2 and summary["loss"] == summary["loss"]  # finite, not NaN
    assert json.loads((elsewhere / "run" / "recipe.json").read_text())["model"] == "clip-rn-tiny"  # clip-tiny's model
    # The runtime alone has no matplotlib: the loss curve is skipped with a note, not a failure.
    assert not (elsewhere / "run" / "loss_curve.png").exists()
    assert "pip install 'vlmkit[plots]'" in trained.stderr
    evaluated = _run([vlmkit, "eval", "zeroshot", "--model", "run", "--data", "data/test.jsonl"], elsewhere, env)
    scores = _json_stdout(evaluated)
    assert 0.0 <= scores["top1"] <= 1.0
    phase("cli")
    print(f"packaging test: {time.perf_counter() - started:.0f} s, {phases}", file=sys.stderr)
