"""Where each area's CLI verbs are gathered (see cli.py).

Each area owns the parsers and handlers of its verbs in its own module (`register(subparsers)`).
The top-level parser needs no more than each verb's name and one line of help, so that is
what `VERBS` holds: `vlmkit --help` imports none of those modules, and `vlmkit score captions`
imports only the metrics CLI, never the model code. An owning module keeps torch, numpy and
PIL out of its module-level imports (they go inside the handlers), so registering its parsers
is cheap too.
"""
from __future__ import annotations

import importlib

# verb: (module whose register() adds it, its line in `vlmkit --help`), in help order. A
# module's verbs are consecutive and in the order its register() adds them (tested).
VERBS: dict[str, tuple[str, str]] = {
    "data": ("vlmkit.data.cli", "datasets: generate the built-in synthetic dataset"),
    "train": ("vlmkit.train.cli", "train a model from a recipe"),
    "caption": ("vlmkit.tasks.generative_cli", "caption images with a generative model"),
    "ask": ("vlmkit.tasks.generative_cli", "answer a question about an image"),
    "baseline": ("vlmkit.tasks.generative_cli", "model-free baselines: caption-nn, vqa-majority, reasoning-majority"),
    "chat": ("vlmkit.tasks.chat_cli", "chat about an image with a model that chats (interactive, or --message)"),
    "eval": ("vlmkit.tasks.cli", "evaluate a model; prints one JSON object"),
    "classify": ("vlmkit.tasks.cli", "zero-shot classify images among given labels"),
    "detect": ("vlmkit.tasks.cli", "detect objects by name with an open-vocabulary detector (prints boxes JSON)"),
    "match": ("vlmkit.tasks.cli", "image-text matching probability of texts for an image (an ITM head)"),
    "embed": ("vlmkit.tasks.cli", "write normalised image and text embeddings to safetensors"),
    "asif": ("vlmkit.models._asif_cli", "ASIF: a training-free dual encoder from two encoders and anchor pairs"),
    "capfilt": ("vlmkit.tasks.capfilt", "CapFilt: caption a noisy image-text dataset and keep the captions a matching filter accepts"),
    "convert": ("vlmkit.interop.cli",
                "convert a checkpoint: HF CLIP / BERT / OpenCLIP / vlmkit -> vlmkit, HF or OpenCLIP"),
    "index": ("vlmkit.index.cli", "build a FAISS search index of a dataset, or search one (prints JSON)"),
    "score": ("vlmkit.metrics.cli", "score predictions with caption metrics or VQA accuracy"),
    "serve": ("vlmkit.serve.cli", "serve models over HTTP (FastAPI; pip install vlmkit[serve])"),
    "demo": ("vlmkit.demo", "generate data, train a tiny CLIP, evaluate, write a report"),
}


def chosen_verb(argv: list[str]) -> str | None:
    """The verb `argv` runs, found as argparse will find it: the first argument that is not an
    option (the top-level parser's options, -h and --version, take no value)."""
    for index, argument in enumerate(argv):
        if argument == "--":
            return argv[index + 1] if index + 1 < len(argv) else None
        if not argument.startswith("-") or argument == "-":
            return argument
    return None


def register_all(subparsers) -> None:
    """Add every verb with its full parser (imports every owning module)."""
    register(subparsers, modules=None)


def register_for(subparsers, argv: list[str]) -> None:
    """Add the verb `argv` runs with its full parser, every other verb as its help line only."""
    verb = chosen_verb(argv)
    register(subparsers, modules={VERBS[verb][0]} if verb in VERBS else set())


def register(subparsers, modules: set[str] | None) -> None:
    """Add every verb, in `VERBS` order: those of `modules` (all when None) through their
    module's register(), the others as a bare parser that only lists the verb in the help."""
    for verb, (module_name, help_text) in VERBS.items():
        if verb in subparsers.choices:
            continue  # its module's register() added it with an earlier verb
        if modules is None or module_name in modules:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(verb, help=help_text)
