"""The DiGSeg network (DESIGN §1 steps 1–4): widened U-Net, frozen VAE codec, text encoder, text pathway.

Tensor-only. It knows diffusers' `UNet2DConditionModel` / `AutoencoderKL` and a transformers text
encoder, but not tokenizers, files, devices, schedulers or which model family (SD or compact) it runs:
every size is read from the components' own configs.
"""

from __future__ import annotations

import torch
from torch import nn

# The layouts a model's convolutions can run in. channels_last (NHWC) lets oneDNN and cuDNN skip their own
# reorders around every conv and GroupNorm: measured on a 2-core CPU at 512 px, the SD-2-size U-Net at batch 2
# took 6.6 s against 10.9 s contiguous, the SD VAE encoder 3.3 s against 9.3 s. It only reorders sums.
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def memory_format_of(module: nn.Module) -> torch.memory_format:
    """The layout `module`'s convolutions run in, read from its first 4-D weight (contiguous without one), so
    it stays true whoever moved the module (a trainer's model, a decoder attached later)."""
    weight = next((p for p in module.parameters() if p.dim() == 4), None)
    nhwc = weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


def in_layout_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` `[B,C,H,W]` in `module`'s layout (a no-op when it is already): each conv would reorder it anyway."""
    return x.contiguous(memory_format=memory_format_of(module))


def vae_scale_factor(block_out_channels) -> int:
    """Pixels per latent pixel of an `AutoencoderKL` with these `block_out_channels`: every block but the last
    halves the size (diffusers' own rule), so 4 blocks give 8 (SD) and 3 give 4."""
    return 2 ** (len(block_out_channels) - 1)


def expand_conv_in(unet: nn.Module, in_channels: int = 8) -> None:
    """Widen `unet.conv_in` from C to `in_channels` = k·C inputs by copy-and-scale (Marigold's init).

    The pretrained kernel is repeated k times along the input axis and divided by k, so feeding `[z, z]`
    reproduces the base conv exactly (DESIGN §1.3). Updates `unet.config.in_channels` so
    `save_pretrained` round-trips.
    """
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    if in_channels % old.in_channels:
        raise ValueError(f"`in_channels` must be a multiple of {old.in_channels}, got {in_channels}")
    k = in_channels // old.in_channels
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        # The bias is added once per output channel, not once per input half, so it is kept as is:
        # halving it too would break the [z, z] → base-output invariant that DESIGN §1.3 asks for.
        new.weight.copy_(old.weight.repeat(1, k, 1, 1) / k)  # [C_out, k·C_in, 3, 3]
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


class TextPathway(nn.Module):
    """The parallel text pathway (DESIGN §1.4b): pooled prompt embedding → FiLM (scale, shift) per U-Net level.

    One small MLP per level (each down block, the mid block, each up block). The last layer of each MLP
    is zero-initialised, so a fresh pathway is the identity and a fresh DiGSeg equals the base U-Net.
    """

    def __init__(self, text_dim: int, level_channels: list[int], hidden: int = 256):
        super().__init__()
        self.level_channels = list(level_channels)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * c)) for c in level_channels
        )
        for mlp in self.mlps:
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def forward(self, pooled: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for mlp in self.mlps:
            scale, shift = mlp(pooled).chunk(2, dim=-1)  # [B,D] -> 2 × [B,C]
            out.append((scale[:, :, None, None], shift[:, :, None, None]))  # [B,C,1,1]
        return out


def pooled_dim(text_encoder: nn.Module) -> int:
    """The size of a text encoder's pooled prompt embedding (what the text pathway reads)."""
    dim = getattr(text_encoder, "embedding_dim", None)  # a pretrained sentence encoder says it
    return int(dim if dim is not None else text_encoder.config.hidden_size)


def unet_level_channels(unet: nn.Module) -> list[int]:
    """Output channels of each down block, the mid block (if any) and each up block, in call order."""
    chans = list(unet.config.block_out_channels)
    mid = [chans[-1]] if unet.mid_block is not None else []
    return chans + mid + list(reversed(chans))


class DigsegModel(nn.Module):
    """U-Net + text pathway + VAE + text encoder, with the few tensor operations DiGSeg needs.

    The FiLM modulation is applied by forward hooks on the U-Net's blocks, so the U-Net stays a plain
    diffusers module (its `save_pretrained`, gradient checkpointing and attention processors keep working).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        text_pathway: TextPathway,
        fast_decoder: nn.Module | None = None,
        *,
        fast_encoder: nn.Module | None = None,
    ):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.text_pathway = unet, vae, text_encoder, text_pathway
        self.fast_decoder = fast_decoder  # optional distilled mask decoder (core/fast_decoder.py)
        self.fast_encoder = fast_encoder  # optional distilled image encoder (core/fast_encoder.py)
        self._film: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        blocks = (
            list(unet.down_blocks) + ([unet.mid_block] if unet.mid_block is not None else []) + list(unet.up_blocks)
        )
        if len(blocks) != len(text_pathway.level_channels):
            raise ValueError("text pathway levels do not match the U-Net's blocks")
        for level, block in enumerate(blocks):
            block.register_forward_hook(self._make_film_hook(level))

    # -- sizes read from the components' configs (never hard-coded) ---------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae.config.block_out_channels)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: the VAE's factor times the U-Net's down-sampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def to_memory_format(self, name: str) -> None:
        """Put the U-Net, the VAE and the fast decoder and encoder in layout `name` (a key of `MEMORY_FORMATS`),
        in place; the text encoder and the text pathway have no 4-D weights."""
        if name not in MEMORY_FORMATS:
            raise ValueError(f"`memory_format` must be one of {', '.join(MEMORY_FORMATS)}, got {name!r}")
        for part in (self.unet, self.vae, self.fast_decoder, self.fast_encoder):
            if part is not None:
                part.to(memory_format=MEMORY_FORMATS[name])

    # -- FiLM hooks ----------------------------------------------------------------------------------
    def _make_film_hook(self, level: int):
        def hook(module, args, output):
            if self._film is None:
                return output
            scale, shift = self._film[level]
            if isinstance(output, tuple):  # down block: (hidden [B,C,h,w], residuals); last residual is hidden
                hidden, res = output
                modulated = hidden * (1 + scale) + shift
                return modulated, res[:-1] + (modulated,)
            return output * (1 + scale) + shift

        return hook

    # -- the operations of DESIGN §1 -----------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,3,H,W]` in [-1,1] → latent `[B,4,H/f,W/f]` = scaling_factor · mean(E(x))."""
        dist = self.vae.encode(in_layout_of(self.vae, pixels.to(self.vae.dtype))).latent_dist
        return (dist.mean * self.vae.config.scaling_factor).contiguous()  # [B,4,h,w]

    def encode_image_fast(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B,3,H,W]` in [-1,1] → latent `[B,4,H/f,W/f]` through the distilled encoder (imitates `encode_image`)."""
        return self._fast("encoder")(in_layout_of(self.fast_encoder, pixels)).contiguous()  # [B,4,h,w]

    def encode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Binary mask `[B,1,H,W]` in {0,1} → drawn as 3-channel `2m−1` and encoded like an image."""
        pixels = (2 * mask - 1).expand(-1, 3, -1, -1)  # [B,3,H,W] in [-1,1]
        return self.encode_image(pixels)

    def decode_probs(self, latent: torch.Tensor) -> torch.Tensor:
        """Mask latent `[B,4,h,w]` → probability `[B,H,W]` in [0,1]: decode, mean of channels, (s+1)/2."""
        latent = in_layout_of(self.vae, latent.to(self.vae.dtype) / self.vae.config.scaling_factor)
        decoded = self.vae.decode(latent).sample  # [B,3,H,W]
        return ((decoded.float().mean(dim=1) + 1) / 2).clamp(0, 1).contiguous()  # [B,H,W]

    def decode_probs_fast(self, latent: torch.Tensor) -> torch.Tensor:
        """Mask latent `[B,4,h,w]` → probability `[B,H,W]` through the distilled decoder (imitates `decode_probs`)."""
        return self._fast("decoder")(in_layout_of(self.fast_decoder, latent)).contiguous()  # [B,H,W] in [0,1]

    def _fast(self, part: str) -> nn.Module:
        """The distilled `part` ("encoder" or "decoder"); a `ValueError` when the model has none."""
        module = getattr(self, f"fast_{part}")
        if module is None:
            raise ValueError(f"this model has no fast {part}")
        return module

    def encode_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Token ids `[B,L]` → (sequence embedding `[B,L,D]` for cross-attention, pooled `[B,D]` for FiLM)."""
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output

    def forward(self, z_img, z_t, timestep, text_emb, pooled) -> torch.Tensor:
        """One U-Net pass: `cat([z_img, z_t])` `[B,8,h,w]` at `timestep` `[B]`, steered by the prompt."""
        # Order matters: the image latent comes first, as in training and in the widened conv_in.
        sample = in_layout_of(self.unet, torch.cat([z_img, z_t], dim=1).to(self.unet.dtype))  # [B,8,h,w]
        self._film = self.text_pathway(pooled.to(self.unet.dtype))
        try:
            out = self.unet(sample, timestep, encoder_hidden_states=text_emb.to(self.unet.dtype)).sample  # [B,4,h,w]
            return out.contiguous()  # callers' arithmetic (the samplers, a training loss) sees an ordinary tensor
        finally:
            self._film = None
