"""`vlmkit train --dry-run`: a recipe's model built on the meta device, counted, and its training memory estimated.

Nothing is allocated or written: the model is built with meta tensors (shapes only), and the
sequence lengths its transformer blocks see are read by running `forward` on a meta dummy batch
(a family whose forward needs real values, e.g. trimming padding, is sized at each stack's longest
sequence instead: its `context_length` or position table).

Per-GPU memory, with P parameters (T of them trainable), N GPUs, and FSDP dividing what it shards:

    parameters   4 P bytes (fp32 master weights; bf16 autocast does not change what is stored)  / N under FSDP
    gradients    4 T bytes (fp32, one per trainable parameter)                                   / N under FSDP
    optimizer    8 T bytes (AdamW: exp_avg and exp_avg_sq, fp32)                                  / N under FSDP
    gathered     FSDP only: the whole parameters of the 2 largest blocks (the one computing and the
                 one prefetched), in bf16 (2 bytes) or fp32 (4 bytes)
    activations  per transformer block, of input (b, s, h) with MLP hidden f (fc1's output width), after
                 Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
                 Models", eq. 1 with the attention-score term dropped because SDPA's fused kernels
                 never store the s x s scores):
                     bytes = s b (18 h + 4 f) x (activation bytes / 2)
                 i.e. 34 s b h for the usual f = 4h in bf16 (11 sbh attention, 4 sbh the two norms,
                 19 sbh the MLP), twice that in fp32; a cross-attention sublayer adds 15 s b h.
                 With gradient checkpointing each block keeps only its input (2 or 4 bytes x s b h)
                 and one block's full activations exist at a time, during its recomputation:
                     bytes = sum over blocks (s b h x activation bytes) + max over blocks (full bytes)
                 b is the micro-batch per GPU, batch_size / (grad_accum x gpus). Embeddings, heads,
                 logits and the loss are not counted, nor allocator overheads or CUDA context.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmkit.errors import UserError
from vlmkit.train.recipe import Recipe, family_training_options

GIB = 1024 ** 3


@dataclass
class _VocabOnly:
    """What a config needs from a tokenizer that is trained from the data, when no data is given:
    the recipe's vocab_size (an upper bound: a small corpus can yield fewer tokens)."""

    vocab_size: int
    context_length: int = 77
    pad_id: int = 0

    @property
    def bos_id(self) -> int:  # the trained BPE's layout: <|startoftext|>, then <|endoftext|> last
        return self.vocab_size - 2

    @property
    def eos_id(self) -> int:
        return self.vocab_size - 1


def meta_model(recipe: Recipe, data: str | None = None) -> nn.Module:
    """The model `vlmkit train` would build from `recipe`, on the meta device, towers locked as asked.

    With `data` the tokenizer is trained on it and the family adapts to it (a VQA answer vocabulary),
    exactly as training would; without, a tokenizer trained from data counts as `vocab_size` tokens.
    """
    from vlmkit.config import apply_overrides
    from vlmkit.models.registry import get_family, named_config

    family_name, config = named_config(recipe.model)
    family = get_family(family_name)
    training = family.parse_training_options(family_training_options(recipe, family))
    records = []
    if data:
        from vlmkit.data.formats import read_records

        records = read_records(data)
    if recipe.tokenizer in ("bpe", "wordpiece"):
        if records:
            from vlmkit import tokenizers

            train = tokenizers.train_clip_bpe if recipe.tokenizer == "bpe" else tokenizers.train_wordpiece
            tokenizer = train(family.tokenizer_texts(records), vocab_size=recipe.vocab_size)
        else:
            tokenizer = _VocabOnly(recipe.vocab_size)
    elif recipe.tokenizer == "clip":
        from vlmkit.tokenizers import clip_tokenizer

        tokenizer = clip_tokenizer()
    else:
        from vlmkit.tokenizers import Tokenizer

        tokenizer = Tokenizer.load(recipe.tokenizer)
    if recipe.init_text or recipe.init_image:  # pretrained towers fix their own shapes (and tokenizer)
        from vlmkit.interop.towers import PretrainedTowers

        towers = PretrainedTowers(recipe.init_text, recipe.init_image)
        config = towers.configure(config, dict(recipe.model_overrides), family)
        tokenizer = towers.tokenizer or tokenizer
    config = family.adapt_config_to_tokenizer(config, tokenizer)
    config = family.adapt_config_to_data(config, records)
    config = apply_overrides(config, dict(recipe.model_overrides))
    with torch.device("meta"):
        model = family.from_config_dict(config)
    for role, wanted in (("image", recipe.lock_image), ("text", recipe.lock_text)):
        if wanted:
            model.lock(role)
    model.training_options = training
    return model


def _block_shapes(model: nn.Module, micro_batch: int) -> list[tuple[nn.Module, torch.Size]] | None:
    """(block, input shape (b, s, h)) of every TransformerBlock a training forward runs, from a meta
    forward pass on the family's dummy batch; None when the family's forward cannot run on meta tensors."""
    from vlmkit.layers.transformer import TransformerBlock

    seen: list[tuple[nn.Module, torch.Size]] = []
    hooks = [module.register_forward_pre_hook(lambda module, args: seen.append((module, args[0].shape)))
             for module in model.modules() if isinstance(module, TransformerBlock)]
    try:
        batch = {key: value.to("meta") if torch.is_tensor(value) else value for key, value in model.dummy_batch(micro_batch, 0).items()}
        model.train()
        with torch.no_grad():
            model(batch)
    except Exception:  # data-dependent code (.item(), counts) has no meta kernel: no activation estimate
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return _at_context_length(model, seen)


