"""`vlmkit serve --model RUN [--model NAME=RUN ...] [--index NAME=IDX ...] [--host --port]`.

Loads every model and index, then runs the app (serve/app.py) with uvicorn until interrupted.
`--demo` serves the demo run (runs/demo/run, what `vlmkit demo` trains) when it exists, or
trains a tiny CLIP on the built-in data first (about a minute on a laptop CPU). FastAPI and
uvicorn come with the `serve` extra; without it the command says how to install it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_RUN = Path("runs/demo/run")
QUICK_DEMO = Path("runs/serve-demo")


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve models over HTTP (FastAPI; pip install vlmkit[serve])")
    parser.add_argument("--model", action="append", default=[], metavar="[NAME=]RUN",
                        help="a run folder to serve, optionally named (default name: the folder's name); repeatable")
    parser.add_argument("--index", action="append", default=[], metavar="[NAME=]IDX",
                        help="a search index (vlmkit index build) for /v1/search; repeatable")
    parser.add_argument("--demo", action="store_true",
                        help=f"serve {DEMO_RUN} if present, else train a tiny CLIP into {QUICK_DEMO} first")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-file", default=None, help="file holding the API key that /v1/* and /metrics require")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser origin allowed to call the API (e.g. http://localhost:3000); repeatable")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    limits.add_argument("--max-image-pixels", type=int, default=16_000_000)
    limits.add_argument("--max-items", type=int, default=64, help="images or texts per request")
    limits.add_argument("--max-labels", type=int, default=100)
    limits.add_argument("--max-text-chars", type=int, default=2000)
    limits.add_argument("--max-new-tokens", type=int, default=64)
    limits.add_argument("--max-concurrency", type=int, default=256, help="requests in flight; more get 429")
    limits.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch", type=int, default=32, help="requests merged into one model call")
    batching.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    batching.add_argument("--no-batching", action="store_true", help="run the model once per request")
    parser.add_argument("--onednn", choices=("auto", "on", "off"), default="auto",
                        help="run torch's CPU ops through oneDNN while serving; auto (default): only when a loaded model "
                             "with convolutions is faster with it (timed at start-up), since oneDNN keeps a kernel per "
                             "input shape and a server's memory then grows with its batch shapes (README, server section)")
    parser.set_defaults(func=run_serve)


def parse_named(spec: str, what: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); 'PATH' -> (the folder's name, PATH)."""
    from vlmkit.errors import UserError

    name, separator, path = spec.partition("=")
    if not separator:
        name, path = Path(spec.rstrip("/")).name, spec
    if not name or not path:
        raise UserError(f"--{what} '{spec}' needs the form PATH or NAME=PATH")
    return name, path


def load_models(specs: list[str]) -> tuple[dict, dict[str, str]]:
    """{name: model} and {name: run folder} for `--model` specs, names unique."""
    import vlmkit
    from vlmkit.errors import UserError

    models, sources = {}, {}
    for spec in specs:
        name, path = parse_named(spec, "model")
        if name in models:
            raise UserError(f"two models are named '{name}'; name them apart with --model NAME=RUN")
        print(f"vlmkit serve: loading model '{name}' from {path}", file=sys.stderr, flush=True)
        models[name], sources[name] = vlmkit.load(path), path
    return models, sources


def load_indexes(specs: list[str]) -> dict:
    from vlmkit.errors import UserError

    if not specs:
        return {}
    try:
        from vlmkit.index import SearchIndex
    except ImportError:
        raise UserError("--index needs the vlmkit.index package (with faiss); install vlmkit[index]") from None
    indexes = {}
    for spec in specs:
        name, path = parse_named(spec, "index")
        if name in indexes:
            raise UserError(f"two indexes are named '{name}'; name them apart with --index NAME=IDX")
        indexes[name] = SearchIndex.load(path)
    return indexes


def read_api_key(path: str | None) -> str | None:
    from vlmkit.errors import UserError

    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise UserError(f"API key file {path} does not exist; write the key into it (one line)")
    key = file.read_text().strip()
    if len(key) < 8 or any(c.isspace() for c in key):
        raise UserError(f"API key file {path} must hold one key of at least 8 characters without spaces")
    return key


