"""Checkpoint folders (DESIGN §3) and fresh models built from a base: the only code that reads model files.

A checkpoint is `digseg_config.json` plus `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and
`text_pathway/`, each in diffusers / transformers layout with safetensors weights, plus optionally
`fast_decoder/` and `fast_encoder/` (a distilled mask decoder and image encoder: `config.json` +
`model.safetensors` each). Loading rebuilds each
module from its config and loads its tensors with strict key checks; nothing is ever unpickled. Saving
writes a temporary sibling folder and renames it into place, so a kill while saving never leaves a
checkpoint that loads wrong. This module does not know about devices beyond `.to()`, prompts or training.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from digseg_cli.core.model import (
    DigsegModel,
    TextPathway,
    expand_conv_in,
    pooled_dim,
    unet_level_channels,
    vae_scale_factor,
)
from digseg_cli.core.sentence_encoder import SentenceEncoder
from digseg_cli.errors import CheckpointError, DigsegError, UsageError
from digseg_cli.files import follow_umask, read_settings_file
from digseg_cli.models import text_encoders
from digseg_cli.models.compact import COMPACT_PREFIX
from digseg_cli.models.config import CONFIG_NAME, DigsegConfig
from digseg_cli.models.strict_load import load_strict, uninitialized
from digseg_cli.typecheck import check_type
from digseg_cli.weights.hub import SD_WEIGHTS

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_pathway")
FAST_PARTS = ("fast_decoder", "fast_encoder")  # optional components: the `DigsegModel` attributes they fill
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    """Everything a pipeline or trainer needs: the network, its tokenizer, schedule and settings."""

    model: DigsegModel
    tokenizer: Any
    scheduler_config: dict
    config: DigsegConfig


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def is_sd_base(path: Path) -> bool:
    path = Path(path)
    return (path / "model_index.json").is_file() or all((path / c).is_dir() for c in SD_WEIGHTS)


def _require_safetensors(component: Path) -> None:
    """A base component's weights must be safetensors: a pickled ``.bin`` can run code when it is loaded."""
    if any(component.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in component.glob("*") if p.suffix in PICKLE_SUFFIXES)
    found = f"only {', '.join(pickled)}" if pickled else "no weights"
    raise CheckpointError(
        f"{component} has {found} and no .safetensors; digseg loads no pickled weights: convert them where you "
        f"trust the files (diffusers: from_pretrained(...).save_pretrained(OUT, safe_serialization=True), or "
        f"safetensors.torch.save_file(state_dict, 'model.safetensors'))"
    )


def assemble(unet, vae, text_encoder, tokenizer, scheduler_config: dict, config: DigsegConfig) -> LoadedModel:
    """Widen `conv_in` (4 → 8 channels), add a zero-initialised text pathway, freeze nothing yet."""
    expand_conv_in(unet, 2 * vae.config.latent_channels)
    pathway = TextPathway(pooled_dim(text_encoder), unet_level_channels(unet), hidden=config.film_hidden)
    return LoadedModel(DigsegModel(unet, vae, text_encoder, pathway), tokenizer, dict(scheduler_config), config)


def build_compact(name: str, *, seed: int = 0, **overrides) -> LoadedModel:
    """A fresh DiGSeg from a named compact config (DESIGN §2); everything randomly initialised."""
    from digseg_cli.models.compact import build_components, get_compact_config

    try:
        spec = get_compact_config(name)
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    unet, vae, text_encoder, tokenizer, sched = build_components(name, seed=seed)
    config = DigsegConfig(
        base_model=COMPACT_PREFIX + name,
        prediction_type=sched["prediction_type"],
        default_resolution=spec.resolution,
        film_hidden=spec.film_hidden,
        description=spec.description,
        **overrides,
    )
    return assemble(unet, vae, text_encoder, tokenizer, sched, config)