def _at_context_length(model: nn.Module, shapes: list[tuple[nn.Module, torch.Size]]) -> list[tuple[nn.Module, torch.Size]]:
    """`shapes` with each token stack's sequence stretched to its owner's `context_length`: the dummy
    batch is short (LLaVA's: the image tokens and a few words), while training sizes memory for its
    longest sample (a LM's batches run up to its whole context, or to the family's `training.max_length`)."""
    from vlmkit.layers.transformer import Transformer

    cap = getattr(getattr(model, "training_options", None), "max_length", None)  # a family's tokens-per-sample bound
    longest: dict[nn.Module, int] = {}
    for owner in model.modules():
        stack, length = getattr(owner, "transformer", None), getattr(owner, "context_length", None)
        if isinstance(stack, Transformer) and isinstance(length, int):
            longest.update({block: min(length, cap) if isinstance(cap, int) else length for block in stack.blocks})
    return [(block, torch.Size([shape[0], max(shape[1], longest.get(block, 0)), *shape[2:]])) for block, shape in shapes]


def _longest_block_shapes(model: nn.Module, micro_batch: int) -> list[tuple[nn.Module, torch.Size]] | None:
    """(block, (b, s, h)) at each stack's longest sequence, for families whose forward cannot run on meta
    tensors: s is the owner's `context_length` (text towers, LMs) or its position table's length (ViT);
    None if some stack has neither."""
    from vlmkit.layers.transformer import Transformer

    shapes = []
    for owner in model.modules():
        stack = getattr(owner, "transformer", None)
        if not isinstance(stack, Transformer):
            continue
        length = getattr(owner, "context_length", None)
        if not isinstance(length, int):
            table = getattr(owner, "positional_embedding", None)
            if not isinstance(table, torch.Tensor) or table.ndim != 2:
                return None
            length = table.shape[0]
        for block in stack.blocks:
            shapes.append((block, torch.Size([micro_batch, length, block.mlp.fc1.in_features])))
    return shapes


def _block_activation_bytes(block: nn.Module, shape: torch.Size, element_bytes: int) -> int:
    batch, length, width = shape
    hidden = block.mlp.fc1.out_features if hasattr(block, "mlp") and hasattr(block.mlp, "fc1") else 4 * width
    units = 18 * width + 4 * hidden + (15 * width if getattr(block, "cross_attn", None) is not None else 0)
    return length * batch * units * element_bytes // 2


def estimate(recipe: Recipe, gpus: int = 1, data: str | None = None, device_type: str = "cuda") -> dict[str, Any]:
    """Parameter counts and the per-GPU memory estimate (bytes and GiB; see the module docstring for the
    formulas) of training `recipe` on `gpus` GPUs; `device_type` decides what precision "auto" means."""
    from vlmkit.train.parallelize import uses_bf16

    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if recipe.batch_size % (recipe.grad_accum * gpus):
        raise UserError(f"batch_size {recipe.batch_size} must be divisible by grad_accum x gpus ({recipe.grad_accum} x {gpus})")
    model = meta_model(recipe, data)
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    bf16 = uses_bf16(recipe, torch.device(device_type))
    element = 2 if bf16 else 4
    sharded = recipe.fsdp and gpus > 1
    share = gpus if sharded else 1
    micro_batch = recipe.batch_size // (recipe.grad_accum * gpus)
    memory = {"parameters": 4 * total / share, "gradients": 4 * trainable / share, "optimizer": 8 * trainable / share}
    shapes, notes = _block_shapes(model, micro_batch), []
    if shapes is None:
        shapes = _longest_block_shapes(model, micro_batch)
        notes.append(f"the {model.family} forward cannot run on meta tensors: " + (
            "activations not estimated" if shapes is None else "activations sized at each stack's longest sequence"))
    if sharded:
        from vlmkit.layers.transformer import TransformerBlock

        sizes = sorted((sum(p.numel() for p in block.parameters()) for block in model.modules() if isinstance(block, TransformerBlock)), reverse=True)
        memory["gathered"] = element * sum(sizes[:2])
    if shapes is not None:
        full = [_block_activation_bytes(block, shape, element) for block, shape in shapes]
        if recipe.gradient_checkpointing:
            kept = sum(shape[0] * shape[1] * shape[2] * element for _, shape in shapes)
            memory["activations"] = kept + max(full, default=0)
        else:
            memory["activations"] = sum(full)
    memory = {key: int(value) for key, value in memory.items()}
    memory["total"] = sum(memory.values())
    return {
        "model": recipe.model,
        "family": model.family,
        "parameters": {"total": total, "trainable": trainable},
        "gpus": gpus,
        "fsdp": sharded,
        "precision": "bf16" if bf16 else "fp32",
        "micro_batch_per_gpu": micro_batch,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "transformer_blocks": None if shapes is None else [list(shape) for _, shape in shapes],
        "memory_per_gpu_bytes": memory,
        "memory_per_gpu_gib": {key: round(value / GIB, 3) for key, value in memory.items()},
        "notes": notes + ([] if data or recipe.tokenizer not in ("bpe", "wordpiece") else
           [f"no --data: the tokenizer trained from data is counted at vocab_size {recipe.vocab_size}"]),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable report `--dry-run` prints on stderr."""
    counts, gib = result["parameters"], result["memory_per_gpu_gib"]
    lines = [
        f"{result['model']} ({result['family']}): {counts['total']:,} parameters, {counts['trainable']:,} trainable",
        f"per GPU on {result['gpus']} GPU(s){' with FSDP' if result['fsdp'] else ''}, {result['precision']}, "
        f"micro-batch {result['micro_batch_per_gpu']}{', gradient checkpointing' if result['gradient_checkpointing'] else ''}:",
    ]
    lines += [f"  {key:<12} {value:10.3f} GiB" for key, value in gib.items()]
    return lines + [f"note: {note}" for note in result["notes"]]
