"""The fast image encoder's distillation: its pool of images, its student and its loss (`train.distill` runs
the steps both parts share).

The pool: synthetic scenes (the checkpoint's training-style images, as the decoder's pool; never the validation
seed) at the processing resolution, padded to the model's multiple; the targets are `DigsegModel.encode_image`
of each (the VAE encoder's scaled latent mean is the teacher). The small encoder is fitted with the mean squared
error to those latents. It knows nothing of the command line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from digseg_cli.core.fast_encoder import FastImageEncoder
from digseg_cli.train.distill import DistillResult, DistillSettings, Part, Progress, distil, synth_scenes
from digseg_cli.train.distill_parts import PARTS


def train_fast_encoder(s: DistillSettings, progress: Progress | None = None) -> DistillResult:
    """`digseg encoder train`: a copy of `s.weights` with `fast_encoder/` and its accuracy record."""
    return distil(s, ENCODER, progress)


@torch.no_grad()
def _image_pool(pipe, s: DistillSettings, resolution: int, emit: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `[n,3,S,S]` in [-1,1] and the VAE encoder's latents `[n,4,S/f,S/f]` for them."""
    images = torch.cat([x for _, _, _, x in synth_scenes(pipe, s, resolution, emit)])  # [n,3,S,S]
    return images, torch.cat([pipe.model.encode_image(x).float() for x in images.split(8)])  # [n,4,h,w]


def _mse(encoder: FastImageEncoder, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the encoder's latents `[b,4,h,w]` and the teacher's."""
    return F.mse_loss(encoder(images), latents)


ENCODER = Part(PARTS["encoder"], _image_pool, FastImageEncoder, _mse, ("encode_image", "encode_image_fast"))
