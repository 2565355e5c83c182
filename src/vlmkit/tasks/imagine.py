"""Text to image, for any model that `Imagines`: sampling, judge re-ranking and judged evaluation.

`imagine` draws `n` images per prompt; with a `judge` (any model that embeds images and texts,
e.g. a CLIP run) it draws `candidates` per prompt and keeps the `n` the judge finds most similar
to the prompt, as DALL-E re-ranked its samples with CLIP. `evaluate_text_to_image` samples one
image per prompt for each guidance scale asked for and scores the samples with the judge: the
CLIP score (100 x the mean cosine similarity of image and prompt, negatives counted as 0, as
Hessel et al.'s CLIPScore without its 2.5 weight) and the judge's zero-shot accuracy (the share
of samples the judge classifies as their prompt's label, among the dataset's labels). Nothing
here names a family: family options (`guidance`, `steps`, `temperature`, ...) pass through.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vlmkit.capabilities import EmbedsImages, EmbedsTexts, Imagines, require
from vlmkit.errors import UserError

# Rows per `model.imagine` call: bounds memory when many candidates are drawn.
DEFAULT_BATCH_SIZE = 64


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The family options with `None` (not given) dropped, after the checks every family shares:
    guidance >= 0, steps >= 1, temperature > 0, top_k >= 1 (one UserError sentence otherwise)."""
    options = {key: value for key, value in options.items() if value is not None}
    if "guidance" in options and not options["guidance"] >= 0:
        raise UserError(f"--guidance {options['guidance']} is negative; give a scale of 0 (no guidance) or more, e.g. 3 (1 = no guidance)")
    if "steps" in options and options["steps"] < 1:
        raise UserError(f"--steps {options['steps']} samples nothing; give 1 or more sampling steps, e.g. 50")
    if "temperature" in options and not options["temperature"] > 0:
        raise UserError(f"--temperature {options['temperature']} is not positive; give a temperature above 0, e.g. 1")
    if "top_k" in options and options["top_k"] < 1:
        raise UserError(f"--top-k {options['top_k']} keeps no token; give 1 or more")
    return options


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Prompts stripped of surrounding spaces; an empty list or an empty prompt is a UserError."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(prompt).strip() for prompt in prompts]
    if not prompts:
        raise UserError("no prompt was given; give a prompt such as \"a red triangle\"")
    if any(not prompt for prompt in prompts):
        raise UserError("a prompt is empty; give a prompt that describes the image, e.g. \"a red triangle\"")
    return prompts


def _check_family_takes(model, options: dict[str, Any]) -> None:
    """Refuse options the family does not list in `imagine_options` (when it lists them)."""
    accepted = getattr(model, "imagine_options", None)
    if accepted is None:
        return  # the family checks its own options
    for key in options:
        if key != "seed" and key not in accepted:
            family = getattr(model, "family", type(model).__name__)
            takes = ", ".join(f"--{name.replace('_', '-')}" for name in accepted) or "no options but --seed"
            raise UserError(f"the '{family}' model family does not take --{key.replace('_', '-')}; "
                            f"drop it (it takes {takes})")


def sample(model, prompts: Sequence[str], seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
           **options) -> torch.Tensor:
    """(len(prompts), 3, H, W) images in [0, 1] on the CPU, one per prompt row, drawn in chunks of
    `batch_size` rows (chunk i with seed `seed + i`, so the result is reproducible for a given
    batch size)."""
    require(model, Imagines, task="imagine")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} holds no image; give 1 or more")
    _check_family_takes(model, options)
    chunks = []
    with torch.inference_mode():
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            images = model.imagine(list(prompts[start:start + batch_size]), seed=seed + index, **options)
            chunks.append(images.detach().float().clamp(0, 1).cpu())
    return torch.cat(chunks)


def to_uint8_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] -> B (H, W, 3) uint8 arrays, what every model's `preprocess` reads."""
    return list(images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy())


