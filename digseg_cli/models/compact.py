"""Named compact configurations: small U-Net, VAE, text encoder and tokenizer built from scratch (DESIGN §2).

They are the same diffusers / transformers classes as a Stable Diffusion base, only smaller, so the rest of
digseg runs them through the one code path. This module knows the sizes and the tokenizer vocabulary;
it does not know training, files or devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

COMPACT_PREFIX = "compact:"  # `--weights compact:small` names a fresh compact model, never a folder

# A noise schedule like Stable Diffusion's, with v-prediction (as SD 2 and Marigold).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "trailing",
}

# Words the compact tokenizer keeps whole (everything else still tokenises, character by character).
VOCABULARY = """
a an the of and or with in on at near photo image aerial satellite view scene top
road roads street streets highway path track lane
tree trees forest woods woodland canopy bush bushes vegetation
building buildings house houses roof roofs rooftop structure
water river rivers lake lakes pond sea ocean canal stream
field fields grass grassland crop crops farmland meadow lawn agriculture
background soil ground sand rock bare land urban rural
car cars vehicle person people sky cloud shadow bridge parking
""".split()


@dataclass(frozen=True)
class CompactConfig:
    """Sizes of one compact model. `resolution` is its native processing resolution."""

    name: str
    description: str
    resolution: int
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    film_hidden: int = 64
    # A pretrained, frozen sentence encoder (a `package` registry name) instead of a text encoder trained from
    # scratch; `text` then sizes its trainable adapter (`context_tokens`, `hidden`).
    text_encoder: str | None = None


COMPACT_CONFIGS: dict[str, CompactConfig] = {
    "tiny": CompactConfig(
        name="tiny",
        description="Test-size model (~0.3 M parameters), 32 px; trains in seconds on a CPU.",
        resolution=32,
        unet=dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        vae=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        film_hidden=32,
    ),
    "small": CompactConfig(
        name="small",
        description="Demo-size model (~5 M parameters), 128 px, VAE factor 4; trainable on a CPU in about an hour.",
        resolution=128,
        unet=dict(
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=16,
            norm_num_groups=16,
        ),
        vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
        film_hidden=64,
    ),
}
# The same U-Nets and VAEs reading a pretrained sentence encoder (open vocabulary): words never trained on
# still reach the class whose meaning they share.
for _name in ("tiny", "small"):
    _cfg = COMPACT_CONFIGS[_name]
    COMPACT_CONFIGS[f"{_name}-minilm"] = CompactConfig(
        name=f"{_name}-minilm",
        description=_cfg.description.replace("; ", " with the pretrained text encoder all-MiniLM-L6-v2; ", 1),
        resolution=_cfg.resolution,
        unet=_cfg.unet,
        vae=_cfg.vae,
        text=dict(context_tokens=4, hidden=4 * _cfg.unet["cross_attention_dim"]),
        film_hidden=_cfg.film_hidden,
        text_encoder="minilm-l6-v2",
    )

MAX_TOKENS = 32  # compact text encoders take 32 tokens: class names are short


def compact_name(name: str | Path) -> str | None:
    """The compact config a model name asks for (`compact:NAME`, or a bare known NAME that is no folder), else None."""
    text = str(name)
    if text.startswith(COMPACT_PREFIX):
        return text.removeprefix(COMPACT_PREFIX)
    return text if text in COMPACT_CONFIGS and not Path(text).exists() else None


def get_compact_config(name: str) -> CompactConfig:
    if name not in COMPACT_CONFIGS:
        import difflib

        close = difflib.get_close_matches(name, COMPACT_CONFIGS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown compact config {name!r} (known: {', '.join(COMPACT_CONFIGS)}).{hint}")
    return COMPACT_CONFIGS[name]


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2, CLIP) uses, in CLIP's order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(words: list[str] = VOCABULARY):
    """A CLIP tokenizer whose BPE merges keep `words` whole; any other text still tokenises by bytes. The same
    tokenizer in every process (`learn_merges`), so a compact model built with one seed is one model."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    # The words as the tokenizer itself splits them (lower case, byte-level pieces), then merges on top of the
    # full byte alphabet.
    scratch = CLIPTokenizer(vocab={**vocab, **{s: len(vocab) + i for i, s in enumerate(specials)}}, merges=[])
    backend = scratch.backend_tokenizer
    pieces = [p for w in words for p, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(w))]
    merges = learn_merges(pieces)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for s in specials:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def learn_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first, until every piece is one token (its last symbol ends in `</w>`).

    Ties go to the smaller pair, so the merges are the same in every process: tokenizers' `BpeTrainer` breaks
    them by hash-map order and gave `er</w>` id 592 in one process and 593 in the next (huggingface/tokenizers
    #1794), so `-w tiny` was a different model in each."""
    words = [[*p[:-1], p[-1] + "</w>"] for p in sorted(set(pieces))]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words:
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [_merge(symbols, best) for symbols in words]


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """`symbols` with each occurrence of `pair` (left to right, not overlapping) joined into one symbol."""
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == list(pair):
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def build_components(name: str, seed: int = 0):
    """Fresh, randomly initialised (unet, vae, text_encoder, tokenizer, scheduler_config) for a compact config.

    The U-Net is built with the base's 4 input channels; the caller widens `conv_in` as for any base.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from digseg_cli.core.model import vae_scale_factor

    cfg = get_compact_config(name)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // vae_scale_factor(cfg.vae["block_out_channels"]),
        in_channels=4,
        out_channels=4,
        **cfg.unet,
    )
    n_vae = len(cfg.vae["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=cfg.resolution,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        **cfg.vae,
    )
    if cfg.text_encoder is not None:
        from digseg_cli.models import text_encoders

        text_encoder, tokenizer = text_encoders.build(
            cfg.text_encoder, context_dim=cfg.unet["cross_attention_dim"], **cfg.text
        )
        return unet, vae, text_encoder, tokenizer, dict(SCHEDULER_CONFIG)
    tokenizer = build_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        projection_dim=cfg.text["hidden_size"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg.text,
    )
    text_encoder = CLIPTextModel(text_config)
    return unet, vae, text_encoder, tokenizer, dict(SCHEDULER_CONFIG)
