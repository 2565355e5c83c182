"""Gaussian diffusion for any noise-predicting network: schedules, the training target, DDPM and DDIM
sampling and classifier-free guidance (Ho et al. 2020, Nichol & Dhariwal 2021, Song et al. 2021,
Ho & Salimans 2021 as GLIDE uses them). Nothing here knows a model family.

Forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t in [0, T). The network predicts eps.
Schedules (guided-diffusion's gaussian_diffusion.py): `cosine` ("squaredcos_cap_v2"):
abar(t) = cos^2(((t / T) + 0.008) / 1.008 * pi / 2), beta_i = min(1 - abar(i + 1) / abar(i), 0.999);
`linear`: beta from 1e-4 * 1000 / T to 0.02 * 1000 / T.

Sampling walks a subsequence t_S > ... > t_1 of the training steps (evenly spaced; all T of them
for `steps = T`). With abar = abar_{t_i}, abar' = abar_{t_{i-1}} (1 after the last step),
x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (clipped to [-1, 1]; eps is then re-derived from it):
- DDIM: x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z,
  sigma = eta * sqrt((1 - abar') / (1 - abar) * (1 - abar / abar')); eta = 0 is deterministic.
- DDPM (ancestral, on the respaced chain with beta = 1 - abar / abar'): x' = the posterior mean
  sqrt(abar') beta / (1 - abar) x0 + sqrt(1 - beta) (1 - abar') / (1 - abar) x_t, plus
  sqrt(beta (1 - abar') / (1 - abar)) z. DDIM with eta = 1 is the same step (tested).
Noise z is drawn for every step but the last, from one seeded generator, so a seed gives the same
images whatever the sampler.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SCHEDULES = ("cosine", "linear")
SAMPLERS = ("ddpm", "ddim")

# eps_fn(x_t (B, C, H, W), t (B,) long) -> predicted eps (B, C, H, W)
EpsFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_alpha_bar(t: torch.Tensor | float) -> torch.Tensor:
    """abar at fractional time t = step / T in [0, 1]: cos^2(((t + 0.008) / 1.008) * pi / 2)."""
    t = torch.as_tensor(t, dtype=torch.float64, device="cpu")
    return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """(T,) float64 betas of the cosine schedule: beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta)."""
    steps = torch.arange(num_steps, dtype=torch.float64, device="cpu")  # never the meta device a model is built on
    betas = 1 - cosine_alpha_bar((steps + 1) / num_steps) / cosine_alpha_bar(steps / num_steps)
    return betas.clamp(max=max_beta)


def linear_betas(num_steps: int) -> torch.Tensor:
    """(T,) float64 betas of DDPM's linear schedule, scaled to T steps as guided-diffusion does."""
    scale = 1000 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64, device="cpu")


def make_betas(schedule: str, num_steps: int) -> torch.Tensor:
    """The betas of a named schedule (`cosine` or `linear`)."""
    if schedule == "cosine":
        return cosine_betas(num_steps)
    if schedule == "linear":
        return linear_betas(num_steps)
    raise ValueError(f"unknown noise schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def respaced_timesteps(num_steps: int, steps: int) -> list[int]:
    """`steps` training timesteps, evenly spaced from 0 to T - 1 and descending (all T for steps >= T)."""
    steps = min(steps, num_steps)
    if steps == 1:
        return [num_steps - 1]
    spaced = torch.linspace(0, num_steps - 1, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(spaced), reverse=True)


def guided_eps(eps_conditional: torch.Tensor, eps_unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps(x, empty) + s * (eps(x, c) - eps(x, empty))."""
    return eps_unconditional + scale * (eps_conditional - eps_unconditional)


class GaussianDiffusion:
    """The schedule's cumulative products and the three things done with them: noising a batch for
    training, and sampling with DDPM or DDIM. Tensors are kept in float64 and cast on use."""

    def __init__(self, betas: torch.Tensor) -> None:
        self.betas = betas.to(torch.float64)
        self.num_steps = len(betas)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # (T,) abar_t

    @classmethod
    def named(cls, schedule: str, num_steps: int) -> "GaussianDiffusion":
        return cls(make_betas(schedule, num_steps))

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t gathered for a (B,) batch of steps, shaped (B, 1, 1, 1) like `like`."""
        values = self.alphas_cumprod.to(t.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for (B,) steps t."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022), the `prediction: v` target."""
        abar = self._abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v: a v-predicting network's output as the eps the samplers use."""
        abar = self._abar(t, x_t)
        return (1 - abar).sqrt() * x_t + abar.sqrt() * v

    def step(self, x: torch.Tensor, t: int, t_prev: int | None, eps: torch.Tensor, noise: torch.Tensor | None,
             sampler: str = "ddim", eta: float = 0.0, clip: bool = True) -> torch.Tensor:
        """One reverse step from training step `t` to `t_prev` (None: to the clean image) given the
        predicted eps; `noise` (like x) is used when the step is stochastic. See the module docstring."""
        abar = float(self.alphas_cumprod[t])
        abar_prev = 1.0 if t_prev is None else float(self.alphas_cumprod[t_prev])
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)  # consistent with the clipped x0
        if sampler == "ddpm":
            beta = 1 - abar / abar_prev
            mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * x
            sigma = math.sqrt(max(beta * (1 - abar_prev) / (1 - abar), 0.0))
        elif sampler == "ddim":
            sigma = eta * math.sqrt(max((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev), 0.0))
            mean = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
        else:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        if noise is None or sigma == 0.0:
            return mean
        return mean + sigma * noise

    def sample(self, eps_fn: EpsFunction, shape: tuple[int, ...], steps: int, sampler: str = "ddim", eta: float = 0.0,
               generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, clip: bool = True) -> torch.Tensor:
        """Images (shape, in [-1, 1] when `clip`) from noise drawn with `generator`, walking `steps`
        respaced timesteps with `sampler` ("ddpm" or "ddim" with `eta`)."""
        timesteps = respaced_timesteps(self.num_steps, steps)
        x = torch.randn(shape, generator=generator, dtype=dtype).to(device)  # drawn on the CPU: same seed, same images anywhere
        for index, t in enumerate(timesteps):
            t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else None
            eps = eps_fn(x, torch.full((shape[0],), t, dtype=torch.long, device=device))
            noise = None if t_prev is None else torch.randn(shape, generator=generator, dtype=dtype).to(device)
            x = self.step(x, t, t_prev, eps, noise, sampler=sampler, eta=eta, clip=clip)
        return x
