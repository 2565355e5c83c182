"""The `vlmkit` command line.

Each area registers its own verbs (`register(subparsers)`), so this file stays a table of
contents; only the module of the verb being run is imported (commands.py), which keeps
`vlmkit --help` and `vlmkit score ...` free of torch. Every command prints its result (one
JSON object for evaluations) on stdout and everything else on stderr. A `UserError` ends the
run with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def print_json(obj) -> None:
    """Print one JSON object on stdout (NaN becomes null so every JSON reader accepts it)."""

    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    sys.stdout.write(json.dumps(clean(obj), sort_keys=False) + "\n")
    sys.stdout.flush()


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `vlmkit` parser. Given the `argv` to parse, only the verb it runs gets its full parser
    (so only that verb's module is imported; the others are listed by name and help); without
    `argv`, every verb does."""
    from vlmkit import __version__
    from vlmkit.commands import register_all, register_for

    parser = argparse.ArgumentParser(prog="vlmkit", description="Vision-language models: train, evaluate, caption, score.")
    parser.add_argument("--version", action="version", version=f"vlmkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if argv is None:
        register_all(subparsers)
    else:
        register_for(subparsers, argv)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlmkit.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        result = args.func(args)
    except UserError as error:
        print(f"vlmkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmkit: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
