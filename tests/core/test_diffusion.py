"""vlmkit.diffusion against its formulas: the cosine schedule, the DDIM and DDPM updates, guidance,
and DDIM with steps = T and eta = 1 being DDPM."""
import math

import pytest
import torch

from vlmkit.diffusion import GaussianDiffusion, cosine_betas, guided_eps, linear_betas, respaced_timesteps


def test_cosine_schedule_follows_its_formula():
    T = 1000
    f = [math.cos(((t / T) + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)], dtype=torch.float64)
    betas = cosine_betas(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert torch.allclose(betas, expected, rtol=1e-12, atol=1e-15)
    assert betas.max() == pytest.approx(0.999) and bool((betas[1:] >= betas[:-1]).all())  # clipped at the end, increasing
    abar = GaussianDiffusion(betas).alphas_cumprod
    # Before the clip bites, abar_t is the closed form f(t + 1) / f(0).
    assert torch.allclose(abar[:900], torch.tensor(f[1:901], dtype=torch.float64) / f[0], rtol=1e-9)
    assert torch.allclose(linear_betas(1000)[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))


def test_respaced_timesteps():
    assert respaced_timesteps(10, 10) == list(range(9, -1, -1))
    assert respaced_timesteps(10, 50) == list(range(9, -1, -1))
    assert respaced_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert respaced_timesteps(1000, 1) == [999]


def test_q_sample_and_ddim_step_match_their_formulas():
    diffusion = GaussianDiffusion(cosine_betas(1000))
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(2, 3, 4, 4, generator=generator) * 2 - 1, torch.randn(2, 3, 4, 4, generator=generator)
    t = torch.tensor([10, 700])
    abar = diffusion.alphas_cumprod[t].float().view(2, 1, 1, 1)
    assert torch.allclose(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)

    x, eps, z = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(3))
    a, a_prev = float(diffusion.alphas_cumprod[600]), float(diffusion.alphas_cumprod[400])
    eta = 0.5
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    expected = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma ** 2) * eps + sigma * z
    got = diffusion.step(x, 600, 400, eps, z, sampler="ddim", eta=eta, clip=False)
    assert torch.allclose(got, expected, atol=1e-5)
    # eta = 0: deterministic, the noise is not used; the last step returns x0.
    assert torch.equal(diffusion.step(x, 600, 400, eps, z, sampler="ddim", eta=0.0, clip=False),
                       diffusion.step(x, 600, 400, eps, None, sampler="ddim", eta=0.0, clip=False))
    assert torch.allclose(diffusion.step(x, 600, None, eps, z, sampler="ddim", clip=False), x0_hat, atol=1e-5)
    # Clipping keeps x0 in [-1, 1].
    clipped = diffusion.step(x * 50, 600, None, eps, None, sampler="ddim", clip=True)
    assert clipped.abs().max() <= 1 + 1e-6 and clipped.abs().max() == pytest.approx(1.0)


def test_ddpm_step_is_the_posterior_of_the_respaced_chain():
    diffusion = GaussianDiffusion(cosine_betas(1000))
    generator = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(1, 3, 4, 4, generator=generator) for _ in range(3))
    a, a_prev = float(diffusion.alphas_cumprod[300]), float(diffusion.alphas_cumprod[299])
    beta = float(diffusion.betas[300])  # adjacent steps: the respaced beta is the schedule's own
    assert 1 - a / a_prev == pytest.approx(beta, rel=1e-9)
    x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mean = math.sqrt(a_prev) * beta / (1 - a) * x0_hat + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
    variance = beta * (1 - a_prev) / (1 - a)
    got = diffusion.step(x, 300, 299, eps, z, sampler="ddpm", clip=False)
    assert torch.allclose(got, mean + math.sqrt(variance) * z, atol=1e-5)


def test_guidance_is_the_classifier_free_formula():
    conditional, unconditional = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.allclose(guided_eps(conditional, unconditional, 3.0), unconditional + 3.0 * (conditional - unconditional))
    assert torch.equal(guided_eps(conditional, unconditional, 1.0), conditional)
    assert torch.equal(guided_eps(conditional, unconditional, 0.0), unconditional)


def _eps_fn(x, t):
    """A made-up but non-trivial noise predictor, the same for every sampler."""
    return 0.3 * x + 0.1 * torch.sin(t.float().view(-1, 1, 1, 1) / 7)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_with_every_step_and_eta_1_is_ddpm(clip):
    diffusion = GaussianDiffusion(cosine_betas(40))
    shape = (2, 3, 4, 4)
    ddpm = diffusion.sample(_eps_fn, shape, steps=40, sampler="ddpm", generator=torch.Generator().manual_seed(3), clip=clip)
    ddim = diffusion.sample(_eps_fn, shape, steps=40, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(3), clip=clip)
    assert torch.allclose(ddpm, ddim, atol=1e-5)
    deterministic = diffusion.sample(_eps_fn, shape, steps=40, sampler="ddim", eta=0.0, generator=torch.Generator().manual_seed(3), clip=clip)
    assert not torch.allclose(ddpm, deterministic, atol=1e-3)  # eta matters: the equality above is not vacuous
    fewer = diffusion.sample(_eps_fn, shape, steps=8, sampler="ddim", generator=torch.Generator().manual_seed(3), clip=clip)
    assert fewer.shape == shape and torch.isfinite(fewer).all()


def test_v_prediction_converts_back_to_the_noise():
    diffusion = GaussianDiffusion(cosine_betas(1000))
    generator = torch.Generator().manual_seed(2)
    x0, noise = torch.rand(3, 3, 4, 4, generator=generator) * 2 - 1, torch.randn(3, 3, 4, 4, generator=generator)
    t = torch.tensor([0, 500, 998])
    x_t = diffusion.q_sample(x0, t, noise)
    v = diffusion.v_target(x0, t, noise)
    abar = diffusion.alphas_cumprod[t].float().view(3, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0, atol=1e-6)
    assert torch.allclose(diffusion.eps_from_v(x_t, t, v), noise, atol=1e-5)
