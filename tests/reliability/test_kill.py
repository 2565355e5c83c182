"""Issue #18's kill test: `kill -9` at random points (seeded), during steps and during saves, then
resume: the losses are those of an uninterrupted run, no temporary file is left and metrics.jsonl
holds each step exactly once. The mechanics are in kill_harness.py (one process that forks each attempt)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from train_helpers import logged, make_data

STEPS, KILLS = 12, 6


def test_runs_killed_at_random_points_resume_to_the_uninterrupted_losses(tmp_path):
    data = make_data(tmp_path / "data")
    harness = Path(__file__).with_name("kill_harness.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(harness), str(data), str(tmp_path), "18", str(KILLS), str(STEPS)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    kills = [kill for kill in report["kills"] if kill["killed"]]
    assert len(kills) == KILLS and report["final_exit"] == 0, report
    assert {kill["kind"] for kill in kills} == {"save", "step"}
    assert any(kill["resumed"] for kill in kills), report  # a resumed attempt was killed too
    assert any(kill["leftovers"] for kill in kills), report  # some kill did land inside an atomic write

    reference, killed = logged(tmp_path / "reference"), logged(tmp_path / "killed")
    assert [row["step"] for row in killed] == list(range(1, STEPS + 1))  # each step once
    assert [row["loss"] for row in killed] == [row["loss"] for row in reference]  # bit-identical
    assert not list((tmp_path / "killed").rglob("*.tmp"))
    checkpoints = sorted(path.name for path in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["latest", f"step-{STEPS - 3:07d}", f"step-{STEPS:07d}"]
