"""The training loop every family shares.

One process or many (torchrun): each optimizer step consumes `batch_size` samples of a
deterministic stream (a new seeded permutation per epoch), split across ranks and
accumulation steps. Everything needed to continue exactly — weights, optimizer, step, RNG — is
checkpointed atomically, so a run stopped and resumed gives the same losses as one that never
stopped. Progress goes to a tqdm bar on stderr and to RUN/metrics.jsonl, one line per step.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vlmkit.errors import UserError
from vlmkit.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, load_safetensors, load_state_dict_strict, save_safetensors
from vlmkit.models.base import CONFIG_FILE, WEIGHTS_FILE
from vlmkit.train import distributed
from vlmkit.train.optim import learning_rate, make_optimizer
from vlmkit.train.recipe import Recipe

RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


# ---- the sample stream ---------------------------------------------------------------------
class SampleStream:
    """Sample j of the run is index perm_e[j mod N] of epoch e = j // N; perm_e seeded by (seed, e)."""

    def __init__(self, num_records: int, seed: int):
        self.num_records, self.seed = num_records, seed
        self._permutations: dict[int, list[int]] = {}

    def keys(self, start: int, count: int) -> list[tuple[int, int]]:
        keys = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_records)
            if epoch not in self._permutations:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._permutations = {epoch: torch.randperm(self.num_records, generator=generator).tolist()}
            keys.append((epoch, self._permutations[epoch][offset]))
        return keys


class StepBatches:
    """Micro-batches of (epoch, index) keys for this rank, from `start_step` to `total_steps`."""

    def __init__(self, stream: SampleStream, recipe: Recipe, start_step: int, info: distributed.DistInfo):
        self.stream, self.recipe, self.start_step, self.info = stream, recipe, start_step, info

    def __iter__(self):
        batch, accum = self.recipe.batch_size, self.recipe.grad_accum
        for step in range(self.start_step, self.recipe.steps):
            keys = self.stream.keys(step * batch, batch)[self.info.rank :: self.info.world_size]
            size = math.ceil(len(keys) / accum)
            for micro in range(accum):
                yield keys[micro * size : (micro + 1) * size]

    def __len__(self) -> int:
        return (self.recipe.steps - self.start_step) * self.recipe.grad_accum


