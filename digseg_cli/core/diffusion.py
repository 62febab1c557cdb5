"""DiGSeg's diffusion maths (DESIGN §1 steps 5–6): the two training losses and the two samplers.

Tensor-only. A `denoise(z_t, t) -> prediction` callable stands for the conditioned U-Net, so this module
knows neither prompts nor images; the noise schedule comes from a diffusers `DDIMScheduler` built from
the base model's scheduler config. It does not know files, devices or tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from digseg_cli.core import OBJECTIVES

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t [B,4,h,w], t [B]) -> prediction [B,4,h,w]


def make_scheduler(config: dict) -> DDIMScheduler:
    """DDIM with trailing spacing (so one step starts at t = T−1, not t = 1) from a base scheduler config."""
    keep = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    keep.update(timestep_spacing="trailing", clip_sample=False)
    return DDIMScheduler.from_config(keep)


def _alpha_bar(scheduler: DDIMScheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)[t.long()]
    return a.view(-1, 1, 1, 1)  # [B,1,1,1]


def predicted_clean_latent(pred, z_t, t, scheduler: DDIMScheduler) -> torch.Tensor:
    """Turn the U-Net's prediction (ε, v or x0, per `prediction_type`) into the clean latent x0."""
    a = _alpha_bar(scheduler, t, z_t)
    kind = scheduler.config.prediction_type
    pred, z_t = pred.float(), z_t.float()
    if kind == "epsilon":
        return (z_t - (1 - a).sqrt() * pred) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * z_t - (1 - a).sqrt() * pred
    if kind == "sample":
        return pred
    raise ValueError(f"unsupported `prediction_type` {kind!r}")


def noisy_latent(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler: DDIMScheduler) -> torch.Tensor:
    """The forward process: `z_t = sqrt(ᾱ_t)·z0 + sqrt(1−ᾱ_t)·noise`, `[B,4,h,w]` (diffusers' `add_noise`)."""
    a = _alpha_bar(scheduler, t, z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def diffusion_target(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler: DDIMScheduler) -> torch.Tensor:
    """What the U-Net learns to predict at `z_t`: ε, or v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·z0 (`get_velocity`)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a = _alpha_bar(scheduler, t, z0)
        return a.sqrt() * noise - (1 - a).sqrt() * z0
    raise ValueError(f"`diffusion` objective needs an epsilon or v_prediction base, not {kind!r}")


def multires_noise(shape, generator, device, strength: float = 0.0, levels: int = 4) -> torch.Tensor:
    """Gaussian noise, optionally plus down-scaled noise up-sampled back (multi-resolution noise)."""
    noise = torch.randn(shape, generator=generator, device=device)
    b, c, h, w = shape
    for i in range(1, levels if strength > 0 else 0):
        s = 2**i
        if h // s < 1 or w // s < 1:
            break
        low = torch.randn((b, c, max(h // s, 1), max(w // s, 1)), generator=generator, device=device)
        noise = noise + strength**i * F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return noise / noise.std().clamp_min(1e-6) if strength > 0 else noise


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return F.mse_loss(pred, target)
    weight = weight.to(pred.dtype).expand_as(pred)  # [B,1,h,w] -> [B,4,h,w]
    # clamped: a batch whose every pixel is ignore has weight 0 and contributes 0, not NaN
    return (weight * (pred - target) ** 2).mean() / weight.mean().clamp_min(1e-12)


def training_loss(
    denoise: Denoise,
    z_mask: torch.Tensor,
    scheduler: DDIMScheduler,
    *,
    objective: str = "one-step",
    generator: torch.Generator | None = None,
    noise_strength: float = 0.0,
    clean_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent-space MSE for one batch of mask latents `[B,4,h,w]` (DESIGN §1.5).

    `one-step` (E2E-FT): t = T−1, the noisy input is zeros, the prediction is turned into the clean latent
    and compared with `z_mask`; `clean_loss(clean)`, if given, adds a loss on that latent (E2E-FT's loss on
    the decoded mask). `diffusion`: t uniform over the training steps, target ε or v. `weight` `[B,1,h,w]`,
    if given, weighs each latent pixel's squared error (normalised by its mean, so the scale stays MSE's).
    """
    b, T = z_mask.shape[0], scheduler.config.num_train_timesteps
    if objective == "one-step":
        t = torch.full((b,), T - 1, device=z_mask.device, dtype=torch.long)
        z_t = torch.zeros_like(z_mask)  # [B,4,h,w]: the mean of the noise at t = T−1
        clean = predicted_clean_latent(denoise(z_t, t), z_t, t, scheduler)
        loss = _weighted_mse(clean, z_mask.float(), weight)
        return loss + clean_loss(clean) if clean_loss is not None else loss
    if objective == "diffusion":
        t = torch.randint(0, T, (b,), generator=generator, device=generator.device if generator else "cpu")
        t = t.to(z_mask.device)
        noise = multires_noise(z_mask.shape, generator, generator.device if generator else "cpu", noise_strength)
        noise = noise.to(z_mask.device)
        target = diffusion_target(z_mask, noise, t, scheduler)  # before the U-Net runs: a bad base fails fast
        z_t = noisy_latent(z_mask, noise, t, scheduler)  # [B,4,h,w]
        return _weighted_mse(denoise(z_t, t).float(), target.float(), weight)
    raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")


@torch.no_grad()
def sample_one_step(denoise: Denoise, shape, scheduler: DDIMScheduler, device, dtype) -> torch.Tensor:
    """The `one-step` model's inference: one pass from zeros at t = T−1 → clean latent `[B,4,h,w]`."""
    T = scheduler.config.num_train_timesteps
    z_t = torch.zeros(shape, device=device, dtype=dtype)
    t = torch.full((shape[0],), T - 1, device=device, dtype=torch.long)
    return predicted_clean_latent(denoise(z_t, t), z_t, t, scheduler)


@torch.no_grad()
def sample_ddim(denoise: Denoise, noise: torch.Tensor, scheduler: DDIMScheduler, steps: int) -> torch.Tensor:
    """DDIM with trailing spacing from `noise` `[B,4,h,w]`, `steps` in 1..50 → clean latent estimate."""
    if not 1 <= steps <= 50:
        raise ValueError(f"`steps` must be between 1 and 50, got {steps}")
    scheduler.set_timesteps(steps, device=noise.device)
    z = noise
    clean = noise
    for t in scheduler.timesteps:
        tb = t.expand(z.shape[0]).to(noise.device)
        out = scheduler.step(denoise(z, tb).float(), t, z.float(), eta=0.0)
        z, clean = out.prev_sample.to(noise.dtype), out.pred_original_sample
    # The last step's x0 estimate is the clean latent; prev_sample would still carry alpha_final noise.
    return clean
