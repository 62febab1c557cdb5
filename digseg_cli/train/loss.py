"""The training loss of one batch: frozen-VAE latents, the prompt, and the objective's latent MSE.

One job: turn a collated batch (`pixel_values` `[B,3,R,R]`, `target` `[B,1,R,R]`, `input_ids` `[B,L]`) into
a scalar loss, with the options DESIGN §1.5 names (foreground weight, the decoded-mask loss of E2E-FT).
The diffusion maths itself is `core.diffusion.training_loss`; the optimizer, schedule and processes
belong to `digseg_cli.train.loop`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from digseg_cli.core import diffusion


def batch_loss(
    model,
    batch: dict,
    scheduler,
    *,
    objective: str,
    generator=None,
    noise_strength: float = 0.0,
    decoded_weight: float = 0.0,
    foreground_weight: float = 1.0,
):
    """Loss of one batch: frozen-VAE latents of image and target, prompt through the text encoder, then
    the objective's latent MSE (`core.diffusion.training_loss`), plus for `one-step` an optional loss on
    the mask decoded by the frozen VAE decoder (gradients flow through it, its weights stay fixed).

    Ignore pixels (`valid` 0) take no part: the target is zeroed there before the VAE encodes it (so what
    the labels say under them cannot reach any term), each latent pixel's squared error is weighed by the
    share of its footprint that is valid, and the decoded-mask loss counts valid pixels only. Weighed rather
    than dropped: with SD's 8-pixel footprint a thin ignore border (Cityscapes, ADE20K's "other") touches
    many latent pixels that are mostly labelled, and dropping them would lose that signal.

    `foreground_weight` > 1 weighs the latent pixels that the target touches that much more than the rest:
    a road or a house covers a few percent of the latent, so with plain MSE the empty background dominates
    the loss and small classes learn last."""
    valid = batch.get("valid")  # [B,1,R,R] or None (every pixel labelled)
    target = batch["target"] if valid is None else batch["target"] * valid  # [B,1,R,R]
    with torch.no_grad():
        z_img = model.encode_image(batch["pixel_values"]).float()  # [B,4,h,w]
        z_mask = model.encode_mask(target).float()  # [B,4,h,w]
    emb, pooled = model.encode_prompt(batch["input_ids"])  # [B,L,D], [B,D]

    def denoise(z_t, t):
        return model(z_img, z_t, t, emb, pooled)

    def decoded_loss(clean: torch.Tensor) -> torch.Tensor:
        return decoded_weight * decoded_mask_loss(model, clean, target, valid)

    return diffusion.training_loss(
        denoise,
        z_mask,
        scheduler,
        objective=objective,
        generator=generator,
        noise_strength=noise_strength,
        clean_loss=decoded_loss if decoded_weight else None,
        weight=latent_weight(target, valid, model.vae_scale_factor, foreground_weight),
    )


def latent_weight(target, valid, factor: int, foreground_weight: float) -> torch.Tensor | None:
    """Per latent pixel `[B,1,h,w]`: the valid share of its `factor`×`factor` footprint, times
    `foreground_weight` where the target touches it (1 elsewhere); None when every weight would be 1.
    `valid` None: every pixel labelled (`train.samples.to_batch` decides it)."""
    if valid is None and foreground_weight == 1.0:
        return None
    weight = 1.0
    if foreground_weight != 1.0:
        covered = F.max_pool2d(target.float(), kernel_size=factor, stride=factor)  # [B,1,R,R] -> [B,1,h,w]
        weight = 1.0 + (foreground_weight - 1.0) * covered
    if valid is not None:
        weight = weight * F.avg_pool2d(valid.float(), kernel_size=factor, stride=factor)  # [B,1,h,w]
    return weight


def decoded_mask_loss(model, clean: torch.Tensor, target: torch.Tensor, valid=None) -> torch.Tensor:
    """MSE of the decoded map against `2m−1` plus soft Dice on its probabilities (small classes count),
    over the valid pixels only when `valid` `[B,1,H,W]` is given."""
    decoded = model.vae.decode(clean.to(model.vae.dtype) / model.vae.config.scaling_factor).sample  # [B,3,H,W]
    s = decoded.float().mean(dim=1, keepdim=True)  # [B,1,H,W], about [-1,1]
    probs = ((s + 1) / 2).clamp(0, 1)
    if valid is None:
        mse = F.mse_loss(s, 2 * target - 1)
    else:
        probs = probs * valid
        mse = (valid * (s - (2 * target - 1)) ** 2).sum() / valid.sum().clamp_min(1.0)
    overlap = (probs * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * overlap + 1) / (probs.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)  # [B]
    return mse + dice.mean()


class LossModule(torch.nn.Module):
    """Puts the whole loss inside `forward`, so DDP sees (and all-reduces) every trainable parameter."""

    def __init__(
        self,
        model,
        scheduler,
        *,
        objective: str,
        noise_strength: float = 0.0,
        decoded_weight: float = 0.0,
        foreground_weight: float = 1.0,
    ):
        super().__init__()
        self.model, self.scheduler, self.objective = model, scheduler, objective
        self.noise_strength, self.decoded_weight = noise_strength, decoded_weight
        self.foreground_weight = foreground_weight

    def forward(self, batch, generator=None):
        return batch_loss(
            self.model,
            batch,
            self.scheduler,
            objective=self.objective,
            generator=generator,
            noise_strength=self.noise_strength,
            decoded_weight=self.decoded_weight,
            foreground_weight=self.foreground_weight,
        )


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The noise of micro-batch `micro` of optimizer step `step`: a function of (seed, step) only, so a
    resumed run draws what the uninterrupted one would."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step * 997 + micro) % (2**63))