def build_from_sd_base(
    folder: Path, *, base_id: str | None = None, revision: str | None = None, film_hidden: int = 256, **overrides
) -> LoadedModel:
    """A fresh DiGSeg from a diffusers-format Stable Diffusion 1.x/2.x folder (U-Net output = the base's)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    folder = Path(folder)
    if not is_sd_base(folder):
        raise CheckpointError(f"{folder} is not a diffusers Stable Diffusion folder (no unet/, vae/, text_encoder/)")
    for component in SD_WEIGHTS:
        _require_safetensors(folder / component)
    try:  # use_safetensors: never diffusers' or transformers' fallback to a pickled .bin
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
    except (OSError, ValueError) as exc:  # e.g. only an fp16 variant, or a damaged file
        raise CheckpointError(f"cannot load the base {folder}: {str(exc).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    factor = vae_scale_factor(vae.config.block_out_channels)
    config = DigsegConfig(
        base_model=base_id or str(folder),
        base_revision=revision,
        prediction_type=sched.get("prediction_type", "epsilon"),
        default_resolution=int(unet.config.sample_size) * factor,
        film_hidden=film_hidden,
        **overrides,
    )
    return assemble(unet, vae, text_encoder, tokenizer, sched, config)


# -- saving --------------------------------------------------------------------------------------------
def save_checkpoint(
    folder: Path, loaded: LoadedModel, *, overwrite: bool = False, extra: Callable[[Path], None] | None = None
) -> Path:
    """Write a checkpoint folder atomically (temporary sibling, then rename).

    `extra(tmp_folder)` may add files (a trainer's state) that must appear together with the weights.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise UsageError(f"{folder} already exists: pass overwrite=True (CLI: --overwrite) or choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    m = loaded.model
    _quiet_savers()
    m.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    m.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    if isinstance(m.text_encoder, SentenceEncoder):  # a record of which pretrained encoder, and the adapter
        text_encoders.save(tmp / "text_encoder", m.text_encoder)
    else:
        m.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    _write_json(
        tmp / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler", **loaded.scheduler_config}
    )
    (tmp / "text_pathway").mkdir()
    pathway = m.text_pathway
    _write_json(
        tmp / "text_pathway" / "config.json",
        {
            "text_dim": pathway.mlps[0][0].in_features,
            "level_channels": pathway.level_channels,
            "hidden": pathway.mlps[0][0].out_features,
        },
    )
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in pathway.state_dict().items()},
        str(tmp / "text_pathway" / "model.safetensors"),
    )
    for name in FAST_PARTS:
        if getattr(m, name) is not None:
            save_fast_part(tmp / name, getattr(m, name))
    if extra is not None:
        extra(tmp)
    loaded.config.save(tmp)  # written last: a folder without it is never taken for a checkpoint
    follow_umask(tmp)  # safetensors writes its files 0600 whatever the umask
    _replace_dir(tmp, folder)
    return folder


def _quiet_savers() -> None:
    """transformers prints a progress bar for every save; a checkpoint save is not worth one."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# -- loading -------------------------------------------------------------------------------------------
def load_checkpoint(folder: Path) -> LoadedModel:
    """Rebuild every component from its config and load its safetensors with strict key checks. A component
    whose config does not build (wrong types, a missing key, an empty tokenizer folder) is a `CheckpointError`
    naming it (`_component`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from digseg_cli.core.diffusion import make_scheduler

    folder = Path(folder)
    config = DigsegConfig.load(folder)
    pretrained_text = text_encoders.is_saved_here(folder / "text_encoder")  # its tokenizer comes with it
    missing = [c for c in COMPONENTS if not (folder / c).is_dir() and not (pretrained_text and c == "tokenizer")]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}/")
    with _component(folder / "unet" / "config.json"), uninitialized():
        unet = UNet2DConditionModel.from_config(_read_json(folder / "unet" / "config.json"))
    load_strict(unet, folder / "unet" / "diffusion_pytorch_model.safetensors")
    with _component(folder / "vae" / "config.json"), uninitialized():
        vae = AutoencoderKL.from_config(_read_json(folder / "vae" / "config.json"))
    load_strict(vae, folder / "vae" / "diffusion_pytorch_model.safetensors")
    text_encoder, tokenizer = _load_text_encoder(folder, pretrained_text)
    pcfg = _read_json(folder / "text_pathway" / "config.json")
    for key, kind in (("text_dim", int), ("level_channels", list[int]), ("hidden", int)):
        check_type(pcfg.get(key), kind, f"{folder / 'text_pathway' / 'config.json'}: {key}", error=CheckpointError)
    with uninitialized():
        pathway = TextPathway(pcfg["text_dim"], pcfg["level_channels"], hidden=pcfg["hidden"])
    load_strict(pathway, folder / "text_pathway" / "model.safetensors")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = {k: v for k, v in _read_json(sched_path).items() if not k.startswith("_")}
    with _component(sched_path):
        make_scheduler(sched)  # built once here so that a schedule that cannot be built fails as the checkpoint's
    fast = {name: load_fast_part(folder / name) if (folder / name).is_dir() else None for name in FAST_PARTS}
    for module in (unet, vae, text_encoder, pathway):
        module.eval()
    return LoadedModel(DigsegModel(unet, vae, text_encoder, pathway, **fast), tokenizer, sched, config)


