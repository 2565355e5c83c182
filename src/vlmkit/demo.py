"""`vlmkit demo`: the whole story on the built-in data, on a laptop CPU, in a few minutes.

Generates the synthetic dataset, trains the clip-tiny recipe, evaluates zero-shot
classification and retrieval on the test split, classifies a few test images, and writes
RUN/report.md with a loss curve and an image-text similarity matrix. Re-running it reuses what
is already there (a finished run is not retrained; an interrupted one is resumed).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="generate data, train a tiny CLIP, evaluate, write a report")
    parser.add_argument("--out", default="runs/demo", help="folder for data, run and report (default: runs/demo)")
    parser.add_argument("--recipe", default="clip-tiny")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. steps=100")
    parser.set_defaults(func=run_demo)


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run_demo(args) -> int:
    import vlmkit
    from vlmkit.cli import print_json
    from vlmkit.data.formats import read_records
    from vlmkit.data.synthetic import generate
    from vlmkit.tasks.retrieval import evaluate_retrieval
    from vlmkit.tasks.zeroshot import evaluate_zeroshot
    from vlmkit.train.recipe import load_recipe, parse_overrides
    from vlmkit.train.trainer import Trainer, latest_checkpoint

    out = Path(args.out)
    data, run = out / "data", out / "run"
    started = time.perf_counter()
    if not (data / "test.jsonl").exists():
        _log(f"generating the built-in dataset in {data}")
        generate(data)
    recipe = load_recipe(args.recipe, parse_overrides(args.overrides))
    checkpoint = latest_checkpoint(run)
    finished = checkpoint is not None and int(checkpoint.name.split("-")[1]) >= recipe.steps
    if not finished:
        resume = checkpoint is not None
        _log(("resuming" if resume else "training") + f" {recipe.model} for {recipe.steps} steps in {run}")
        if resume:
            from vlmkit.train.recipe import build_recipe
            saved = json.loads((run / "recipe.json").read_text())
            saved.pop("data", None)
            recipe = build_recipe(saved, parse_overrides(args.overrides), where="recipe.json")
        Trainer(recipe, str(data / "train.jsonl"), run, resume=resume).train()
    train_seconds = time.perf_counter() - started

    model = vlmkit.load(run)
    test = read_records(data / "test.jsonl")
    _log("evaluating zero-shot classification and retrieval on the test split")
    zeroshot = evaluate_zeroshot(model, test)
    retrieval = evaluate_retrieval(model, test)
    examples = _classify_examples(model, test, out)
    _similarity_figure(model, test, out / "similarity.png")
    results = {"zeroshot": zeroshot, "retrieval": retrieval, "examples": examples, "seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_report(out, run, recipe, results, train_seconds)
    _log(f"report: {out / 'report.md'}")
    print_json({"zeroshot_top1": zeroshot["top1"], "i2t_r1": retrieval["i2t_r1"], "t2i_r1": retrieval["t2i_r1"],
                "report": str(out / "report.md")})
    return 0


def _single_object(records: list[dict]) -> list[dict]:
    return [record for record in records if record.get("label")]


def _classify_examples(model, test: list[dict], out: Path, count: int = 6) -> list[dict]:
    from vlmkit.tasks.zeroshot import zeroshot_logits

    labelled = _single_object(test)
    classnames = sorted({record["label"] for record in labelled})
    chosen = labelled[:: max(1, len(labelled) // count)][:count]
    probabilities = zeroshot_logits(model, [record["image"] for record in chosen], classnames).softmax(dim=-1)
    examples = []
    for record, row in zip(chosen, probabilities):
        best = int(row.argmax())
        examples.append({"image": str(Path(record["image"]).relative_to(out.resolve()) if Path(record["image"]).is_relative_to(out.resolve()) else record["image"]),
                         "truth": record["label"], "predicted": classnames[best], "probability": round(float(row[best]), 3)})
    return examples


def _similarity_figure(model, test: list[dict], path: Path, count: int = 12) -> None:
    from vlmkit import plots

    if not plots.available(skipping=path):
        return
    chosen = _single_object(test)[:count]
    captions = [record["texts"][0] for record in chosen]
    similarity = (model.embed_images([record["image"] for record in chosen]) @ model.embed_texts(captions).T).numpy()
    plots.heatmap(similarity, path, "cosine similarity: test images (rows) × their captions (columns)",
                  row_labels=[record["label"] for record in chosen], col_labels=captions)


def _write_report(out: Path, run: Path, recipe, results: dict, train_seconds: float) -> None:
    from vlmkit.plots import INSTALL_HINT

    zeroshot, retrieval = results["zeroshot"], results["retrieval"]

    def figure(name: str, alt: str) -> str:
        return f"![{alt}]({name})" if (out / name).exists() else f"(not drawn: matplotlib is not installed; `{INSTALL_HINT}`)"

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speed = sum(row["samples_per_s"] for row in metrics[-20:]) / max(1, len(metrics[-20:]))
    lines = [
        "# vlmkit demo report",
        "",
        f"Recipe `{recipe.model}`: {recipe.steps} steps of {recipe.batch_size} samples "
        f"({speed:.0f} samples/s at the end); whole demo {results['seconds']:.0f} s, of which data + training {train_seconds:.0f} s.",
        "",
        "## Zero-shot classification (test split, single-object scenes)",
        "",
        f"| top-1 | top-5 | mean per-class recall | images | classes |",
        f"| --- | --- | --- | --- | --- |",
        f"| {zeroshot['top1']:.3f} | {zeroshot['top5']:.3f} | {zeroshot['mean_per_class_recall']:.3f} | {zeroshot['n']} | {zeroshot['classes']} |",
        "",
        "## Retrieval (test split, all captions)",
        "",
        "| | R@1 | R@5 | R@10 |",
        "| --- | --- | --- | --- |",
        f"| image → text | {retrieval['i2t_r1']:.3f} | {retrieval['i2t_r5']:.3f} | {retrieval['i2t_r10']:.3f} |",
        f"| text → image | {retrieval['t2i_r1']:.3f} | {retrieval['t2i_r5']:.3f} | {retrieval['t2i_r10']:.3f} |",
        "",
        f"{retrieval['n_images']} images, {retrieval['n_texts']} captions.",
        "",
        "## Classified test images",
        "",
        "| image | truth | predicted | p |",
        "| --- | --- | --- | --- |",
        *[f"| ![]({e['image']}) | {e['truth']} | {e['predicted']} | {e['probability']:.2f} |" for e in results["examples"]],
        "",
        "## Figures",
        "",
        "Training loss:",
        "",
        figure("run/loss_curve.png", "loss curve"),
        "",
        "Image-text similarity (diagonal = matching pairs):",
        "",
        figure("similarity.png", "similarity"),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
