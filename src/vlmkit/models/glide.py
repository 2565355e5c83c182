"""GLIDE (Nichol et al. 2022): text-conditional diffusion with classifier-free guidance.

caption tokens -> text transformer -> tokens (B, L, Dt) + pooled end token (B, Dt)
x_0 = the image in [-1, 1]; t ~ U{0..T-1}; eps ~ N(0, I); x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
U-Net(x_t, t, tokens -> every attention block's extra keys/values, pooled -> + timestep embedding) -> eps_hat
loss = || eps_hat - eps ||^2 (noise prediction, cosine schedule)

The caption is dropped in `training.caption_dropout` (the paper's 20%) of the rows: the row then
sees a learned "empty caption" (one null token for the attention, a null pooled vector), standing
for GLIDE's empty, all-padding token sequence. Sampling runs each step on [caption; empty] rows and
guides: eps = eps(x, empty) + s * (eps(x, caption) - eps(x, empty)) (s = 1: the conditional model
alone). DDPM or DDIM (vlmkit.diffusion), any number of steps, seeded.

An exponential moving average of the trained weights (text tower, empty caption, U-Net; `ema_decay`,
GLIDE's 0.9999, 0 = none) is updated after every optimizer step with the warm-up
decay_n = min(ema_decay, (1 + n) / (10 + n)) for the n-th update, saved with the model, and is what
`imagine` samples with (`weights="online"` samples the trained weights instead). Unlike GLIDE there is
no learned variance (fixed posterior variance) and no super-resolution stage.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.capabilities import Imagines
from vlmkit.config import bounded, check_fields
from vlmkit.data.transforms import CLIP_MEAN, CLIP_STD
from vlmkit.diffusion import SAMPLERS, SCHEDULES, GaussianDiffusion, guided_eps
from vlmkit.encoders.config import TextConfig, build_text_tower
from vlmkit.encoders.lm import random_texts
from vlmkit.encoders.unet import TextConditionalUNet
from vlmkit.errors import UserError
from vlmkit.layers.moving_average import copy_weights, paired_parameters, update_moving_average
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


@dataclass
class UNetConfig:
    """The denoising U-Net (GLIDE base 64 px: 192 channels, mult 1,2,3,4, 3 blocks, attention at 32,16,8)."""

    image_size: int = bounded(64, low=4)
    channels: int = bounded(192, low=1)
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = bounded(3, low=1)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    heads: int = bounded(4, low=1)
    groups: int = bounded(32, low=1)  # GroupNorm groups (the gcd with the channel count is used)
    dropout: float = bounded(0.1, low=0, high=1, high_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "unet", ".")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise UserError(f"unet.channel_mult must be positive multipliers, got {list(self.channel_mult)}")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise UserError(f"unet.image_size {self.image_size} must halve {len(self.channel_mult) - 1} times "
                            f"(one per unet.channel_mult level after the first)")
        widths = [self.channels * m for m in self.channel_mult]
        if any(width % self.heads for width in widths):
            raise UserError(f"unet.heads {self.heads} must divide every level's width {widths}")


@dataclass
class GLIDEConfig:
    text: TextConfig = field(default_factory=lambda: TextConfig(width=512, depth=16, heads=8, context_length=128))
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: str = "cosine"  # cosine (GLIDE's base model) | linear
    # What the U-Net predicts: eps (GLIDE, the noise-prediction loss) or v = sqrt(abar) eps - sqrt(1 - abar) x_0
    # (Salimans & Ho 2022; better conditioned at high noise). Sampling and guidance work on eps either way.
    prediction: str = "eps"
    diffusion_steps: int = bounded(1000, low=2)
    # What `imagine` does when not told otherwise.
    sampler: str = "ddim"
    sample_steps: int = bounded(50, low=1)
    guidance: float = bounded(3.0, low=0)
    eta: float = bounded(0.0, low=0)
    # Moving average of the weights that sampling uses (guided-diffusion's ema_rate 0.9999); 0: none.
    ema_decay: float = bounded(0.9999, low=0, high=1, high_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "glide", ".")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.prediction not in ("eps", "v"):
            raise UserError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")

    @property
    def vision(self) -> UNetConfig:
        """What the trainer reads the image size from (`config.vision.image_size`)."""
        return self.unet


@dataclass
class GLIDETraining:
    """The recipe's `training:` options of GLIDE."""

    caption_dropout: float = bounded(0.2, low=0, high=1)  # share of rows trained with the empty caption


