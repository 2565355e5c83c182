"""The training loop every family shares.

One process or many (torchrun): each optimizer step consumes `batch_size` samples of a
deterministic stream (a new seeded permutation per epoch), split across ranks and
accumulation steps. Everything needed to continue exactly — weights, optimizer, step, RNG — is
checkpointed atomically, so a run stopped and resumed gives the same losses as one that never
stopped. Progress goes to a tqdm bar on stderr and to RUN/metrics.jsonl, one line per step.
"""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import re
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
from vlmkit.train.recipe import Recipe, family_training_options

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
    """The checkpoint `checkpoints/latest` names, which must be a `step-N` folder of this run."""
    pointer = run / CHECKPOINTS / "latest"
    if not pointer.exists():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not re.fullmatch(r"step-\d+", name):
        raise UserError(f"{pointer} names {name!r}, not a checkpoint of this run (step-N); fix or delete it")
    path = run / CHECKPOINTS / name
    if path.is_symlink() and path.resolve().parent != (run / CHECKPOINTS).resolve():  # a link into another run
        raise UserError(f"{path} links to {path.resolve()}, outside this run's checkpoints; replace the link by the folder")
    if not path.is_dir():
        raise UserError(f"{pointer} names {name}, which {run / CHECKPOINTS} does not hold; "
                        f"point it at a step-N folder that is there (or delete it to start the run afresh)")
    return path


