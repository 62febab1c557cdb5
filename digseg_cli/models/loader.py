"""The one loader: any model name a user can type → a `LoadedModel` (weights on the CPU, in fp32).

A name is, in this order: a compact config (`compact:NAME`, or a bare compact name that is not a folder), a
local checkpoint or SD-base folder, then a registry name or Hub id resolved to a local folder by
`digseg_cli.weights`. Inference (`load_pipeline`), training (`--base`, `--init`) and the fast decoder's
distillation all load through `load_model`. Devices, precision and pipelines are left to `inference/`.
"""

from __future__ import annotations

from pathlib import Path

from digseg_cli.errors import UsageError
from digseg_cli.models.checkpoint import (
    LoadedModel,
    build_compact,
    build_from_sd_base,
    is_checkpoint,
    is_sd_base,
    load_checkpoint,
)
from digseg_cli.models.compact import compact_name
from digseg_cli.models.config import CONFIG_NAME


def load_model(
    name_or_path: str | Path, *, cache_dir=None, offline=None, config_overrides: dict | None = None
) -> LoadedModel:
    """Resolve a name to a `LoadedModel`; a fresh model is built for compact names and SD bases
    (`config_overrides` set the fresh model's settings; a trained checkpoint keeps its own)."""
    overrides = config_overrides or {}
    compact = compact_name(name_or_path)
    if compact is not None:
        return build_compact(compact, **overrides)
    path = Path(str(name_or_path)).expanduser()
    if not path.exists():
        return _load_named(str(name_or_path), cache_dir=cache_dir, offline=offline, overrides=overrides)
    if is_checkpoint(path):
        return load_checkpoint(path)
    if is_sd_base(path):
        return build_from_sd_base(path, **overrides)
    raise UsageError(
        f"{path} is neither a digseg checkpoint (DigsegConfig file {CONFIG_NAME}) "
        "nor a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/)"
    )


def _load_named(name: str, *, cache_dir, offline, overrides: dict) -> LoadedModel:
    """A registry name or Hub id: fetched (or found in the cache) by `weights`, then loaded from that folder."""
    from digseg_cli.weights.registry import REGISTRY
    from digseg_cli.weights.store import parse_hub_id, resolve_weights

    path = resolve_weights(name, cache_dir=cache_dir, offline=offline)
    if is_checkpoint(path) or not is_sd_base(path):
        return load_model(path, config_overrides=overrides)
    # Record the base as its Hub id and revision, whichever name the user gave it by.
    spec = REGISTRY.get(name)
    repo, revision = (spec.repo_id, spec.revision) if spec and spec.repo_id else (parse_hub_id(name) or (name, None))
    return build_from_sd_base(path, base_id=repo, revision=revision, **overrides)
