"""`vlmkit convert SRC DST [--to vlmkit|hf|openclip]`: rewrite a checkpoint in another format."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `convert` verb."""
    from vlmkit.interop import EXPORT_FORMATS

    convert = subparsers.add_parser(
        "convert",
        help="convert a checkpoint: HF CLIP / BERT / OpenCLIP / vlmkit -> vlmkit, HF or OpenCLIP",
        description="Load SRC (a vlmkit folder, an HF CLIP or BERT/sentence-transformers folder, or an "
        "OpenAI/OpenCLIP weights file) and write it to the new folder DST. Prints one JSON object.",
    )
    convert.add_argument("source", metavar="SRC", help="checkpoint folder or weights file")
    convert.add_argument("out", metavar="DST",
                         help="output folder (must not exist, or be empty; missing parent folders are created)")
    convert.add_argument("--to", choices=EXPORT_FORMATS, default="vlmkit", help="output format (default %(default)s)")
    convert.add_argument("--model-name", default=None, help="OpenCLIP architecture to assume, e.g. ViT-B-32 or RN50 (default: from shapes)")
    convert.add_argument("--activation", choices=("quick_gelu", "gelu"), default=None,
                         help="activation of an OpenCLIP file (default: quick_gelu, as OpenAI's weights)")
    convert.add_argument("--pool", choices=("mean", "cls"), default=None, help="pooling of a BERT folder (default: its sentence-transformers config, else cls)")
    convert.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    import vlmkit
    from vlmkit.cli import print_json
    from vlmkit.errors import UserError
    from vlmkit.interop import export
    from vlmkit.io import check_parent_folders

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not an empty folder; choose a new DST")
    check_parent_folders(out, "DST")  # before the model is loaded
    options = {"model_name": args.model_name, "activation": args.activation, "pool": args.pool}
    model = vlmkit.load(args.source, **{key: value for key, value in options.items() if value is not None})
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write next to DST and rename at the end, so an interrupted conversion leaves no half folder.
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        export(model, staging, args.to)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print_json({
        "source": str(args.source), "out": str(out), "to": args.to, "family": model.family,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
    })
    return 0
