"""`vlmkit chat IMAGE [IMAGE ...] --model RUN`: a multi-turn conversation about images, for any model that `Chats`.

Several images go to the model as one (N, 3, H, W) batch; a model that chats about one image says so.

Interactive by default: each line read from stdin is a user turn, the reply is streamed to stdout
as it is generated, and an empty line or EOF ends the session. `--message "..."` answers one turn
and exits; `--json` prints one JSON object instead of streaming, `{"image", "messages", "reply"}`
(after the session, with every turn, when interactive). Prompts and notes go to stderr.
"""
from __future__ import annotations

import argparse
import sys

from vlmkit.tasks.generative_cli import _decoding, _decoding_arguments


def register(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="chat about an image with a model that chats (interactive, or --message)")
    chat.add_argument("images", nargs="+", metavar="image", help="image(s); several for models that read several")
    chat.add_argument("--model", required=True, help="run folder")
    chat.add_argument("--message", default=None, help="answer this one user turn and exit (default: read turns from stdin)")
    chat.add_argument("--json", action="store_true", help="print one JSON object {image, messages, reply} instead of streaming")
    _decoding_arguments(chat)
    chat.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    import vlmkit
    from vlmkit.capabilities import Chats
    from vlmkit.cli import print_json
    from vlmkit.data.formats import load_image
    from vlmkit.errors import UserError

    images = [load_image(path) for path in args.images]  # a bad path fails here, naming it
    model = vlmkit.load(args.model)
    model.require(Chats, task="chat")
    if args.message is not None and not args.message.strip():
        raise UserError("--message is empty; give the text of the user turn")
    pixels = model.preprocess(images).to(model.device)  # (N, 3, H, W)
    decoding = _decoding(args)
    messages: list[dict] = []
    reply = ""

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    turns = [args.message] if args.message is not None else _stdin_turns()
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply = model.chat(pixels, messages, stream=None if args.json else stream, **decoding)
        messages.append({"role": "assistant", "content": reply})
        if not args.json:
            sys.stdout.write("\n")
            sys.stdout.flush()
    if args.json:
        where = {"image": args.images[0]} if len(args.images) == 1 else {"images": args.images}
        print_json({**where, "messages": messages, "reply": reply})
    return 0


def _stdin_turns():
    """User turns from stdin, one per line, until an empty line or EOF (a prompt on stderr when interactive)."""
    while True:
        if sys.stdin.isatty():
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()
