"""Read and write the public checkpoint formats, with no network and strict key checking.

`load_foreign(path)` recognises, in this order:
- an OpenCLIP hub folder (`open_clip_config.json` + `open_clip_model.safetensors`),
- a sentence-transformers folder (`modules.json`) or an HF BertModel folder -> `text_encoder`,
- an HF transformers CLIPModel folder (`config.json` with model_type "clip") -> `clip`,
- an HF GPT2LMHeadModel / LlamaForCausalLM folder (model_type "gpt2" / "llama") -> `lm`,
- an HF LlavaForConditionalGeneration folder (model_type "llava") -> `llava`,
- an HF BlipForConditionalGeneration / BlipForImageTextRetrieval folder (model_type "blip") -> `blip`,
- an HF Blip2ForConditionalGeneration folder with a Llama LM (model_type "blip-2") -> `blip2_lm`,
- an HF LxmertModel / LxmertForQuestionAnswering / LxmertForPreTraining folder (model_type "lxmert") -> `lxmert`,
- an HF VisualBertModel / VisualBertForPreTraining / VisualBertForQuestionAnswering folder (model_type
  "visual_bert") -> `visualbert` without an image tower (it reads visual_embeds, as HF),
- an HF IdeficsForVisionText2Text folder (model_type "idefics") -> `flamingo`,
- an OpenAI / OpenCLIP state dict file (`.safetensors`, `.pt`, `.pth`, `.bin`) -> `clip`,
and returns the model in eval mode with its tokenizer and image transform attached. Every format
is a list of key-mapping rules (`interop.mapping`) used both to load and to export.
"""
from __future__ import annotations

from pathlib import Path

from vlmkit.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
EXPORT_FORMATS = ("vlmkit", "hf", "openclip")


def detect_format(source: Path) -> str:
    """"hf-clip", "hf-lm", "hf-llava", "hf-blip", "hf-blip2", "hf-lxmert", "hf-visualbert", "hf-idefics", "bert", or "openclip" for a path, or a UserError saying what was expected."""
    from vlmkit.interop import bert, hf_blip, hf_blip2, hf_clip, hf_llava, hf_lm, hf_lxmert, hf_visualbert, openclip
    from vlmkit.interop.files import read_json

    source = Path(source)
    if source.is_dir():
        if (source / openclip.OPENCLIP_CONFIG).is_file():
            return "openclip"
        if (source / "modules.json").is_file():
            return "bert"
        if (source / "config.json").is_file():
            config = read_json(source / "config.json")
            if hf_clip.is_hf_clip(config):
                return "hf-clip"
            if bert.is_bert(config):
                return "bert"
            if hf_lm.is_hf_lm(config):
                return "hf-lm"
            if hf_llava.is_hf_llava(config):
                return "hf-llava"
            if hf_blip.is_hf_blip(config):
                return "hf-blip"
            if hf_blip2.is_hf_blip2(config):
                return "hf-blip2"
            if hf_lxmert.is_hf_lxmert(config):
                return "hf-lxmert"
            if hf_visualbert.is_hf_visualbert(config):
                return "hf-visualbert"
            from vlmkit.interop import hf_idefics

            if hf_idefics.is_hf_idefics(config):
                return "hf-idefics"
            raise UserError(
                f"{source / 'config.json'} describes model_type '{config.get('model_type')}', which vlmkit cannot load; "
                f"supported: vlmkit folders, HF CLIP, HF BERT / sentence-transformers, HF GPT-2 / Llama causal LMs, HF Llava, HF BLIP, HF BLIP-2, HF LXMERT, HF VisualBERT, HF IDEFICS, OpenCLIP"
            )
        raise UserError(
            f"{source} is not a model folder (no config.json, modules.json or {openclip.OPENCLIP_CONFIG}); "
            f"give a vlmkit run folder, an HF CLIP or BERT folder, or an OpenCLIP weights file"
        )
    if source.suffix in WEIGHT_SUFFIXES:
        return "openclip"
    raise UserError(
        f"{source} is not a known checkpoint file (expected {', '.join(WEIGHT_SUFFIXES)}); "
        f"give an OpenAI/OpenCLIP weights file or a model folder"
    )


