"""The command line starts fast: a verb imports only its own module, and the light verbs no torch.

Each check runs the CLI in a fresh interpreter (`vlmkit.cli.main` in `python -c`) and then
looks at `sys.modules`, since in this process torch is long imported by other tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from vlmkit import commands

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
HEAVY = ("torch", "numpy", "PIL", "safetensors", "tokenizers")

_PROBE = """
import contextlib, io, json, sys
import vlmkit.cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = vlmkit.cli.main(json.loads(sys.argv[1]))
    except SystemExit as exit:
        code = exit.code
print(json.dumps({"code": code, "stdout": out.getvalue(),
                  "modules": sorted(name for name in sys.modules if name.split(".")[0] in %r
                                    or name.startswith("vlmkit."))}))
""" % (HEAVY,)


def _probe(*argv: str) -> dict:
    """Run `vlmkit ARGV` in a fresh interpreter: exit code, stdout, stderr and imported modules."""
    env = dict(os.environ, PYTHONPATH=SRC)
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(argv))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout.splitlines()[-1]), "stderr": done.stderr}


def _heavy(modules: list[str]) -> set[str]:
    return {name.split(".")[0] for name in modules if name.split(".")[0] in HEAVY}


@pytest.fixture()
def caption_files(tmp_path):
    pred, refs = tmp_path / "pred.json", tmp_path / "refs.json"
    pred.write_text(json.dumps([{"image_id": 1, "caption": "a man rides a horse."},
                                {"image_id": 2, "caption": "two dogs on the beach"}]))
    refs.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a man is riding a horse"},
                                                {"image_id": 1, "caption": "a person on a brown horse"},
                                                {"image_id": 2, "caption": "two dogs play on the beach"},
                                                {"image_id": 2, "caption": "dogs running in the sand"}]}))
    return pred, refs


def test_top_level_help_imports_no_verb_module():
    result = _probe("--help")
    assert result["code"] == 0 and "score" in result["stdout"] and "convert" in result["stdout"]
    assert _heavy(result["modules"]) == set()
    owners = {module for module, _ in commands.VERBS.values()}
    assert owners.isdisjoint(result["modules"]), "vlmkit --help imported a verb's module"


@pytest.mark.parametrize("verb", ["data synth", "train", "caption", "eval", "eval caption", "classify",
                                  "index build", "index search", "convert", "demo"])
def test_verb_help_imports_no_torch_numpy_or_pil(verb):
    result = _probe(*verb.split(), "--help")
    assert result["code"] == 0 and result["stdout"].startswith("usage: vlmkit " + verb)
    assert _heavy(result["modules"]) == set()


def test_score_help_and_scoring_import_no_torch(caption_files, tmp_path):
    # numpy, yes: vlmkit/metrics/__init__.py imports every metric, so importing metrics.cli does
    pred, refs = caption_files
    for argv in (["score", "--help"], ["score", "captions", "--help"]):
        result = _probe(*argv)
        assert result["code"] == 0 and "torch" not in _heavy(result["modules"])
    result = _probe("score", "captions", "--pred", str(pred), "--refs", str(refs))
    assert result["code"] == 0 and 0 < json.loads(result["stdout"])["CIDEr"]
    assert "torch" not in _heavy(result["modules"]) and "PIL" not in _heavy(result["modules"])
    assert "vlmkit.tasks.cli" not in result["modules"] and "vlmkit.data.cli" not in result["modules"]

    vqa_pred, vqa_refs = tmp_path / "vqa_pred.json", tmp_path / "vqa_refs.json"
    vqa_pred.write_text(json.dumps([{"question_id": 7, "answer": "two"}]))
    vqa_refs.write_text(json.dumps({"annotations": [{"question_id": 7, "answers": ["2"] * 3 + ["two"] * 7,
                                                     "answer_type": "number"}]}))
    result = _probe("score", "vqa", "--pred", str(vqa_pred), "--refs", str(vqa_refs))
    assert result["code"] == 0 and json.loads(result["stdout"])["accuracy"] == pytest.approx(1.0)
    assert "torch" not in _heavy(result["modules"]) and "PIL" not in _heavy(result["modules"])


def test_data_synth_imports_no_torch(tmp_path):
    result = _probe("data", "synth", "--out", str(tmp_path / "synth"), "--n", "6", "--image-size", "32",
                    "--no-progress")
    assert result["code"] == 0 and json.loads(result["stdout"])["train"] > 0
    assert _heavy(result["modules"]) <= {"PIL"}, result["modules"]


def test_eval_lists_the_sub_verbs_other_modules_register():
    result = _probe("eval", "--help")
    for name in ("zeroshot", "retrieval", "linear-probe", "caption", "vqa", "reasoning"):
        assert name in result["stdout"]
    assert _heavy(result["modules"]) == set()


def test_errors_still_one_line_exit_2(tmp_path):
    result = _probe("score", "captions", "--pred", str(tmp_path / "missing.json"), "--refs", str(tmp_path / "r.json"))
    assert result["code"] == 2 and result["stdout"] == ""
    assert result["stderr"].startswith("vlmkit: error: ") and result["stderr"].count("\n") == 1


def _full_parser() -> argparse.ArgumentParser:
    from vlmkit.cli import build_parser

    return build_parser()


def _verbs(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))


def test_verb_table_matches_what_the_modules_register():
    """Names, order and help lines of commands.VERBS are those of the modules' own parsers."""
    registered = [(action.dest, action.help) for action in _verbs(_full_parser())._choices_actions]
    assert registered == [(verb, help_text) for verb, (_, help_text) in commands.VERBS.items()]
    for verb, (module_name, _) in commands.VERBS.items():
        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers()
        __import__(module_name, fromlist=["register"]).register(subparsers)
        assert verb in subparsers.choices, f"{module_name}.register() does not add '{verb}'"


@pytest.mark.parametrize("argv", [
    ["score", "captions", "--pred", "p"], ["--", "train", "--out", "x"], ["--version", "eval"], ["-h", "data"],
    ["-"], ["-1", "score"], [], ["bogus", "score"],
])
def test_chosen_verb_is_the_command_argparse_picks(argv):
    """Where the real top-level parser finds a verb, commands.chosen_verb finds the same one
    (where it stops first, on help, version or an error, any guess only costs an import)."""
    parser = argparse.ArgumentParser(prog="vlmkit")
    parser.add_argument("--version", action="version", version="vlmkit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register(subparsers, modules=set())  # every verb a bare parser: nothing below the verb is parsed
    try:
        picked = parser.parse_known_args(argv)[0].command
    except SystemExit:
        picked = None
    if picked is not None:
        assert commands.chosen_verb(argv) == picked
