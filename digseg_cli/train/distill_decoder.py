"""The fast mask decoder's distillation: its pool of mask latents, its student and its loss (`train.distill` runs
the steps both parts share).

The pool, per synthetic scene (never the validation seed): the model's own latents for a present and a random
(often absent) prompt, plus the encoded ground-truth mask of a present class; the targets are
`DigsegModel.decode_probs` of each latent (the VAE decoder is the teacher, never the ground truth). The small
decoder is fitted with binary cross-entropy on those soft targets. It knows nothing of the command line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from digseg_cli.core import diffusion, transforms
from digseg_cli.core.fast_decoder import FastMaskDecoder
from digseg_cli.train.distill import DistillResult, DistillSettings, Part, Progress, distil, synth_scenes
from digseg_cli.train.distill_parts import PARTS


def train_fast_decoder(s: DistillSettings, progress: Progress | None = None) -> DistillResult:
    """`digseg decoder train`: a copy of `s.weights` with `fast_decoder/` and its accuracy record."""
    return distil(s, DECODER, progress)


@torch.no_grad()
def _latent_pool(pipe, s: DistillSettings, resolution: int, emit: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask latents `[3·n,4,h,w]` (per scene: the model's for a present and a random class prompt, and an encoded
    true mask) and the VAE decoder's probabilities `[3·n,H,W]` for them."""
    from digseg_cli.data.synth import SYNTH_CLASSES

    model, cfg = pipe.model, pipe.config
    names = {c["id"]: [c["name"], *c.get("synonyms", [])] for c in SYNTH_CLASSES["classes"]}
    generator = torch.Generator("cpu").manual_seed(s.seed)
    out = []
    for rng, _, mask, x in synth_scenes(pipe, s, resolution, emit):
        present = [k for k in names if (mask == k).any()] or list(names)
        chosen = [int(rng.choice(present)), int(rng.choice(list(names)))]
        texts = [pipe.format_prompt(str(rng.choice(names[k]))) for k in chosen]
        z_img = model.encode_image(x)  # [1,4,h,w]
        emb, pooled = pipe.encode_prompts(texts)  # [2,L,D], [2,D]
        z_b = z_img.expand(2, -1, -1, -1)  # [2,4,h,w]

        def denoise(z_t, t, z_b=z_b, emb=emb, pooled=pooled):  # this scene's inputs (bound now, not at call)
            return model(z_b, z_t, t, emb, pooled)

        if cfg.objective == "one-step":
            clean = diffusion.sample_one_step(denoise, z_b.shape, pipe.scheduler, pipe.device, pipe.dtype)
        else:
            noise = torch.randn(z_b.shape, generator=generator).to(pipe.device, pipe.dtype)
            clean = diffusion.sample_ddim(denoise, noise, pipe.scheduler, cfg.default_steps)
        m = torch.from_numpy(mask == chosen[0]).float()[None, None]  # [1,1,S,S] in {0,1}
        m, _ = transforms.pad_to_multiple(m, model.size_multiple)
        out += [clean.float(), model.encode_mask(m).float()]  # [2,4,h,w], [1,4,h,w]
    latents = torch.cat(out)  # [3·n,4,h,w]
    return latents, torch.cat([model.decode_probs(z) for z in latents.split(16)])  # [3·n,H,W] in [0,1]


def _bce(decoder: FastMaskDecoder, latents: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between the decoder's logits `[b,H,W]` and the teacher's probabilities."""
    return F.binary_cross_entropy_with_logits(decoder.logits(latents)[:, 0], targets)


DECODER = Part(PARTS["decoder"], _latent_pool, FastMaskDecoder, _bce, ("decode_probs", "decode_probs_fast"))
