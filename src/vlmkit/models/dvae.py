"""DALL-E's discrete VAE trained on its own (stage 1 of DALL-E; Ramesh et al. 2021, appendix A).

    pixels -> encoder -> logits (B, K, h, w) -> Gumbel-softmax(logits, tau) -> soft one-hot
           -> decoder -> reconstruction (B, 3, H, W)
    loss = MSE(reconstruction, pixels) / (2 sigma^2) + beta * KL(q(z | x) || uniform) per grid cell / pixels per cell

The relaxation temperature tau is annealed from `temperature_start` to `temperature_end` along
a cosine over `temperature_steps` updates and the KL weight beta is warmed up linearly from 0 over
`kl_warmup_steps` (the paper: tau 1 -> 1/16 over 150k updates, beta 0 -> 6.6 over 5,000). The
KL is divided by the values each grid cell explains (3 f^2), as the paper's ELB is normalised per
dimension. The schedules read the count of optimizer updates, a buffer of the model advanced by
`after_optimizer_step`, so a resumed run continues them exactly. At inference the codes are the
argmax of the logits (OpenAI's `encode`), which is what `reconstruct` and DALL-E see.

The reconstruction term is the negative log-likelihood per value of a Gaussian of fixed
`pixel_sigma` (0.1 of the [0, 1] range), up to a constant, not the paper's logit-Laplace: both
are in nats per value, so the paper's beta = 6.6 keeps its meaning. Under Adam only the ratio of
the two terms matters; with plain MSE (sigma^2 = 1/2) that beta would outweigh any gain in
reconstruction and every code would collapse to the uniform prior.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.capabilities import Reconstructs
from vlmkit.config import bounded, check_fields
from vlmkit.encoders.dvae import DiscreteVAE, DiscreteVAEConfig, cosine_anneal, kl_to_uniform, linear_warmup
from vlmkit.errors import UserError
from vlmkit.models.base import ModelOutput, VLModel, detached_logs
from vlmkit.models.registry import register_config, register_family


@dataclass
class DVAEModelConfig:
    vision: DiscreteVAEConfig = field(default_factory=DiscreteVAEConfig)


@dataclass
class DVAETraining:
    """The recipe's `training:` options of the discrete VAE (its relaxation and KL schedules)."""

    temperature_start: float = bounded(1.0, low=0, low_open=True)
    temperature_end: float = bounded(1 / 16, low=0, low_open=True)
    temperature_steps: int = bounded(150_000, low=0)
    kl_weight: float = bounded(6.6, low=0)
    kl_warmup_steps: int = bounded(5_000, low=0)
    pixel_sigma: float = bounded(0.1, low=0, low_open=True)  # the reconstruction likelihood's std, [0, 1] pixels

    def __post_init__(self) -> None:
        check_fields(self, "training", separator=".")
        if self.temperature_end > self.temperature_start:
            raise UserError(f"training.temperature_end {self.temperature_end} is above temperature_start "
                            f"{self.temperature_start}; the temperature is annealed downwards")


@register_family
class DVAE(VLModel):
    family = "dvae"
    config_class = DVAEModelConfig
    training_class = DVAETraining
    capabilities = (Reconstructs,)
    towers = {"image": "vae"}  # what DALL-E's init_image copies
    uses_every_parameter = True

    def __init__(self, config: DVAEModelConfig) -> None:
        super().__init__(config)
        self.vae = DiscreteVAE(config.vision)
        # Optimizer updates so far: the schedules' clock (saved with the weights, so --resume continues it).
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def after_optimizer_step(self) -> None:
        self.updates += 1

    def schedules(self) -> tuple[float, float]:
        """(temperature, KL weight) at the current update."""
        options, step = self.training_options, int(self.updates)
        temperature = cosine_anneal(step, options.temperature_start, options.temperature_end, options.temperature_steps)
        return temperature, linear_warmup(step, options.kl_weight, options.kl_warmup_steps)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        target = self.vae.to_unit_range(batch["pixels"])  # (B, 3, H, W) in [0, 1]
        logits = self.vae.encoder(target)  # (B, K, h, w)
        temperature, kl_weight = self.schedules()
        if self.training:
            codes = F.gumbel_softmax(logits, tau=temperature, dim=1)  # (B, K, h, w), relaxed one-hot
        else:  # evaluation: the hard argmax codes inference uses (deterministic)
            codes = F.one_hot(logits.argmax(dim=1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        reconstruction = self.vae.decoder(codes)  # (B, 3, H, W)
        mse = F.mse_loss(reconstruction, target)
        pixels_per_cell = 3 * (target.shape[-1] // logits.shape[-1]) ** 2
        kl = kl_to_uniform(logits).mean()  # nats per grid cell
        loss = mse / (2 * self.training_options.pixel_sigma ** 2) + kl_weight * kl / pixels_per_cell
        with torch.no_grad():
            hard = logits.argmax(dim=1)  # (B, h, w)
            used = torch.bincount(hard.flatten(), minlength=logits.shape[1]).float()
            probs = used / used.sum()
            perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum())  # codebook usage of the batch
        return ModelOutput(loss=loss, logs=detached_logs(
            loss=loss, mse=mse, kl=kl, temperature=torch.tensor(temperature), kl_weight=torch.tensor(kl_weight),
            code_perplexity=perplexity))

    # ---- capability -------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> the decoded argmax codes, [0, 1] pixels (B, 3, H, W)."""
        return self.vae.decode(self.vae.encode(pixels))

    def unit_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The [0, 1] image the normalised `pixels` show (what a reconstruction is compared with)."""
        return self.vae.to_unit_range(pixels)

    def dummy_batch(self, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        size = self.config.vision.image_size
        return {"pixels": torch.randn(batch_size, 3, size, size, generator=generator)}


register_config("dvae-tiny", "dvae", tiny=True, config={
    # 32 px -> an 8x8 grid of 512 codes (3 groups: two 2x poolings), widths 32-64-128.
    "vision": {"image_size": 32, "num_tokens": 512, "hidden": 32, "groups": 3, "blocks_per_group": 1, "decoder_init": 64},
})
register_config("dvae-openai", "dvae", config={
    # openai/DALL-E's dVAE: 256 px -> 32x32 codes of 8192, n_hid 256, 4 groups of 2 blocks, n_init 128.
    "vision": {"image_size": 256, "num_tokens": 8192, "hidden": 256, "groups": 4, "blocks_per_group": 2, "decoder_init": 128},
})
