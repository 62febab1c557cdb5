"""core.diffusion against diffusers' own arithmetic (issue 16, item 7): the x0 and v conversions must agree with
`DDIMScheduler.step(...).pred_original_sample`, `add_noise` and `get_velocity`, for ε and v-prediction bases."""

from __future__ import annotations

import pytest
import torch

from digseg_cli.core import diffusion

BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _scheduler(kind: str):
    return diffusion.make_scheduler({**BASE, "prediction_type": kind})


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_clean_latent_matches_ddim_step_pred_original_sample(kind):
    scheduler = _scheduler(kind)
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps[[0, 10, 25, 49]]:
        z_t, pred = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ours = diffusion.predicted_clean_latent(pred, z_t, t.expand(2), scheduler)
        theirs = scheduler.step(pred, t, z_t, eta=0.0).pred_original_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_forward_process_and_target_match_add_noise_and_get_velocity(kind):
    scheduler = _scheduler(kind)
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    torch.testing.assert_close(diffusion.noisy_latent(z0, noise, t, scheduler), scheduler.add_noise(z0, noise, t))
    expected = noise if kind == "epsilon" else scheduler.get_velocity(z0, noise, t)
    torch.testing.assert_close(diffusion.diffusion_target(z0, noise, t, scheduler), expected)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_a_perfect_prediction_has_zero_diffusion_loss(kind):
    """Through the whole training loss: a U-Net that answers diffusers' target exactly scores 0."""
    scheduler = _scheduler(kind)
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def oracle(z_t, t):
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = (z_t - a.sqrt() * z0) / (1 - a).sqrt()
        return noise if kind == "epsilon" else scheduler.get_velocity(z0, noise, t)

    loss = diffusion.training_loss(
        oracle, z0, scheduler, objective="diffusion", generator=torch.Generator().manual_seed(3)
    )
    assert float(loss) < 1e-8
    wrong = diffusion.training_loss(
        lambda z_t, t: torch.zeros_like(z_t),
        z0,
        scheduler,
        objective="diffusion",
        generator=torch.Generator().manual_seed(3),
    )
    assert float(wrong) > 0.1


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_one_step_sample_is_the_ddim_clean_estimate_from_zeros(kind):
    scheduler = _scheduler(kind)
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 4, 8, 8, generator=g)
    ours = diffusion.sample_one_step(lambda z_t, t: pred, (2, 4, 8, 8), scheduler, "cpu", torch.float32)
    scheduler.set_timesteps(1)
    assert int(scheduler.timesteps[0]) == 999  # trailing spacing: one step starts at T-1
    theirs = scheduler.step(pred, scheduler.timesteps[0], torch.zeros(2, 4, 8, 8), eta=0.0).pred_original_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
