"""A small distilled image encoder: image `[B,3,H,W]` in [-1,1] → latent `[B,4,H/f,W/f]` (issue 21 item 3).

With the fast mask decoder, encoding the image is the largest single cost at SD-2 size (the SD VAE encoder:
1.12 TFLOP at 512 px, more than two U-Net passes); this network (≈0.2 M parameters at the default width 64,
≈2 GFLOP at 512 px) is trained to reproduce `DigsegModel.encode_image`, the VAE encoder's scaled latent mean
(see `digseg_cli.train.distill_encoder`). Layout, the fast decoder's mirrored: one ×½ stage (3×3 conv, stride
2) per factor of two of the VAE, its width doubling up to `width`, then a 3×3 stem and residual blocks at
latent resolution, a 3×3 head to the latent's channels, plus a 1×1 shortcut from the image average-pooled to
latent resolution. Every op runs in channels_last as it does contiguous.

Tensor-only: it knows neither files, devices, the VAE it imitates nor how it is trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from digseg_cli.core.fast_decoder import ResBlock, fast_config


class FastImageEncoder(nn.Module):
    """Image `[B,3,H,W]` in [-1,1] → latent `[B,C,H/f,W/f]`, `f` = `scale_factor` (a power of 2; H, W multiples)."""

    def __init__(
        self, latent_channels: int = 4, scale_factor: int = 8, width: int = 64, blocks: int = 2, min_width: int = 16
    ):
        super().__init__()
        self.config = fast_config(latent_channels, scale_factor, width, blocks, min_width)
        stages = int(math.log2(scale_factor))
        downs, c = [], 3
        for i in range(stages):
            nxt = min(width, max(min_width, width >> (stages - 1 - i)))  # ..., width/4, width/2, width
            downs.append(nn.Conv2d(c, nxt, 3, stride=2, padding=1))
            c = nxt
        self.downs = nn.ModuleList(downs)
        self.stem = nn.Conv2d(c, width, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.head = nn.Conv2d(width, latent_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(3, latent_channels, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(next(self.parameters()).dtype)  # [B,3,H,W] in [-1,1]
        h = x
        for conv in self.downs:
            h = F.silu(conv(h))  # [B,c',H/2,W/2], then [B,c'',H/4,W/4], ...
        h = self.body(self.stem(h))  # [B,width,H/f,W/f]
        skip = self.shortcut(F.avg_pool2d(x, self.config["scale_factor"]))  # [B,C,H/f,W/f]
        return self.head(F.silu(h)) + skip  # [B,C,H/f,W/f]