def _load_text_encoder(folder: Path, pretrained: bool):
    """The checkpoint's text encoder and tokenizer: a recorded pretrained encoder with its trained adapter, or
    a CLIP text model and tokenizer of its own."""
    from transformers import AutoConfig, AutoTokenizer, CLIPTextModel

    if pretrained:
        text_encoder, tokenizer = text_encoders.load(folder / "text_encoder")
        load_strict(text_encoder.adapter, folder / "text_encoder" / text_encoders.ADAPTER_FILE)
        return text_encoder, tokenizer
    with _component(folder / "text_encoder" / "config.json"):
        # A readable JSON object first: transformers' own errors for a broken config run over many lines.
        _read_json(folder / "text_encoder" / "config.json")
        with uninitialized():
            text_encoder = CLIPTextModel(AutoConfig.from_pretrained(folder / "text_encoder"))
    load_strict(text_encoder, folder / "text_encoder" / "model.safetensors")
    with _component(folder / "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    return text_encoder, tokenizer


@contextlib.contextmanager
def _component(source: Path) -> Iterator[None]:
    """Turn the errors diffusers and transformers raise for a config they cannot build from (`source`, a
    file of the user's checkpoint) into one `CheckpointError` line. Only around building from that file:
    elsewhere these exception types are bugs and keep their tracebacks."""
    try:
        yield
    except DigsegError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"cannot build a model part from {source}: {detail[:200]} (re-save the checkpoint)"
        ) from None


def save_fast_part(folder: Path, module: torch.nn.Module) -> None:
    """Write a `FastMaskDecoder` or `FastImageEncoder` as `config.json` (its constructor arguments) +
    `model.safetensors`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", dict(module.config))
    save_file(
        {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()},
        str(folder / "model.safetensors"),
    )


def load_fast_part(folder: Path) -> torch.nn.Module:
    """Rebuild the fast decoder (`fast_decoder/`) or encoder (`fast_encoder/`) from its folder (strict keys,
    safetensors), frozen and in eval mode."""
    from digseg_cli.core.fast_decoder import FastMaskDecoder
    from digseg_cli.core.fast_encoder import FastImageEncoder

    folder = Path(folder)
    kind = {"fast_decoder": FastMaskDecoder, "fast_encoder": FastImageEncoder}[folder.name]
    cfg = _read_json(folder / "config.json")
    try:
        with uninitialized():
            module = kind(**cfg)
    except (TypeError, ValueError) as exc:
        what = folder.name.replace("_", "-")
        raise CheckpointError(f"{folder}/config.json is not a {what} config: {exc}") from None
    load_strict(module, folder / "model.safetensors")
    return module.requires_grad_(False).eval()


def _read_json(path: Path) -> dict:
    """A component's JSON config: a `CheckpointError` naming the file unless it is a readable JSON object."""
    data = read_settings_file(path, "config file", error=CheckpointError)
    return check_type(data, dict, str(path), error=CheckpointError)


def _write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
