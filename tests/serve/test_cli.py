"""`vlmkit serve` itself: the project's own command starts the server, and refuses bad options in one line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_vlmkit_serve_starts_and_answers_healthz(model_runs, tmp_path):
    import httpx

    key_file = tmp_path / "key"
    key_file.write_text("a-long-enough-key\n")
    port = _free_port()
    run = next(iter(model_runs.values()))
    server = subprocess.Popen([sys.executable, "-m", "vlmkit", "serve", "--model", f"first={run}", "--port", str(port),
                               "--api-key-file", str(key_file)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()[1].decode()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start within 60 s"
                time.sleep(0.2)
        assert health.json() == {"status": "ok", "models": 1, "indexes": 0}
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": "Bearer a-long-enough-key"}).json()
        assert [model["name"] for model in listed["models"]] == ["first"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert "vlmkit serve: oneDNN o" in server.stderr.read().decode()  # the choice is said at start (serve/cli.py)


@pytest.mark.parametrize("arguments, words", [
    ([], "at least one model"),
    (["--model", "/nonexistent/run"], "does not exist"),
    (["--model", "RUN", "--api-key-file", "/nonexistent/key"], "API key file"),
    (["--model", "RUN", "--model", "RUN"], "two models are named"),
    (["--model", "RUN", "--max-labels", "0"], "--max-labels must be at least 1"),
])
def test_bad_options_end_in_one_line_and_exit_2(arguments, words, model_runs, capsys):
    from vlmkit.cli import main

    run = next(iter(model_runs.values()))
    arguments = [run if argument == "RUN" else argument for argument in arguments]
    assert main(["serve", *arguments]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert words in errors[-1] and errors[-1].startswith("vlmkit: error: ")
    assert all(line.startswith("vlmkit serve: loading") for line in errors[:-1])  # nothing else before the error


def test_a_port_in_use_is_a_one_line_error(model_runs):
    from vlmkit.errors import UserError
    from vlmkit.serve.cli import _check_port_free

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
            _check_port_free("127.0.0.1", taken.getsockname()[1])