@register_family
class GLIDE(VLModel):
    family = "glide"
    config_class = GLIDEConfig
    capabilities = (Imagines,)
    imagine_options = ("guidance", "steps", "sampler", "eta", "weights")
    training_class = GLIDETraining
    towers = {"text": "text"}
    tower_configs = {"text": "text"}
    uses_every_parameter = True  # dropped captions mix the null embeddings in with torch.where: all are used

    def __init__(self, config: GLIDEConfig) -> None:
        super().__init__(config)
        text, unet = config.text, config.unet
        self.text = build_text_tower(text, output_dim=None)
        self.null_context = nn.Parameter(torch.randn(1, 1, text.width) * 0.02)  # the empty caption's one token
        self.null_pooled = nn.Parameter(torch.zeros(text.width))
        self.unet = TextConditionalUNet(
            unet.image_size, 3, unet.channels, tuple(unet.channel_mult), unet.num_res_blocks,
            tuple(unet.attention_resolutions), unet.heads, context_dim=text.width, groups=unet.groups, dropout=unet.dropout,
        )
        self.diffusion = GaussianDiffusion.named(config.schedule, config.diffusion_steps)
        if config.ema_decay > 0:
            # Averaged copies, never trained (no gradient, not in the optimizer); `ema_updates` counts updates.
            self.ema_text, self.ema_unet = copy.deepcopy(self.text), copy.deepcopy(self.unet)
            self.ema_text.requires_grad_(False)
            self.ema_unet.requires_grad_(False)
            self.register_buffer("ema_null_context", self.null_context.detach().clone())
            self.register_buffer("ema_null_pooled", self.null_pooled.detach().clone())
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    # ---- the moving average ---------------------------------------------------------------
    def has_ema(self) -> bool:
        return self.config.ema_decay > 0

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(trained, averaged) tensors, matched by name."""
        trained, averaged = paired_parameters([(self.text, self.ema_text), (self.unet, self.ema_unet)])
        return [self.null_context, self.null_pooled, *trained], [self.ema_null_context, self.ema_null_pooled, *averaged]

    def after_optimizer_step(self) -> None:
        """ema <- decay_n * ema + (1 - decay_n) * weights, decay_n = min(ema_decay, (1 + n) / (10 + n))."""
        if not self.has_ema():
            return
        updates = int(self.ema_updates)
        trained, averaged = self._ema_pairs()
        update_moving_average(averaged, trained, min(self.config.ema_decay, (1 + updates) / (10 + updates)))
        self.ema_updates += 1

    def reset_ema(self) -> None:
        """Restart the average from the current weights (its warm-up too)."""
        if self.has_ema():
            trained, averaged = self._ema_pairs()
            copy_weights(averaged, trained)
            self.ema_updates.zero_()

    def after_pretrained_towers(self) -> None:
        """A pretrained text tower (`init_text`) goes into the average too."""
        self.reset_ema()

    def _weights(self, ema: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
        """(text tower, null token, null pooled, U-Net): the averaged ones or the trained ones."""
        if ema and self.has_ema():
            return self.ema_text, self.ema_null_context, self.ema_null_pooled, self.ema_unet
        return self.text, self.null_context, self.null_pooled, self.unet

    # ---- conditioning -------------------------------------------------------------------
    def conditioning(self, tokens: torch.Tensor, drop: torch.Tensor, ema: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption tokens (B, L) and which rows get the empty caption (B,) bool -> (context (B, 1+L, Dt),
        context mask (B, 1+L) bool, pooled (B, Dt)). A kept row sees its tokens, a dropped row only the null token.
        `ema`: with the averaged weights."""
        text, null_context, null_pooled, _ = self._weights(ema)
        out = text(tokens)
        context = out.tokens  # (B, L', Dt); trailing all-padding columns trimmed by the tower
        real = text.real_tokens(tokens)[:, : context.shape[1]]  # (B, L')
        batch = tokens.shape[0]
        context = torch.cat([null_context.expand(batch, -1, -1).to(context.dtype), context], dim=1)  # (B, 1+L', Dt)
        mask = torch.cat([drop[:, None], real & ~drop[:, None]], dim=1)  # (B, 1+L')
        pooled = torch.where(drop[:, None], null_pooled.to(out.pooled.dtype).expand_as(out.pooled), out.pooled)  # (B, Dt)
        return context, mask, pooled

    def to_diffusion_space(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels (the trainer's transform normalises with CLIP's statistics) -> the
        [-1, 1] images the model denoises."""
        mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels * std + mean) * 2 - 1

    # ---- training -----------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        x0 = self.to_diffusion_space(batch["pixels"])  # (B, 3, H, W) in [-1, 1]
        tokens = batch["tokens"]  # (B, L)
        rows = x0.shape[0]
        # Tests pass the random draws in; training draws them here.
        t = batch.get("timesteps")
        if t is None:
            t = torch.randint(0, self.config.diffusion_steps, (rows,), device=x0.device)
        noise = batch.get("noise")
        if noise is None:
            noise = torch.randn_like(x0)
        drop = batch.get("drop_caption")
        if drop is None:
            drop = torch.rand(rows, device=x0.device) < self.training_options.caption_dropout
        x_t = self.diffusion.q_sample(x0, t, noise)  # (B, 3, H, W)
        context, mask, pooled = self.conditioning(tokens, drop.bool())
        prediction = self.unet(x_t, t, context, mask, pooled)  # (B, 3, H, W)
        target = noise if self.config.prediction == "eps" else self.diffusion.v_target(x0, t, noise)
        loss = F.mse_loss(prediction.float(), target.float())
        return ModelOutput(loss=loss, logs=detached_logs(loss=loss, dropped=drop.float().mean()))

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        size = self.config.unet.image_size
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        return {
            "pixels": pixels,
            "tokens": random_texts(self.config.text, batch_size, generator),
            "timesteps": torch.randint(0, self.config.diffusion_steps, (batch_size,), generator=generator),
            "noise": torch.randn(batch_size, 3, size, size, generator=generator),
            "drop_caption": torch.arange(batch_size) % 2 == 1,  # both kinds of rows
        }

    # ---- sampling -----------------------------------------------------------------------
    def _sampling_options(self, options: dict[str, Any]) -> tuple[float, int, str, float, bool]:
        unknown = sorted(set(options) - set(self.imagine_options))
        if unknown:
            raise UserError(f"the 'glide' model family does not take the option {unknown[0]!r}; it takes seed, "
                            f"{', '.join(self.imagine_options)}")
        config = self.config
        guidance = float(options.get("guidance") if options.get("guidance") is not None else config.guidance)
        steps = int(options.get("steps") if options.get("steps") is not None else config.sample_steps)
        sampler = options.get("sampler") if options.get("sampler") is not None else config.sampler
        eta = float(options.get("eta") if options.get("eta") is not None else config.eta)
        if guidance < 0:
            raise UserError(f"guidance {guidance} is negative; give a scale of 0 or more (1 = no guidance, e.g. 3)")
        if steps < 1:
            raise UserError(f"steps {steps} samples nothing; give 1 or more sampling steps, e.g. 50")
        if sampler not in SAMPLERS:
            raise UserError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}; choose one")
        if eta < 0:
            raise UserError(f"eta {eta} is negative; give 0 (deterministic DDIM) to 1 (DDPM-like)")
        weights = options.get("weights") or "ema"
        if weights not in ("ema", "online"):
            raise UserError(f"weights {weights!r} is not 'ema' (the moving average, when the model keeps one) or 'online'")
        return guidance, steps, sampler, eta, weights == "ema"

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                    pooled: torch.Tensor, ema: bool = False) -> torch.Tensor:
        """The U-Net's output as eps (converted from v when the model predicts v). (B, 3, H, W)"""
        out = self._weights(ema)[3](x_t, t, context, mask, pooled)
        return out if self.config.prediction == "eps" else self.diffusion.eps_from_v(x_t, t, out)

    def guided_eps_fn(self, tokens: torch.Tensor, guidance: float, ema: bool = True):
        """eps_fn(x_t, t) for `GaussianDiffusion.sample`: the captions' eps guided against the empty
        caption's. s = 1 runs the conditional rows only, s = 0 the unconditional ones only. `ema`:
        with the averaged weights (when the model keeps them)."""
        rows = tokens.shape[0]
        keep, drop = torch.zeros(rows, dtype=torch.bool, device=tokens.device), torch.ones(rows, dtype=torch.bool, device=tokens.device)
        if guidance == 1.0 or guidance == 0.0:
            context, mask, pooled = self.conditioning(tokens, drop if guidance == 0.0 else keep, ema)
            return lambda x, t: self.predict_eps(x, t, context, mask, pooled, ema)
        # Text encoded once for the whole loop: [caption rows; empty-caption rows].
        context, mask, pooled = self.conditioning(torch.cat([tokens, tokens]), torch.cat([keep, drop]), ema)

        def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = self.predict_eps(torch.cat([x, x]), torch.cat([t, t]), context, mask, pooled, ema)  # (2B, 3, H, W)
            conditional, unconditional = eps.chunk(2)
            return guided_eps(conditional, unconditional, guidance)

        return eps_fn

    @torch.no_grad()
    def imagine(self, prompts: Sequence[str], seed: int = 0, **options) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1], one per prompt; options: guidance, steps, sampler, eta (the
        config's defaults otherwise), weights ("ema", the default: the moving average when the model
        keeps one; "online": the trained weights). The same seed gives the same images."""
        guidance, steps, sampler, eta, ema = self._sampling_options(options)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not str(prompt).strip() for prompt in prompts):
            raise UserError("a prompt is empty; give a prompt that describes the image, e.g. \"a red triangle\"")
        was_training = self.training
        self.eval()
        try:
            tokens = self.tokenize(prompts).to(self.device)  # (B, L)
            size = self.config.unet.image_size
            generator = torch.Generator().manual_seed(int(seed))
            images = self.diffusion.sample(self.guided_eps_fn(tokens, guidance, ema), (len(prompts), 3, size, size), steps,
                                           sampler=sampler, eta=eta, generator=generator, device=self.device)
        finally:
            self.train(was_training)
        return ((images.float() + 1) / 2).clamp(0, 1)


register_config("glide-tiny", "glide", tiny=True, config={
    # 32 px: 32 channels at 32x32, 64 at 16x16 and 8x8, attention with the text at 8x8. The U-Net has
    # 1.3M parameters, the text tower 0.5M: about 1 step of 32 images a second on one CPU thread. (An
    # 8/16/32-channel U-Net of 0.2M parameters with attention at 16 and 8 stayed at chance after 900
    # steps; this one draws the prompted colour and shape: README, "GLIDE text to image".) It predicts v:
    # after 1,500 steps GLIDE's eps prediction still leaves noise in 25-step DDIM samples (judge accuracy
    # 0.10 guided, against 0.58 for v).
    "prediction": "v",
    "text": {"width": 128, "depth": 2, "heads": 4, "context_length": 32, "vocab_size": 1024, "eos_token_id": 1023},
    "unet": {"image_size": 32, "channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
             "attention_resolutions": [8], "heads": 2, "groups": 8, "dropout": 0.0},
})
register_config("glide-base-64", "glide", config={
    # GLIDE's 64 px base model (model_and_diffusion_defaults), without the learned variance channels.
    "text": {"width": 512, "depth": 16, "heads": 8, "context_length": 128, "vocab_size": 50257, "eos_token_id": 50256},
    "unet": {"image_size": 64, "channels": 192, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 3,
             "attention_resolutions": [32, 16, 8], "heads": 3, "groups": 32, "dropout": 0.1},
})