def load_foreign(source: Path, model_name: str | None = None, activation: str | None = None,
                 pool: str | None = None, dtype=None, **unknown):
    """Load an HF CLIP / BERT / sentence-transformers / GPT-2 / Llama / Llava folder or an OpenAI/OpenCLIP state dict.

    Detects the format (`detect_format`), converts the keys strictly (a missing, unexpected or
    mis-shaped tensor is a UserError naming the keys and the assumed format), attaches the
    tokenizer and image transform, and returns the model in eval mode. Options: `model_name` and
    `activation` for OpenCLIP files, `pool` ("mean" | "cls") for BERT, `dtype` (default float32)
    for all; an option that does not apply to the detected format is an error.
    """
    from vlmkit.interop import bert, hf_blip, hf_clip, hf_llava, hf_lm, openclip
    from vlmkit.interop.common import reject_kwargs

    if unknown:
        raise UserError(f"unknown load option(s) {', '.join(sorted(unknown))}; known: model_name, activation, pool, dtype")
    source = Path(source)
    kind = detect_format(source)
    if kind == "openclip":
        reject_kwargs({"pool": pool}, openclip.FORMAT_NAME)
        return openclip.load(source, model_name=model_name, activation=activation, dtype=dtype)
    if kind == "bert":
        reject_kwargs({"model_name": model_name, "activation": activation}, bert.FORMAT_NAME)
        return bert.load(source, pool=pool, dtype=dtype)
    if kind == "hf-lm":
        reject_kwargs({"model_name": model_name, "activation": activation, "pool": pool}, hf_lm.FORMAT_NAME)
        return hf_lm.load(source, dtype=dtype)
    if kind == "hf-blip2":
        from vlmkit.interop import hf_blip2

        reject_kwargs({"model_name": model_name, "activation": activation, "pool": pool}, hf_blip2.FORMAT_NAME)
        return hf_blip2.load(source, dtype=dtype)
    if kind == "hf-lxmert":
        from vlmkit.interop import hf_lxmert

        reject_kwargs({"model_name": model_name, "activation": activation, "pool": pool}, hf_lxmert.FORMAT_NAME)
        return hf_lxmert.load(source, dtype=dtype)
    if kind == "hf-llava":
        reject_kwargs({"model_name": model_name, "activation": activation, "pool": pool}, hf_llava.FORMAT_NAME)
        return hf_llava.load(source, dtype=dtype)
    if kind == "hf-visualbert":
        from vlmkit.interop import hf_visualbert

        reject_kwargs({"model_name": model_name, "activation": activation, "pool": pool}, hf_visualbert.FORMAT_NAME)
        return hf_visualbert.load(source, dtype=dtype)
    if kind == "hf-idefics":
        from vlmkit.interop import hf_idefics

        reject_kwargs({"model_name": model_name, "activation": activation, "pool": pool}, hf_idefics.FORMAT_NAME)
        return hf_idefics.load(source, dtype=dtype)
    if kind == "hf-blip":
        reject_kwargs({"model_name": model_name, "activation": activation, "pool": pool}, hf_blip.FORMAT_NAME)
        return hf_blip.load(source, dtype=dtype)
    reject_kwargs({"model_name": model_name, "activation": activation, "pool": pool}, hf_clip.FORMAT_NAME)
    return hf_clip.load(source, dtype=dtype)


def _exporter(model, to: str):
    """The function writing `model` in format `to`, as its family declares (`export_formats`)."""
    import importlib

    target = getattr(model, "export_formats", {}).get(to)
    if target is None:
        have = ", ".join(["vlmkit", *getattr(model, "export_formats", {})])
        raise UserError(f"the '{model.family}' family cannot be written as '{to}'; its formats: {have}")
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def export_hf(model, directory: Path) -> None:
    """Write `model` as an HF transformers folder (CLIPModel for CLIP, BertModel + sentence-transformers files for a text encoder,
    GPT2LMHeadModel / LlamaForCausalLM for an LM, LlavaForConditionalGeneration for LLaVA,
    BlipForConditionalGeneration / BlipForImageTextRetrieval for a one-sided BLIP, Blip2ForConditionalGeneration
    for BLIP-2, LXMERT, VisualBERT, IdeficsForVisionText2Text for an IDEFICS-shaped Flamingo)."""
    _exporter(model, "hf")(model, Path(directory))


def export(model, directory: Path, to: str) -> None:
    """Save `model` into `directory` as "vlmkit", "hf" or "openclip"."""
    if to == "vlmkit":
        model.save_pretrained(directory, format=to)
    elif to in EXPORT_FORMATS:
        _exporter(model, to)(model, Path(directory))
    else:
        raise UserError(f"unknown format '{to}'; use one of {', '.join(EXPORT_FORMATS)}")


__all__ = ["detect_format", "load_foreign", "export_hf", "export"]
