"""Pretrained sentence encoders as DiGSeg text encoders: built from a registry entry's checked files.

One job: turn a registry name (`minilm-l6-v2`) into a frozen `core.sentence_encoder.SentenceEncoder` and its
tokenizer, reading only the files the registry lists (each checked against its sha256 by `weights`), and
record in a checkpoint which encoder it needs (`text_encoder/config.json`: the name and those sha256s, never
a copy of the weights) next to the adapter it trained.

How the files are found (the installed package, else the pinned Hub snapshot) is `weights.store`'s; the
rest of the checkpoint is `models.checkpoint`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from digseg_cli.core.sentence_encoder import SentenceEncoder
from digseg_cli.errors import CheckpointError
from digseg_cli.files import read_settings_file
from digseg_cli.models.strict_load import load_strict, uninitialized
from digseg_cli.typecheck import check_type

KIND = "sentence-encoder"
ADAPTER_FILE = "adapter.safetensors"
MAX_TOKENS = 32  # prompts are short class names; longer text is cut, as with the compact CLIP tokenizer
# Tensors of the file that digseg's encoder does not use: a buffer older transformers saved, and BERT's
# [CLS] pooler (sentence embeddings are the mean over tokens).
_UNUSED_KEYS = ("embeddings.position_ids", "pooler.")


def _spec(name: str):
    from digseg_cli.weights.registry import REGISTRY

    spec = REGISTRY.get(name)
    if spec is None or spec.source != "package":
        raise CheckpointError(f"unknown text encoder {name!r}: this digseg knows none of that name (upgrade digseg)")
    return spec


def load_pretrained(name: str, *, cache_dir=None, offline=None):
    """(frozen BERT-style encoder, its fast tokenizer) from registry entry `name`, files checked by sha256."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from digseg_cli.weights.store import resolve_weights

    folder = resolve_weights(name, cache_dir=cache_dir, offline=offline)  # checked: weights.package
    pooling = read_settings_file(folder / "1_Pooling" / "config.json", "pooling config", error=CheckpointError)
    if not pooling.get("pooling_mode_mean_tokens"):
        raise CheckpointError(f"{name}: digseg uses mean pooling, but {folder} pools otherwise")
    config = BertConfig.from_dict(read_settings_file(folder / "config.json", "encoder config", error=CheckpointError))
    with uninitialized():  # every weight is loaded next
        encoder = BertModel(config, add_pooling_layer=False)
    load_strict(encoder, folder / "model.safetensors", skip=_UNUSED_KEYS)
    tokenizer = BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), model_max_length=MAX_TOKENS)
    return encoder.eval(), tokenizer


def build(name: str, *, context_dim: int, context_tokens: int, hidden: int = 256, cache_dir=None, offline=None):
    """A fresh `SentenceEncoder` (adapter at its initial values) on `name`, and its tokenizer."""
    encoder, tokenizer = load_pretrained(name, cache_dir=cache_dir, offline=offline)
    module = SentenceEncoder(
        encoder,
        context_dim=context_dim,
        context_tokens=context_tokens,
        hidden=hidden,
        pad_token_id=tokenizer.pad_token_id,
        name=name,
    )
    return module, tokenizer


def save(folder: Path, module: SentenceEncoder) -> None:
    """`folder/config.json` (which encoder, by name and sha256; the adapter's sizes) + the adapter's weights."""
    spec = _spec(module.name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": KIND,
        "weights": module.name,
        "sha256": {f.path: f.sha256 for f in spec.files},
        "context_dim": module.context_dim,
        "context_tokens": module.context_tokens,
        "hidden": module.hidden,
    }
    (folder / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in module.adapter.state_dict().items()}, str(folder / ADAPTER_FILE)
    )


def is_saved_here(folder: Path) -> bool:
    """True when `folder` (a checkpoint's `text_encoder/`) records a sentence encoder rather than holding one."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def load(folder: Path, *, cache_dir=None, offline=None):
    """The `SentenceEncoder` a checkpoint's `text_encoder/` records (its adapter fresh: the caller loads
    `ADAPTER_FILE` into `module.adapter`), and its tokenizer.

    The recorded sha256s must be the ones this digseg's registry holds for that name: an encoder with other
    weights would give every prompt another embedding, and the adapter would answer the wrong questions."""
    path = Path(folder) / "config.json"
    record = check_type(
        read_settings_file(path, "text encoder config", error=CheckpointError), dict, str(path), error=CheckpointError
    )
    for key, kind in (
        ("weights", str),
        ("sha256", dict),
        ("context_dim", int),
        ("context_tokens", int),
        ("hidden", int),
    ):
        check_type(record.get(key), kind, f"{path}: {key}", error=CheckpointError)
    spec = _spec(record["weights"])
    known = {f.path: f.sha256 for f in spec.files}
    differing = sorted(p for p in set(record["sha256"]) | set(known) if record["sha256"].get(p) != known.get(p))
    if differing:
        raise CheckpointError(
            f"{path} needs the text encoder {record['weights']!r} with other files than this digseg records for "
            f"that name ({', '.join(differing)}): use the digseg version that trained it"
        )
    module, tokenizer = build(
        record["weights"],
        context_dim=record["context_dim"],
        context_tokens=record["context_tokens"],
        hidden=record["hidden"],
        cache_dir=cache_dir,
        offline=offline,
    )
    return module, tokenizer
