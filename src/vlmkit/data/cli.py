"""CLI verbs of the data area: `vlmkit data synth`."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `data` verb and its sub-verbs to the top-level parser."""
    from vlmkit.data import synthetic

    data = subparsers.add_parser("data", help="datasets: generate the built-in synthetic dataset")
    verbs = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    synth = verbs.add_parser(
        "synth",
        help="render the synthetic coloured-shapes dataset (train.jsonl, test.jsonl, images/)",
        description="Render procedural scenes of coloured shapes with captions, labels, VQA questions, "
        "true/false statements and boxes. The same arguments always give byte-identical files.",
    )
    synth.add_argument("--out", required=True, help="output folder (created if missing)")
    synth.add_argument("--n", type=int, default=synthetic.DEFAULT_N, help="number of scenes, train + test (default %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    synth.add_argument("--image-size", type=int, default=synthetic.DEFAULT_IMAGE_SIZE, help="image side in pixels (default %(default)s)")
    synth.add_argument("--holdout", nargs="*", default=[], metavar="'COLOR SHAPE'",
                       help="colour-shape pairs kept out of train, e.g. --holdout 'red triangle' 'blue star'")
    synth.add_argument("--caption-noise", type=float, default=0.0, metavar="FRACTION",
                       help="corrupt this fraction of the train captions (wrong colour, wrong shape, unrelated text; "
                       "seeded; the test split stays clean; each record keeps the originals in 'caption_noise')")
    synth.add_argument("--interleaved", type=int, default=0, metavar="K",
                       help="also write {train,test}_interleaved.jsonl: documents of K scenes, each its image and a caption "
                       "or question-answer pair (Flamingo's interleaved data; the other files are unchanged)")
    synth.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    synth.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    import time

    from vlmkit.cli import print_json
    from vlmkit.data.synthetic import generate

    start = time.perf_counter()
    summary = generate(args.out, n=args.n, seed=args.seed, image_size=args.image_size,
                       holdout=args.holdout, progress=not args.no_progress, caption_noise=args.caption_noise,
                       interleaved=args.interleaved)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print_json(summary)
    return 0