class EpochKeyed(Dataset):
    """Lets a DataLoader fetch (epoch, index) keys so per-sample randomness follows the epoch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


# ---- the run folder ------------------------------------------------------------------------
def latest_checkpoint(run: Path) -> Path | None:
    pointer = run / CHECKPOINTS / "latest"
    if not pointer.exists():
        return None
    path = run / CHECKPOINTS / pointer.read_text().strip()
    return path if path.exists() else None


class Trainer:
    def __init__(self, recipe: Recipe, data: str, out: str | Path, resume: bool = False):
        self.recipe, self.data, self.run = recipe, data, Path(out)
        self.resume = resume
        self.info = distributed.setup()
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        if recipe.batch_size % (recipe.grad_accum * self.info.world_size):
            raise UserError(
                f"batch_size {recipe.batch_size} must be divisible by grad_accum x world size "
                f"({recipe.grad_accum} x {self.info.world_size})"
            )

    # ---- set-up ----
    def _records(self):
        from vlmkit.data.formats import read_records

        records = read_records(self.data)
        if not records:
            raise UserError(f"{self.data} holds no records")
        return records

    def _tokenizer(self, records):
        from vlmkit import tokenizers

        recipe = self.recipe
        if self._towers().tokenizer is not None:  # a pretrained text tower brings its own tokenizer
            return self._towers().tokenizer
        if recipe.tokenizer in ("bpe", "wordpiece"):
            from vlmkit.models.registry import get_family, named_config

            # The family says which record texts its vocabulary needs (captions by default).
            captions = get_family(named_config(recipe.model)[0]).tokenizer_texts(records)
            train = tokenizers.train_clip_bpe if recipe.tokenizer == "bpe" else tokenizers.train_wordpiece
            return train(captions, vocab_size=recipe.vocab_size)
        if recipe.tokenizer == "clip":
            return tokenizers.clip_tokenizer()
        return tokenizers.Tokenizer.load(recipe.tokenizer)

    def _new_model(self, tokenizer, records=None):
        from vlmkit.config import apply_overrides
        from vlmkit.models.registry import build_model, named_config

        from vlmkit.models.registry import get_family

        family, config = named_config(self.recipe.model)
        config = self._towers().configure(config, dict(self.recipe.model_overrides))  # init_text / init_image
        # The model follows the tokenizer it is trained with; explicit overrides still win.
        config = get_family(family).adapt_config_to_tokenizer(config, tokenizer)
        if records is not None:  # e.g. a VQA head sized to the training answers
            config = get_family(family).adapt_config_to_data(config, records)
        config = apply_overrides(config, dict(self.recipe.model_overrides))
        torch.manual_seed(self.recipe.seed)
        model = build_model(family, config)
        self._towers().load_into(model)
        return model

    def _towers(self):
        """Pretrained towers named by the recipe's init_text / init_image (loaded once; empty if none)."""
        if not hasattr(self, "_pretrained_towers"):
            from vlmkit.interop.towers import PretrainedTowers

            self._pretrained_towers = PretrainedTowers(self.recipe.init_text, self.recipe.init_image)
        return self._pretrained_towers

    def _image_transforms(self, model):
        from vlmkit.data.transforms import ImageTransform

        size = model.config.vision.image_size
        train = ImageTransform(image_size=size, train=True, crop_scale=tuple(self.recipe.crop_scale), hflip=self.recipe.hflip)
        return train, ImageTransform(image_size=size)

    def _apply_locks(self, model) -> None:
        if self.recipe.lock_image and hasattr(model, "visual"):
            model.visual.requires_grad_(False)
            model.visual.eval()  # frozen BatchNorm statistics too
        if self.recipe.lock_text and hasattr(model, "text"):
            model.text.requires_grad_(False)
            model.text.eval()

    # ---- checkpoints ----
    def _save_checkpoint(self, model, optimizer, step: int, skipped: int) -> None:
        if not self.info.is_main:
            return
        name = f"step-{step:07d}"
        final = self.run / CHECKPOINTS / name
        staging = self.run / CHECKPOINTS / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_safetensors(model.state_dict(), staging / WEIGHTS_FILE)
        atomic_torch_save(staging / "state.pt", {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "skipped": skipped,
            "rng_torch": torch.get_rng_state(),
            "rng_python": random.getstate(),
        })
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the checkpoint appears whole or not at all
        atomic_write_bytes(self.run / CHECKPOINTS / "latest", name.encode())
        save_safetensors(model.state_dict(), self.run / WEIGHTS_FILE)  # the run folder loads as a model
        kept = sorted(p for p in (self.run / CHECKPOINTS).glob("step-*") if p.is_dir())
        for old in kept[: -self.recipe.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _restore(self, model, optimizer) -> tuple[int, int]:
        checkpoint = latest_checkpoint(self.run)
        if checkpoint is None:
            raise UserError(f"--resume: {self.run} has no checkpoint to resume from; train without --resume first")
        load_state_dict_strict(model, load_safetensors(checkpoint / WEIGHTS_FILE), str(checkpoint), "vlmkit")
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        # Lines logged after the checkpoint belong to the interrupted attempt: drop them.
        metrics = self.run / METRICS_FILE
        if metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= state["step"]]
            atomic_write_bytes(metrics, ("\n".join(kept) + "\n" if kept else "").encode())
        return state["step"], state["skipped"]

    # ---- the loop ----
    def train(self) -> dict:
        from vlmkit.data.loader import SkipCounter
        from vlmkit.models.base import VLModel

        recipe, info, run = self.recipe, self.info, self.run
        records = self._records()
        if self.resume:
            if not (run / CONFIG_FILE).exists():
                raise UserError(f"--resume: {run} is not a vlmkit run folder (no {CONFIG_FILE})")
            from vlmkit.models.registry import get_family
            from vlmkit.tokenizers import Tokenizer

            meta = json.loads((run / CONFIG_FILE).read_text())
            tokenizer = Tokenizer.load(run)
            model = get_family(meta["family"]).from_config_dict(meta["config"])
        else:
            if (run / CONFIG_FILE).exists() and latest_checkpoint(run) is not None:
                raise UserError(f"{run} already holds a trained run; pass --resume to continue it or choose another --out")
            tokenizer = self._tokenizer(records)
            model = self._new_model(tokenizer, records)
        model: VLModel
        train_transform, eval_transform = self._image_transforms(model)
        model.tokenizer, model.transform = tokenizer, eval_transform
        if info.is_main and not self.resume:
            run.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(run)
            atomic_write_json(run / RECIPE_FILE, {"data": str(self.data), **_recipe_dict(recipe)})
        if recipe.gradient_checkpointing:
            for module in model.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = True
        model.to(info.device)
        optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay, (recipe.beta1, recipe.beta2), recipe.eps)
        start_step, skipped = self._restore(model, optimizer) if self.resume else (0, 0)
        self._apply_locks(model)

        trained = model
        if info.enabled:
            trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if recipe.compile:
            trained = torch.compile(trained)
        use_bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and info.device.type == "cuda")
        autocast = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

        dataset = model.training_dataset(records, train_transform, tokenizer, seed=recipe.seed, caption=recipe.caption)
        loader = DataLoader(
            EpochKeyed(dataset),
            batch_sampler=StepBatches(SampleStream(len(dataset), recipe.seed), recipe, start_step, info),
            collate_fn=dataset.collate,
            num_workers=recipe.num_workers,
            persistent_workers=False,
        )
        progress = _progress(recipe.steps, start_step, info.is_main)
        metrics_file = open(run / METRICS_FILE, "a") if info.is_main else None
        step, window_start, window_samples = start_step, time.perf_counter(), 0
        model.train()
        self._apply_locks(model)
        micro_batches = iter(loader)
        last_logs: dict = {}
        skips = SkipCounter()
        skips.total = skipped
        try:
            while step < recipe.steps:
                lr = learning_rate(step, recipe.lr, recipe.warmup_steps, recipe.steps, recipe.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_logs: dict[str, float] = {}
                samples = 0
                for _ in range(recipe.grad_accum):
                    batch = next(micro_batches)
                    skips.update(batch)
                    if batch["pixels"].shape[0] == 0:
                        continue
                    batch = {key: value.to(info.device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()}
                    with autocast():
                        output = trained(batch)
                    (output.loss / recipe.grad_accum).backward()
                    samples += batch["pixels"].shape[0]
                    for key, value in output.logs.items():
                        step_logs[key] = step_logs.get(key, 0.0) + value / recipe.grad_accum
                if samples:
                    if recipe.grad_clip:
                        step_logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip))
                    optimizer.step()
                    model.after_optimizer_step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_samples += samples * info.world_size
                elapsed = time.perf_counter() - window_start
                step_logs = {key: distributed.mean_across_ranks(value, info) for key, value in step_logs.items()}
                last_logs = {"step": step, "lr": lr, **step_logs, "samples_per_s": window_samples / max(elapsed, 1e-9), "skipped": skips.total}
                if metrics_file:
                    metrics_file.write(json.dumps(last_logs) + "\n")
                    metrics_file.flush()
                if step % recipe.log_every == 0 or step == recipe.steps:
                    window_start, window_samples = time.perf_counter(), 0
                if progress:
                    progress.update(1)
                    progress.set_postfix(loss=f"{step_logs.get('loss', float('nan')):.4f}", sps=f"{last_logs['samples_per_s']:.0f}")
                if step % recipe.save_every == 0 or step == recipe.steps:
                    self._save_checkpoint(model, optimizer, step, skips.total)
        finally:
            if progress:
                progress.close()
            if metrics_file:
                metrics_file.close()
        if info.is_main:
            from vlmkit import plots

            if plots.available(skipping=run / "loss_curve.png"):  # the plots extra is optional
                plots.plot_loss_curve(run / METRICS_FILE, run / "loss_curve.png")
            if skips.message():
                print(f"vlmkit: {skips.message()}", file=sys.stderr)
        distributed.teardown()
        return {"run": str(run), "steps": step, "loss": last_logs.get("loss"), "samples_per_s": last_logs.get("samples_per_s"), **skips.summary()}


def _recipe_dict(recipe: Recipe) -> dict:
    from vlmkit.config import to_dict

    return to_dict(recipe)


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
