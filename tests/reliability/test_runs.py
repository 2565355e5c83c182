"""Issue #18, "runs that mix up", resume tracebacks and the small ones: a locked run folder, fresh and
truncated logs, damaged checkpoints and run files, a full disk, leftovers, the latest pointer, umask."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from vlmkit.cli import main

from train_helpers import logged, make_data, one_line_error, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("runs-data"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (never modified: tests copy it)."""
    run = tmp_path_factory.mktemp("runs-finished") / "run"
    assert train(run, data, "steps=4", "save_every=2", "keep_checkpoints=3") == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, as if it had died right after its step-2 checkpoint."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "checkpoints" / "step-0000004")
    (copy / "checkpoints" / "latest").write_text("step-0000002")
    return copy


def _resume(run, *extra) -> int:
    return train(run, None, "steps=4", *extra, resume=True)


# ---- one run per folder ------------------------------------------------------------------------
_HOLD_LOCK = """
import fcntl, os, sys, time
file = open(sys.argv[1], "a+")
fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
file.seek(0); file.truncate(); file.write(f"vlmkit train (pid {os.getpid()})\\n"); file.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_locked_folder_fails_at_once_and_a_dead_owner_frees_it(finished, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    files = lambda: {path.name: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"}
    before = files()
    # Another process owns the folder, as a running `vlmkit train` does (flock on RUN/.lock).
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _resume(run, "steps=6") == 2
        assert f"is being trained by vlmkit train (pid {holder.pid})" in one_line_error(capsys)
        assert files() == before  # the second run touched nothing
    finally:
        holder.kill()  # kill -9: its lock file stays, naming a dead process
        holder.wait()
    assert f"pid {holder.pid}" in (run / ".lock").read_text()
    assert _resume(run, "steps=6") == 0  # the stale lock is taken over
    assert f"pid {os.getpid()}" in (run / ".lock").read_text()
    assert [row["step"] for row in logged(run)] == [1, 2, 3, 4, 5, 6]


# ---- logs ---------------------------------------------------------------------------------------
def test_rerunning_a_crashed_command_starts_a_fresh_log(finished, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")  # killed before its first checkpoint: folder and log written, no checkpoint
    with open(run / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "lo')
    assert train(run, data, "steps=4", "save_every=2", "keep_checkpoints=3") == 0
    assert logged(run) and [row["step"] for row in logged(run)] == [1, 2, 3, 4]
    assert [row["loss"] for row in logged(run)] == [row["loss"] for row in logged(finished)]


def test_resume_truncates_the_log_to_the_checkpoint_and_drops_a_half_written_line(run, finished):
    with open(run / "metrics.jsonl", "a") as log:
        # logged after step 2 by the dead attempt, then lines that are no log rows at all
        log.write('{"step": 5, "loss": 1.0}\n[1, 2]\n{"step": "x"}\n\xff\n{"step": 6, "lo')
    assert _resume(run) == 0
    rows = logged(run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows] == [row["loss"] for row in logged(finished)]


def test_a_training_whose_every_image_is_missing_fails_and_saves_nothing(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": f"missing/{i}.png", "text": "a red circle"}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    assert train(run, data, "steps=2", "save_every=1") == 2
    assert "no sample of the first 1 steps could be read" in one_line_error(capsys)
    assert not (run / "checkpoints").exists()


def test_a_resumed_run_whose_images_have_gone_fails_and_saves_nothing(run, data, tmp_path, capsys):
    gone = tmp_path / "gone.jsonl"
    gone.write_text("".join(json.dumps({"image": f"missing/{i}.png", "text": "a red circle"}) + "\n" for i in range(8)))
    assert train(run, None, "steps=4", "--data", str(gone), resume=True) == 2
    assert "no sample of steps 3-4 could be read" in one_line_error(capsys)
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["latest", "step-0000002"]


def test_nan_weights_make_classify_and_embed_fail(finished, data, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(finished, model)
    weights = load_file(model / "model.safetensors")
    save_file({name: torch.full_like(tensor, float("nan")) if tensor.is_floating_point() else tensor
               for name, tensor in weights.items()}, model / "model.safetensors")
    image = str(data.parent / json.loads(data.read_text().splitlines()[0])["image"])
    assert main(["classify", image, "--model", str(model), "--labels", "red circle", "blue square"]) == 2
    assert "non-finite (NaN or inf) embeddings" in one_line_error(capsys)
    assert capsys.readouterr().out == ""  # no probability null on stdout
    out = tmp_path / "e.safetensors"
    assert main(["embed", "--model", str(model), "--data", str(data), "--out", str(out)]) == 2
    assert "non-finite" in one_line_error(capsys)
    assert not out.exists()


# ---- resume: damaged run files, one clear line --------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage,needle", [
    ("truncated", "the checkpoint is corrupt"),
    ("malicious", "holds objects other than tensors (a pickle that could run code), which vlmkit never loads"),
    ("foreign", "its contents do not fit this run (KeyError: 'optimizer')"),
    ("missing", "No such file or directory"),
])
def test_a_damaged_state_is_named_and_never_executed(damage, needle, run, tmp_path, capsys):
    state = run / "checkpoints" / "step-0000002" / "state.pt"
    marker = tmp_path / "executed"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "malicious":
        state.write_bytes(pickle.dumps({"optimizer": _Payload(marker)}, protocol=2))
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, state)
    else:
        state.unlink()
    log = (run / "metrics.jsonl").read_bytes()
    assert _resume(run) == 2
    error = one_line_error(capsys)
    assert needle in error and str(state) in error and "delete step-0000002" in error, error
    assert not marker.exists()
    assert (run / "metrics.jsonl").read_bytes() == log  # nothing truncated by a resume that could not start


@pytest.mark.parametrize("name,content,needle", [
    ("recipe.json", "{not json", "recipe.json cannot be read"),
    ("recipe.json", "[1, 2]", "recipe.json holds list, not a recipe mapping"),
    ("recipe.json", '{"steps": 4}', "recipe.json does not say which data the run trained on; give it with --data"),
    ("config.json", '{"family": "clip", "con', "config.json cannot be read"),
    ("config.json", '{"family": "clip"}', "config.json holds no model configuration"),
    ("checkpoints/latest", "step-0000009", "names step-0000009, which"),
    ("checkpoints/latest", "../../other/checkpoints/step-0000002", "not a checkpoint of this run"),
])
def test_a_damaged_run_file_is_one_line(name, content, needle, run, capsys):
    (run / name).write_text(content)
    assert _resume(run) == 2
    assert needle in one_line_error(capsys)


def test_a_checkpoint_linked_to_another_run_is_refused(run, finished, capsys):
    step = run / "checkpoints" / "step-0000002"
    shutil.rmtree(step)
    step.symlink_to(finished / "checkpoints" / "step-0000002")
    assert _resume(run) == 2
    assert "outside this run's checkpoints" in one_line_error(capsys)


def test_resuming_a_finished_run_tidies_it_and_says_so(finished, tmp_path, capsys):
    # What a user re-runs after a kill that came after the last checkpoint: no error, nothing trained twice.
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / ".model.safetensors.0123abcd.tmp").write_bytes(b"half")
    capsys.readouterr()
    assert train(run, None, resume=True) == 0
    captured = capsys.readouterr()
    assert "has already trained all 4 steps; nothing left to train" in captured.err
    assert json.loads(captured.out)["loss"] == logged(finished)[-1]["loss"]
    assert logged(run) == logged(finished) and not list(run.rglob("*.tmp"))
    # Asking for fewer steps than were trained is an error, not a silent success.
    assert train(run, None, "steps=3", resume=True) == 2
    assert "has already trained 4 steps and the recipe asks for 3" in one_line_error(capsys)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(run, finished, monkeypatch, capsys):
    import vlmkit.train.trainer as trainer

    real = trainer.atomic_torch_save

    def full(path, obj):  # the disk fills while step 4's optimizer state is written
        if obj.get("step") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    monkeypatch.setattr(trainer, "atomic_torch_save", full)
    assert _resume(run) == 2
    error = one_line_error(capsys)
    assert "could not save step 4" in error and "No space left on device" in error, error
    assert "the previous checkpoint step-0000002 is intact; free space and continue with --resume" in error
    assert (run / "checkpoints" / "latest").read_text() == "step-0000002"
    assert not list(run.rglob("*.tmp"))
    monkeypatch.setattr(trainer, "atomic_torch_save", real)  # space freed
    assert _resume(run) == 0
    assert [row["loss"] for row in logged(run)] == [row["loss"] for row in logged(finished)]


def test_a_full_disk_while_logging_names_the_last_checkpoint(run, monkeypatch, capsys):
    import vlmkit.train.trainer as trainer

    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trainer.MetricsLog, "flush", full)
    assert _resume(run) == 2
    error = one_line_error(capsys)
    assert "is full (No space left on device); its last checkpoint step-0000002 is intact" in error, error


# ---- small --------------------------------------------------------------------------------------
def test_leftovers_of_a_killed_save_are_cleaned_when_a_run_resumes(run):
    (run / ".model.safetensors.1a2b3c4d.tmp").write_bytes(b"half")
    (run / "checkpoints" / ".step-0000004.tmp").mkdir()
    (run / "checkpoints" / ".step-0000004.tmp" / "model.safetensors").write_bytes(b"half")
    (run / "checkpoints" / ".latest.5e6f7a8b.tmp").write_bytes(b"step-")
    assert _resume(run) == 0
    assert not list(run.rglob("*.tmp"))


def test_leftovers_are_cleaned_when_a_fresh_run_starts(data, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-0000002.tmp").mkdir(parents=True)
    (run / ".config.json.0badf00d.tmp").write_bytes(b"{")
    assert train(run, data, "steps=1") == 0
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomically_written_files_keep_the_umask(umask, tmp_path):
    from vlmkit.io import atomic_torch_save, atomic_write_json, save_safetensors

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_torch_save(tmp_path / "s.pt", {"x": torch.zeros(1)})
        save_safetensors({"x": torch.zeros(1)}, tmp_path / "w.safetensors")
        (tmp_path / "plain").write_text("x")  # what any other program writes
    finally:
        os.umask(old)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("a.json", "s.pt", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


@pytest.mark.parametrize("out", ["file", "file/run"])
def test_an_out_that_is_or_lies_in_a_file_is_refused_before_anything(out, data, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert train(tmp_path / out, data, "steps=1") == 2
    assert "--out" in one_line_error(capsys) and (tmp_path / "file").read_text() == "not a folder"