def similarities(judge, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """(B,) cosine similarity of image row b and prompt row b in the judge's embedding space."""
    require(judge, EmbedsImages, task="judging images")
    require(judge, EmbedsTexts, task="judging images")
    image_embeddings = judge.embed_images(to_uint8_arrays(images))  # (B, D), normalised
    text_embeddings = judge.embed_texts(list(prompts))  # (B, D), normalised
    return (image_embeddings * text_embeddings).sum(dim=-1)


def imagine(model, prompts: Sequence[str], n: int = 1, seed: int = 0, judge=None, candidates: int | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`n` images per prompt, prompt-major: ((P * n, 3, H, W) in [0, 1], (P * n,) judge similarities
    or None). With a `judge`, `candidates` images (default 4 * n) are drawn per prompt and the `n`
    most similar to the prompt are kept, best first."""
    prompts = check_prompts(prompts)
    if n < 1:
        raise UserError(f"--n {n} asks for no image; give 1 or more images per prompt")
    options = check_options(options)
    if judge is None:
        if candidates is not None:
            raise UserError("--candidates chooses among samples with a judge; give --rerank JUDGE_RUN too, or drop it")
        return sample(model, [p for p in prompts for _ in range(n)], seed=seed, batch_size=batch_size, **options), None
    candidates = 4 * n if candidates is None else candidates
    if candidates < n:
        raise UserError(f"--candidates {candidates} is fewer than --n {n}; draw at least as many candidates as you keep")
    rows = [p for p in prompts for _ in range(candidates)]
    images = sample(model, rows, seed=seed, batch_size=batch_size, **options)  # (P * M, 3, H, W)
    scores = similarities(judge, images, rows).view(len(prompts), candidates)  # (P, M)
    best = scores.topk(n, dim=1).indices  # (P, n), best first
    picked = (best + torch.arange(len(prompts)).unsqueeze(1) * candidates).flatten()
    return images[picked], scores.flatten()[picked]


def write_samples(images: torch.Tensor, captions: Sequence[str], out: str | Path, columns: int | None = None) -> list[str]:
    """Write each image as OUT_STEM-NNN.png next to `out` and a grid of them (with their captions when
    matplotlib is there, a plain PIL tiling otherwise) to `out`; returns the individual paths."""
    from PIL import Image

    from vlmkit.io import check_output_file, write_output_file

    out = check_output_file(out, "--out")
    arrays = to_uint8_arrays(images)
    paths = [out.with_name(f"{out.stem}-{index:03d}.png") for index in range(len(arrays))]
    for path in paths:
        check_output_file(path, "--out")
    for path, array in zip(paths, arrays):
        write_output_file(path, _png_bytes(Image.fromarray(array)), "--out")
    columns = columns or min(8, len(arrays))
    from vlmkit import plots

    if plots.available():
        plots.image_grid(arrays, list(captions), out, columns=columns)
    else:
        height, width = arrays[0].shape[:2]
        rows = -(-len(arrays) // columns)
        grid = Image.new("RGB", (columns * width, rows * height), "white")
        for index, array in enumerate(arrays):
            grid.paste(Image.fromarray(array), ((index % columns) * width, (index // columns) * height))
        write_output_file(out, _png_bytes(grid), "--out")
    return [str(path) for path in paths]


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prompt_records(records: Sequence[dict], label_key: str = "label", n_prompts: int | None = None) -> list[tuple[str, str]]:
    """(prompt, label) pairs of the records that carry a label (single-object scenes), the prompt
    being the record's first caption (falling back to "a LABEL"), the first `n_prompts` of them."""
    pairs = []
    for record in records:
        label = record.get(label_key)
        if label is None:
            continue
        texts = record.get("texts") or []
        pairs.append((str(texts[0]).strip() if texts else f"a {label}", str(label)))
    if not pairs:
        raise UserError(f"no record has a '{label_key}' field, so no prompt names one object to judge; "
                        f"give records of single-object scenes (the built-in test split has them) or choose --label-key")
    return pairs if n_prompts is None else pairs[:n_prompts]


def evaluate_text_to_image(model, judge, records: Sequence[dict], guidance_scales: Sequence[float] | None = None,
                           n_prompts: int | None = 100, label_key: str = "label", seed: int = 0,
                           templates: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                           rerank=None, candidates: int | None = None, **options) -> dict:
    """One image per prompt (see `prompt_records`) for each guidance scale, judged: CLIP score of the
    samples against their prompts and the judge's zero-shot accuracy among the records' labels. A
    family that takes no `guidance` gets one entry (its `guidance` null)."""
    from vlmkit.tasks.zeroshot import DEFAULT_TEMPLATES, class_embeddings

    require(model, Imagines, task="eval text-to-image")
    require(judge, EmbedsImages, task="judging images (--judge)")
    require(judge, EmbedsTexts, task="judging images (--judge)")
    if n_prompts is not None and n_prompts < 1:
        raise UserError(f"--n-prompts {n_prompts} judges nothing; give 1 or more")
    options = check_options(options)
    pairs = prompt_records(records, label_key, n_prompts)
    prompts, labels = [p for p, _ in pairs], [label for _, label in pairs]
    classnames = sorted({str(record[label_key]) for record in records if record.get(label_key) is not None})
    targets = torch.tensor([classnames.index(label) for label in labels])
    weights = class_embeddings(judge, classnames, templates or DEFAULT_TEMPLATES)  # (C, D)
    takes_guidance = "guidance" in (getattr(model, "imagine_options", None) or ())
    scales: list[float | None] = list(guidance_scales) if guidance_scales else [None]
    if not takes_guidance and any(scale is not None for scale in scales):
        family = getattr(model, "family", type(model).__name__)
        print(f"vlmkit: the '{family}' family takes no guidance; judging its samples once", file=sys.stderr)
        scales = [None]
    results = []
    for scale in scales:
        run_options = dict(options) if scale is None else {**options, "guidance": float(scale)}
        check_options(run_options)
        print(f"vlmkit: sampling {len(prompts)} image(s)" + (f" at guidance {scale:g}" if scale is not None else ""),
              file=sys.stderr, flush=True)
        images, _ = imagine(model, prompts, n=1, seed=seed, judge=rerank, candidates=candidates,
                            batch_size=batch_size, **run_options)
        image_embeddings = judge.embed_images(to_uint8_arrays(images))  # (P, D)
        text_embeddings = judge.embed_texts(prompts)  # (P, D)
        cosine = (image_embeddings * text_embeddings).sum(dim=-1)
        predicted = (image_embeddings @ weights.T).argmax(dim=-1)
        results.append({
            "guidance": scale,
            "clip_score": round(100.0 * cosine.clamp(min=0).mean().item(), 4),
            "judge_accuracy": round((predicted == targets).float().mean().item(), 4),
        })
    return {"prompts": len(prompts), "classes": len(classnames), "chance": round(1.0 / len(classnames), 4),
            "options": options, "reranked": rerank is not None, "results": results}