def demo_run() -> Path:
    """The run folder `--demo` serves: the demo's, else a quick tiny CLIP trained now (once)."""
    from vlmkit.train.trainer import latest_checkpoint

    if (DEMO_RUN / "model.safetensors").exists():
        return DEMO_RUN
    run = QUICK_DEMO / "run"
    if not (run / "model.safetensors").exists():
        from vlmkit.data.synthetic import generate
        from vlmkit.train.recipe import load_recipe
        from vlmkit.train.trainer import Trainer

        data = QUICK_DEMO / "data"
        if not (data / "train.jsonl").exists():
            print(f"vlmkit serve: generating the built-in dataset in {data}", file=sys.stderr, flush=True)
            generate(data, n=2000, seed=0, progress=False)
        print(f"vlmkit serve: no demo run at {DEMO_RUN}; training a tiny CLIP into {run} (once)", file=sys.stderr, flush=True)
        Trainer(load_recipe("clip-tiny", {"steps": 150}), str(data / "train.jsonl"), run,
                resume=latest_checkpoint(run) is not None).train()
    return run


def run_serve(args: argparse.Namespace) -> int:
    from vlmkit.errors import UserError

    try:
        import uvicorn

        from vlmkit.serve.app import create_app
    except ImportError as error:
        raise UserError(f"vlmkit serve needs the serve extra ({error.name} is missing); pip install 'vlmkit[serve]'") from None
    from vlmkit.serve.settings import Settings

    specs = list(args.model)
    if args.demo:
        specs.append(f"demo={demo_run()}")
    if not specs:
        raise UserError("give at least one model to serve: --model RUN (or --demo)")
    for option in ("max_body_bytes", "max_image_pixels", "max_items", "max_labels", "max_text_chars", "max_new_tokens",
                   "max_concurrency", "max_batch"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option.replace('_', '-')} must be at least 1")
    if args.timeout <= 0 or args.batch_window_ms < 0:
        raise UserError("--timeout must be positive and --batch-window-ms not negative")
    api_key = read_api_key(args.api_key_file)
    models, sources = load_models(specs)
    indexes = load_indexes(args.index)
    settings = Settings(max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels, max_items=args.max_items,
                        max_labels=args.max_labels, max_text_chars=args.max_text_chars, max_new_tokens=args.max_new_tokens,
                        max_concurrency=args.max_concurrency, timeout_s=args.timeout, batching=not args.no_batching,
                        batch_window_ms=args.batch_window_ms, max_batch=args.max_batch, api_key=api_key,
                        cors_origins=list(args.cors_origin), model_sources=sources)
    _check_port_free(args.host, args.port)
    app = create_app(models, indexes, settings)
    import torch

    from vlmkit.serve.onednn import convolutions, onednn_wanted

    if args.onednn == "auto" and any(convolutions(model) for model in models.values()):
        print("vlmkit serve: choosing oneDNN for the models with convolutions, which may time their image towers with "
              "and without it (--onednn on|off skips this)", file=sys.stderr, flush=True)
    onednn, previous = onednn_wanted(models, args.onednn), torch.backends.mkldnn.enabled
    reason = f"--onednn {args.onednn}" if args.onednn != "auto" else (
        "a loaded model is faster with it" if onednn else "no loaded model is faster with it")
    print(f"vlmkit serve: oneDNN {'on' if onednn else 'off'} ({reason})", file=sys.stderr, flush=True)
    print(f"vlmkit serve: http://{args.host}:{args.port} (API docs at /docs); Ctrl-C stops it", file=sys.stderr, flush=True)
    torch.backends.mkldnn.enabled = onednn  # for the server's lifetime (this command owns the process), then as it was
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        torch.backends.mkldnn.enabled = previous
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A UserError now, rather than uvicorn's log line later, when the address cannot be listened on."""
    import socket

    from vlmkit.errors import UserError

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or --host") from None
