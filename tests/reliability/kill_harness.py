"""Kill `vlmkit train` with SIGKILL at chosen points, again and again, then let it finish.

Run by test_kill.py as `python kill_harness.py DATA OUT SEED KILLS STEPS`. This process imports torch
and vlmkit once and never computes, then forks one child per attempt (a fresh interpreter per
attempt would spend seconds importing torch each time). Each attempt is the command a user re-runs
after a crash: `--resume` once the run has a checkpoint, the original command before. Two kinds of
kill alternate:
- "save": the child counts its own calls of os.fsync / os.replace / os.rename (every atomic write
  and the checkpoint's staging rename go through them) and SIGKILLs itself just before call N, so
  it dies in the middle of writing the run folder, a checkpoint, the `latest` pointer or the log;
- "step": this process SIGKILLs the child as soon as metrics.jsonl reaches a chosen step, which is
  in the middle of training.
A reference run, forked the same way but never killed, trains into OUT/reference. One JSON line on
stdout describes the kills.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (imported before forking, once)

import vlmkit.models.clip  # noqa: F401
import vlmkit.train.trainer  # noqa: F401
from vlmkit import plots
from vlmkit.cli import main

plots.available()  # matplotlib too: every finished attempt draws its loss curve

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import train_args  # noqa: E402


def _die_at_io_call(number: int) -> None:
    """Make this process SIGKILL itself just before its `number`-th fsync/replace/rename."""
    calls = [0]

    def counted(real):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == number:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return wrapper

    for name in ("fsync", "replace", "rename"):
        setattr(os, name, counted(getattr(os, name)))


def _launch(argv: list[str], die_at: int | None = None) -> int:
    pid = os.fork()
    if pid == 0:  # the child: one `vlmkit train`, quiet
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if die_at is not None:
                _die_at_io_call(die_at)
            code = main(argv)
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def _steps_logged(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _attempt_args(run: Path, data: Path, steps: int) -> list[str]:
    extra = (f"steps={steps}", "save_every=3", "keep_checkpoints=2")
    if (run / "checkpoints" / "latest").exists():
        return train_args(run, None, *extra, resume=True)
    return train_args(run, data, *extra)


def main_harness(data: Path, out: Path, seed: int, kills: int, steps: int) -> dict:
    rng = random.Random(seed)
    _, status = os.waitpid(_launch(train_args(out / "reference", data, f"steps={steps}", "save_every=3", "keep_checkpoints=2")), 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the reference run failed"
    run = out / "killed"
    report = []
    while len([k for k in report if k["killed"]]) < kills:
        assert len(report) < 4 * kills, f"too few attempts were killed: {report}"
        kind = "save" if len(report) % 2 == 0 else "step"
        argv = _attempt_args(run, data, steps)
        resumed = "--resume" in argv
        if kind == "save":
            point = rng.randint(1, 24)
            _, status = os.waitpid(_launch(argv, die_at=point), 0)
        else:
            start = _steps_logged(run) if resumed else 0
            point = rng.randint(start + 1, steps - 1) if start + 1 < steps else steps
            pid = _launch(argv)
            while True:  # poll the log; kill the moment the chosen step is written
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if _steps_logged(run) >= point:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.002)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        code = None if killed else os.waitstatus_to_exitcode(status)
        assert killed or code == 0, f"attempt {len(report)} ({kind} at {point}) exited with {code}"
        report.append({"kind": kind, "point": point, "resumed": resumed, "killed": killed,
                       "leftovers": sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp")) if run.exists() else []})
        if not killed:  # it finished before the chosen point: start again from scratch for a real kill
            shutil.rmtree(run)
    _, status = os.waitpid(_launch(_attempt_args(run, data, steps)), 0)
    return {"kills": report, "final_exit": os.waitstatus_to_exitcode(status)}


if __name__ == "__main__":
    data_path, out_path, seed_, kills_, steps_ = sys.argv[1:6]
    torch.set_num_threads(1)
    print(json.dumps(main_harness(Path(data_path), Path(out_path), int(seed_), int(kills_), int(steps_))))
