"""A small distilled mask decoder: mask latent `[B,4,h,w]` → probability `[B,H,W]` (performance.md §3, §5.4).

The VAE decoder costs about 3× a U-Net pass at 512 px and is paid once per prompt; this network (≈0.05 M
parameters at the default width 32, ≈2 GFLOP at 512 px against the SD decoder's 2.5 TFLOP) is trained to reproduce
`DigsegModel.decode_probs` (see `digseg_cli.train.distill_decoder`). Layout: a 3×3 stem and residual blocks
at latent resolution, then one ×2 stage (nearest up-sample, 3×3 conv) per factor of two of the VAE, a
3×3 head to one logit, plus a 1×1 shortcut from the latent up-sampled bilinearly.

Tensor-only: it knows neither files, devices, the VAE it imitates nor how it is trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fast_config(latent_channels: int, scale_factor: int, width: int, blocks: int, min_width: int) -> dict:
    """A fast network's constructor arguments (its saved `config`), checked: it changes size by one ×2 stage per
    factor of two, so `scale_factor` must be a power of 2 (this decoder's and the fast encoder's rule)."""
    if scale_factor < 1 or scale_factor & (scale_factor - 1):
        raise ValueError(f"`scale_factor` must be a power of 2, got {scale_factor}")
    return dict(
        latent_channels=latent_channels, scale_factor=scale_factor, width=width, blocks=blocks, min_width=min_width
    )


class ResBlock(nn.Module):
    """`x + conv(silu(conv(silu(x))))`, 3×3 convs at a constant width (the fast encoder's too)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class FastMaskDecoder(nn.Module):
    """Mask latent `[B,C,h,w]` → probability `[B,h·f,w·f]` in [0,1], `f` = `scale_factor` (a power of 2)."""

    def __init__(
        self, latent_channels: int = 4, scale_factor: int = 8, width: int = 32, blocks: int = 2, min_width: int = 16
    ):
        super().__init__()
        self.config = fast_config(latent_channels, scale_factor, width, blocks, min_width)
        self.stem = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        ups, c = [], width
        for _ in range(int(math.log2(scale_factor))):
            nxt = max(min_width, c // 2)
            ups.append(nn.Conv2d(c, nxt, 3, padding=1))
            c = nxt
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(c, 1, 3, padding=1)
        self.shortcut = nn.Conv2d(latent_channels, 1, 1)

    def logits(self, latent: torch.Tensor) -> torch.Tensor:
        """`[B,C,h,w]` → logits `[B,1,H,W]`."""
        x = self.body(self.stem(latent))  # [B,width,h,w]
        for conv in self.ups:
            x = F.silu(conv(F.interpolate(x, scale_factor=2, mode="nearest")))  # [B,c',2h,2w]
        size = x.shape[-2:]
        skip = F.interpolate(self.shortcut(latent), size=size, mode="bilinear", align_corners=False)  # [B,1,H,W]
        return self.head(x) + skip  # [B,1,H,W]

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        return torch.sigmoid(self.logits(latent.to(dtype)).float())[:, 0]  # [B,H,W] in [0,1]
