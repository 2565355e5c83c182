"""`vlmkit asif build`: an ASIF model folder from two trained encoders and an anchor set (see models/asif.py).

Kept out of asif.py so that building the parser imports no torch (commands.py's rule).
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `asif` verb and its `build` sub-verb."""
    asif = subparsers.add_parser("asif", help="ASIF: a training-free dual encoder from two encoders and anchor pairs")
    verbs = asif.add_subparsers(dest="asif_command", metavar="SUBCOMMAND", required=True)
    build = verbs.add_parser(
        "build", help="write an ASIF model folder (loadable by every dual-encoder verb)",
        description="Represent images by their similarities to anchor images and texts by their similarities to the "
        "anchors' captions (top k kept, raised to the power p, normalised). The encoders were never trained together.")
    build.add_argument("--image-encoder", required=True, help="a model folder whose family embeds images (a vlmkit run, ...)")
    build.add_argument("--text-encoder", required=True, help="a model folder whose family embeds texts (a vlmkit run, an "
                       "HF BERT / sentence-transformers folder such as all-MiniLM-L6-v2)")
    build.add_argument("--anchors", required=True, help="image-caption records (JSONL, CSV, ...): the anchor pairs")
    build.add_argument("--out", required=True, help="model folder to create")
    build.add_argument("--k", type=int, default=800, help="similarities kept per row (default %(default)s, ASIF's non_zeros)")
    build.add_argument("--p", type=float, default=8.0, help="power of the kept similarities (default %(default)s)")
    build.add_argument("--num-anchors", type=int, help="use only the first N usable anchor pairs")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from vlmkit.cli import print_json
    from vlmkit.errors import UserError
    from vlmkit.models.asif import build_asif

    if args.k < 1 or not args.p > 0:
        raise UserError(f"--k must be at least 1 and --p above 0 (got k={args.k}, p={args.p})")
    print_json(build_asif(args.image_encoder, args.text_encoder, args.anchors, args.out, k=args.k, p=args.p,
                          num_anchors=args.num_anchors))
    return 0