def _remove_leftovers(run: Path) -> None:
    """Staging folders and temporary files of a process killed while saving (never a finished checkpoint)."""
    for leftover in [*run.glob(".*.tmp"), *(run / CHECKPOINTS).glob(".*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on a run folder (`RUN/.lock`, flock): a second `vlmkit train` on the same
    folder fails at once instead of interleaving its steps with the first. The kernel drops the
    lock when its process dies, so a killed run never leaves a stale lock behind."""

    def __init__(self, run: Path):
        import fcntl

        run.mkdir(parents=True, exist_ok=True)
        self.file = open(run / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{run} is being trained by {owner}; wait for it to finish or choose another --out") from None
        except OSError as error:  # a file system without locks (some network mounts): train, but say it is unguarded
            print(f"vlmkit: warning: cannot lock {run} ({error.strerror}); nothing stops a second run on the same --out",
                  file=sys.stderr)
        # Whatever the file holds now is a dead process's (its lock died with it): this run takes it over.
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"vlmkit train (pid {os.getpid()})\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing drops the flock


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a half-written line (a kill mid-write) counts as after any checkpoint."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
    # a line that is JSON but not one of ours (a list, a step that is no number) is dropped as well
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


class MetricsLog:
    """RUN/metrics.jsonl, one line per step, written every `every` steps.

    A step's logs stay detached tensors until the flush, where all the buffered steps become
    floats in one transfer (one host-device sync per `every` steps, not one per logged value) and,
    under torchrun, are averaged across ranks in one collective. Flush before a checkpoint so a
    resumed run's log holds every step up to it exactly once.
    """

    def __init__(self, run: Path, info: distributed.DistInfo, every: int, progress):
        self.info, self.every, self.progress = info, every, progress
        self.file = open(run / METRICS_FILE, "a") if info.is_main else None
        self.pending: list[tuple[int, float, dict, float, int]] = []  # (step, lr, tensor logs, samples/s, skipped)
        self.last: dict = {}

    def add(self, step: int, lr: float, logs: dict, samples_per_s: float, skipped: int) -> None:
        self.pending.append((step, lr, logs, samples_per_s, skipped))
        if self.progress:
            self.progress.update(1)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tensors = [value.float().reshape(()) for _, _, logs, _, _ in self.pending for value in logs.values()]
        values = iter(torch.stack(tensors).tolist() if tensors else [])
        rows = [{key: next(values) for key in logs} for _, _, logs, _, _ in self.pending]
        rows = distributed.mean_logs_across_ranks(rows, self.info)
        for (step, lr, _, samples_per_s, skipped), row in zip(self.pending, rows):
            self.last = {"step": step, "lr": lr, **row, "samples_per_s": samples_per_s, "skipped": skipped}
            if self.file:
                self.file.write(json.dumps(self.last) + "\n")
        if self.file:
            self.file.flush()
        if self.progress:
            self.progress.set_postfix(loss=f"{self.last.get('loss', float('nan')):.4f}", sps=f"{self.last['samples_per_s']:.0f}")
        self.pending = []

    def close(self) -> None:
        try:
            self.flush()
        finally:  # a flush that fails (a full disk) still closes the file and ends the progress bar's line
            if self.file:
                self.file.close()
            if self.progress:
                self.progress.close()


def _rows(batch: dict) -> int:
    """Samples in a collated batch: the leading size of its first tensor (pixels, or tokens for text-only families)."""
    return next(value.shape[0] for value in batch.values() if torch.is_tensor(value) and value.ndim > 0)


class Trainer:
    def __init__(self, recipe: Recipe, data: str, out: str | Path, resume: bool = False):
        from vlmkit.models.registry import get_family, named_config

        self.recipe, self.data, self.run = recipe, data, Path(out)
        self.resume = resume
        self.family = get_family(named_config(recipe.model)[0])
        if not self.family.trainable:
            raise UserError(f"the '{self.family.family}' family ({recipe.model}) is training-free and cannot be trained; "
                            f"build it from trained models instead (see 'vlmkit {self.family.family} --help')")
        self.family.parse_training_options(family_training_options(recipe, self.family))  # a bad option fails before anything is written
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

        # A text-only family reads records without images, and whichever texts they hold (captions,
        # questions, statements): its training_dataset says so itself when there are none.
        images = self.family.needs_images
        records = read_records(self.data, require_image=images, require_text=images)
        if not records:
            raise UserError(f"{self.data} holds no records")
        return records

    def _tokenizer(self, records):
        from vlmkit import tokenizers

        recipe = self.recipe
        if recipe.init:  # the initial model's own tokenizer
            return tokenizers.Tokenizer.load(self._init_run())
        if self._towers().tokenizer is not None:  # a pretrained text tower brings its own tokenizer
            return self._towers().tokenizer
        if recipe.tokenizer in ("bpe", "wordpiece"):
            # The family says which record texts its vocabulary needs (captions by default).
            texts = self.family.tokenizer_texts(records)
            train = tokenizers.train_clip_bpe if recipe.tokenizer == "bpe" else tokenizers.train_wordpiece
            return train(texts, vocab_size=recipe.vocab_size)
        if recipe.tokenizer == "clip":
            return tokenizers.clip_tokenizer()
        return tokenizers.Tokenizer.load(recipe.tokenizer)

    def _new_model(self, tokenizer, records):
        from vlmkit.config import apply_overrides
        from vlmkit.models.registry import named_config

        family, config = named_config(self.recipe.model)
        if self.recipe.init:  # the initial run's architecture (its weights are loaded below)
            config = json.loads((self._init_run() / CONFIG_FILE).read_text())["config"]
        config = self._towers().configure(config, dict(self.recipe.model_overrides), self.family)  # init_text / init_image
        # The model follows the tokenizer it is trained with and the data (a VQA head sized to the
        # training answers); explicit overrides still win.
        config = self.family.adapt_config_to_tokenizer(config, tokenizer)
        config = self.family.adapt_config_to_data(config, records)
        config = apply_overrides(config, dict(self.recipe.model_overrides))
        text = config.get(self.family.tower_configs.get("text"))
        if isinstance(text, dict) and "context_length" in text:  # an override of it reaches the tokenizer too
            tokenizer.context_length = text["context_length"]
        torch.manual_seed(self.recipe.seed)
        model = self.family.from_config_dict(config)
        self._towers().load_into(model)
        if self.recipe.init:
            # A family may fit the initial weights first (a fine-tuning head sized to new data starts afresh).
            state = model.adapt_init_state(load_safetensors(self._init_run() / WEIGHTS_FILE), model.state_dict())
            load_state_dict_strict(model, state, f"init {self.recipe.init}", "vlmkit")
        return model

    def _init_run(self) -> Path:
        """The run folder of the recipe's `init`, checked: a vlmkit run of this family, no init_text / init_image."""
        recipe, folder = self.recipe, Path(self.recipe.init)
        if recipe.init_text or recipe.init_image:
            raise UserError(f"init {recipe.init} brings the whole model (towers included); drop init_text / init_image from the recipe")
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise UserError(f"init {recipe.init} is not a vlmkit run folder (no {CONFIG_FILE} and {WEIGHTS_FILE}); give a trained run")
        family = json.loads((folder / CONFIG_FILE).read_text()).get("family")
        if family != self.family.family:
            raise UserError(f"init {recipe.init} holds a '{family}' model but the recipe trains '{self.family.family}'; "
                            f"init starts a run from a model of the same family")
        return folder

    def _resumed_model(self):
        from vlmkit.tokenizers import Tokenizer

        if not (self.run / CONFIG_FILE).exists():
            raise UserError(f"--resume: {self.run} is not a vlmkit run folder (no {CONFIG_FILE})")
        path = self.run / CONFIG_FILE
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"--resume: {path} cannot be read ({error}); the run folder is damaged") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise UserError(f"--resume: {path} holds no model configuration (a 'config' mapping); the run folder is damaged")
        return self.family.from_config_dict(meta["config"]), Tokenizer.load(self.run)

    def _towers(self):
        """Pretrained towers named by the recipe's init_text / init_image (loaded once; empty if none)."""
        if not hasattr(self, "_pretrained_towers"):
            from vlmkit.interop.towers import PretrainedTowers

            self._pretrained_towers = PretrainedTowers(self.recipe.init_text, self.recipe.init_image)
        return self._pretrained_towers

    def _image_transforms(self, model):
        """(training, evaluation) transforms at the model's image size; (None, None) for text-only families."""
        from vlmkit.data.transforms import ImageTransform

        vision = getattr(model.config, "vision", None)
        if vision is None:
            return None, None
        train = ImageTransform(image_size=vision.image_size, train=True, crop_scale=tuple(self.recipe.crop_scale),
                               hflip=self.recipe.hflip)
        return train, ImageTransform(image_size=vision.image_size)

    def _locked_roles(self) -> list[str]:
        return [role for role, wanted in (("image", self.recipe.lock_image), ("text", self.recipe.lock_text)) if wanted]

    def _loader(self, dataset, start_step: int):
        return iter(DataLoader(
            EpochKeyed(dataset),
            batch_sampler=StepBatches(SampleStream(len(dataset), self.recipe.seed), self.recipe, start_step, self.info),
            collate_fn=dataset.collate,
            num_workers=self.recipe.num_workers,
            persistent_workers=False,
        ))

    # ---- checkpoints ----
    def _save_checkpoint(self, model, optimizer, step: int, skipped: int) -> None:
        from vlmkit.train.parallelize import full_model_state, full_optimizer_state, is_sharded

        # Under FSDP every rank joins the gathering; rank 0 then writes what one process would.
        sharded = is_sharded(self.recipe, self.info)
        weights, optimizer_state = full_model_state(model, sharded), full_optimizer_state(model, optimizer, sharded)
        if not self.info.is_main:
            return
        name = f"step-{step:07d}"
        previous = latest_checkpoint(self.run)
        try:
            self._write_checkpoint(model, weights, optimizer_state, name, step, skipped)
        except OSError as error:  # a full disk, a quota, a folder made read-only: the previous checkpoint stays whole
            shutil.rmtree(self.run / CHECKPOINTS / f".{name}.tmp", ignore_errors=True)
            kept = (f"the previous checkpoint {previous.name} is intact; free space and continue with --resume"
                    if previous is not None else "no earlier checkpoint exists; free space and train again")
            if latest_checkpoint(self.run) != previous:  # the checkpoint itself was written, a later file failed
                kept = f"the checkpoint {name} is complete; free space and continue with --resume"
            raise UserError(f"could not save step {step} in {self.run}: {error.strerror or error}; {kept}") from None

    def _write_checkpoint(self, model, weights, optimizer_state, name: str, step: int, skipped: int) -> None:
        """Stage checkpoint `name` in a hidden folder, rename it into place, then point `latest` at it."""
        final = self.run / CHECKPOINTS / name
        staging = self.run / CHECKPOINTS / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_safetensors(weights, staging / WEIGHTS_FILE)
        atomic_torch_save(staging / "state.pt", {
            "optimizer": optimizer_state,
            "step": step,
            "skipped": skipped,
            "rng_torch": torch.get_rng_state(),
            "rng_python": random.getstate(),
        })
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the checkpoint appears whole or not at all
        save_safetensors(weights, self.run / WEIGHTS_FILE)  # the run folder loads as a model
        extras = getattr(model, "save_training_artifacts", None)  # e.g. LoRA adapters in PEFT's layout
        if extras is not None:
            extras(self.run, weights)
        # `latest` moves last: a kill before it resumes from the previous checkpoint and redoes this
        # save, so a run whose `latest` names step N also has step N's weights in its folder.
        atomic_write_bytes(self.run / CHECKPOINTS / "latest", name.encode())
        self._prune_checkpoints()

    def _prune_checkpoints(self) -> None:
        """Keep the newest `keep_checkpoints` checkpoints (never the one `latest` names)."""
        latest = latest_checkpoint(self.run)
        kept = sorted(p for p in (self.run / CHECKPOINTS).glob("step-*") if p.is_dir() and p != latest)
        for old in kept[: max(0, len(kept) + 1 - self.recipe.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)

    def _restore_weights(self, model) -> Path:
        """The latest checkpoint's weights into the (not yet sharded) model; returns the checkpoint."""
        checkpoint = latest_checkpoint(self.run)
        if checkpoint is None:
            raise UserError(f"--resume: {self.run} has no checkpoint to resume from; train without --resume first")
        load_state_dict_strict(model, load_safetensors(checkpoint / WEIGHTS_FILE), str(checkpoint), "vlmkit")
        return checkpoint

    def _restore(self, model, optimizer, checkpoint: Path) -> tuple[int, int]:
        from vlmkit.train.parallelize import is_sharded, load_optimizer_state

        path = checkpoint / "state.pt"
        fix = f"delete {checkpoint.name} and point checkpoints/latest at an older step"
        try:  # weights_only: a pickle in state.pt can name no code to run
            state = torch.load(path, weights_only=True)
        except pickle.UnpicklingError:  # what weights_only raises for anything but tensors and plain containers
            raise UserError(f"cannot resume from {path}: it holds objects other than tensors (a pickle that could run "
                            f"code), which vlmkit never loads; the checkpoint is corrupt or not vlmkit's ({fix})") from None
        except Exception as error:
            raise UserError(f"cannot resume from {path}: {str(error).splitlines()[0][:200]}; the checkpoint is corrupt ({fix})") from None
        try:
            load_optimizer_state(model, optimizer, state["optimizer"], is_sharded(self.recipe, self.info))
            torch.set_rng_state(state["rng_torch"])
            random.setstate(state["rng_python"])
            step, skipped = int(state["step"]), int(state["skipped"])
        except Exception as error:  # a state of the right format whose contents do not fit (missing keys, wrong shapes)
            raise UserError(f"cannot resume from {path}: its contents do not fit this run ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200] if str(error) else 'no details'}); the checkpoint is corrupt ({fix})") from None
        # Lines logged after the checkpoint belong to the interrupted attempt: drop them. Rank 0 only, as
        # for every run-folder write: another rank replacing the file later would drop what rank 0 logs.
        metrics = self.run / METRICS_FILE
        if self.info.is_main and metrics.exists():
            kept = [line for line in metrics.read_text(errors="replace").splitlines() if _logged_step(line) <= step]
            atomic_write_bytes(metrics, ("\n".join(kept) + "\n" if kept else "").encode())
        return step, skipped

    # ---- the loop ----
    def _prepare(self):
        """The model (new or resumed) with tokenizer, transforms and training options, and its dataset;
        everything the recipe asks for is checked here, and nothing is written yet."""
        recipe, run = self.recipe, self.run
        records = self._records()
        if self.resume:
            model, tokenizer = self._resumed_model()
            checkpoint = latest_checkpoint(run)
            if checkpoint is None:
                raise UserError(f"--resume: {run} has no checkpoint to resume from; train without --resume first")
            done = int(checkpoint.name.split("-")[1])
            if done > recipe.steps:  # fewer steps than trained: never silently "finish" a longer run
                raise UserError(f"--resume: {run} has already trained {done} steps and the recipe asks for {recipe.steps}; "
                                f"pass steps=N with N of {done} or more")
        else:
            if (run / CONFIG_FILE).exists() and latest_checkpoint(run) is not None:
                raise UserError(f"{run} already holds a trained run; pass --resume to continue it or choose another --out")
            tokenizer = self._tokenizer(records)
            model = self._new_model(tokenizer, records)
        train_transform, eval_transform = self._image_transforms(model)
        model.tokenizer, model.transform = tokenizer, eval_transform
        model.set_training_options(family_training_options(recipe, self.family))
        for role in self._locked_roles():
            model.tower(role)  # a lock the family cannot honour fails before the run folder is written
        dataset = model.training_dataset(records, train_transform, tokenizer, seed=recipe.seed, caption=recipe.caption)
        return model, dataset

    def _write_run_folder(self, model) -> None:
        """Staging leftovers of a killed save removed; a fresh run's model, recipe and (empty) log written."""
        if not self.info.is_main:
            return
        _remove_leftovers(self.run)
        if not self.resume:
            (self.run / METRICS_FILE).unlink(missing_ok=True)  # a fresh run (over a crashed one) starts a fresh log
            model.save_pretrained(self.run)
            atomic_write_json(self.run / RECIPE_FILE, {"data": str(self.data), **_recipe_dict(self.recipe)})

    def train(self) -> dict:
        model, dataset = self._prepare()
        lock = RunLock(self.run) if self.info.is_main else None  # held from the first write to the last
        try:
            self._write_run_folder(model)
            return self._train(model, dataset)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Outside a checkpoint save (which says more itself): the run folder, the log
            checkpoint = latest_checkpoint(self.run)
            kept = (f"its last checkpoint {checkpoint.name} is intact; free space and continue with --resume"
                    if checkpoint is not None else "it has no checkpoint yet; free space and train again")
            raise UserError(f"the disk holding {self.run} is full ({error.strerror}); {kept}") from None
        finally:
            if lock is not None:
                lock.release()

    def _train(self, model, dataset) -> dict:
        from vlmkit.data.loader import SkipCounter
        from vlmkit.train.parallelize import parallelize, uses_bf16

        recipe, info = self.recipe, self.info
        model.to(info.device)
        for role in self._locked_roles():
            model.lock(role)
        checkpoint = self._restore_weights(model) if self.resume else None  # whole weights, before any sharding
        trained = parallelize(model, recipe, info)  # checkpointing -> FSDP or DDP -> compile, in that order
        # After parallelize: FSDP replaces the parameters by their shards, which the optimizer must hold.
        optimizer = make_optimizer(model, recipe.lr, recipe.weight_decay, (recipe.beta1, recipe.beta2), recipe.eps)
        start_step, skipped = self._restore(model, optimizer, checkpoint) if self.resume else (0, 0)
        use_bf16 = uses_bf16(recipe, info.device)
        autocast = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        micro_batches = self._loader(dataset, start_step)
        log = MetricsLog(self.run, info, recipe.log_every, _progress(recipe.steps, start_step, info.is_main))
        skips = SkipCounter()
        skips.total = skipped
        if start_step >= recipe.steps and info.is_main:  # re-run after a kill at the very end: tidy, then done
            self._prune_checkpoints()
            log.last = self._last_logged()
            print(f"vlmkit: {self.run} has already trained all {recipe.steps} steps; nothing left to train "
                  f"(pass steps=N above {recipe.steps} to train on)", file=sys.stderr)
        window_start, window_samples, trained_samples = time.perf_counter(), 0, 0
        model.train()
        try:
            for step in range(start_step, recipe.steps):
                lr = learning_rate(step, recipe.lr, recipe.warmup_steps, recipe.steps, recipe.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logs, samples = self._step(trained, model, optimizer, micro_batches, skips, autocast)
                window_samples += samples * info.world_size
                trained_samples += samples
                elapsed = time.perf_counter() - window_start
                log.add(step + 1, lr, logs, window_samples / max(elapsed, 1e-9), skips.total)
                if (step + 1) % recipe.log_every == 0:
                    window_start, window_samples = time.perf_counter(), 0
                if (step + 1) % recipe.save_every == 0 or step + 1 == recipe.steps:
                    # (one rank of several may legitimately get only unreadable samples: checked alone only)
                    if trained_samples == 0 and not info.enabled:
                        steps = f"the first {step + 1} steps" if start_step == 0 else f"steps {start_step + 1}-{step + 1}"
                        raise UserError(f"no sample of {steps} could be read ({skips.message()}); "
                                        f"nothing was trained or saved")
                    log.flush()
                    self._save_checkpoint(model, optimizer, step + 1, skips.total)
        finally:
            log.close()
        self._finish(skips)
        return {"run": str(self.run), "steps": recipe.steps, "loss": log.last.get("loss"),
                "samples_per_s": log.last.get("samples_per_s"), **skips.summary()}

    def _last_logged(self) -> dict:
        """The last complete row of metrics.jsonl (empty if none)."""
        lines = (self.run / METRICS_FILE).read_text(errors="replace").splitlines() if (self.run / METRICS_FILE).exists() else []
        for line in reversed(lines):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                return row
        return {}

    def _step(self, trained, model, optimizer, micro_batches, skips, autocast) -> tuple[dict, int]:
        """One optimizer step over `grad_accum` micro-batches: (mean logs as tensors, samples used)."""
        recipe, device = self.recipe, self.info.device
        logs: dict[str, torch.Tensor] = {}
        samples = 0
        for _ in range(recipe.grad_accum):
            batch = next(micro_batches)
            skips.update(batch)
            rows = _rows(batch)
            if rows == 0:  # every sample of this micro-batch was unreadable
                continue
            batch = {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()}
            with autocast():
                output = trained(batch)
            (output.loss / recipe.grad_accum).backward()
            samples += rows
            for key, value in output.logs.items():
                logs[key] = logs.get(key, 0.0) + value / recipe.grad_accum
        if samples:
            if recipe.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip).detach()
                logs["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor
            optimizer.step()
            model.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        return logs, samples

    def _finish(self, skips) -> None:
        if self.info.is_main:
            from vlmkit import plots

            if plots.available(skipping=self.run / "loss_curve.png"):  # the plots extra is optional
                plots.plot_loss_curve(self.run / METRICS_FILE, self.run / "loss_curve.png")
            if skips.message():
                print(f"vlmkit: {skips.message()}", file=sys.stderr)
        distributed.teardown(self.info)


def _recipe_dict(recipe: Recipe) -> dict:
    from vlmkit.config import to_dict

    return to_dict(recipe)


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
