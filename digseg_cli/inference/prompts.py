"""Class prompts for `digseg segment`: `--prompt "road|street, tree"`, `--prompts classes.yaml`, `--threshold`.

One job: turn what the user typed or wrote in a JSON/YAML file into `PromptClass`es (name, texts whose scores
are averaged, optional colour and threshold), refusing instruction-like prompts and unknown keys with a hint;
resolve each class's threshold by the one rule every caller uses (`resolve_thresholds`); and name the output
files: each class's file-safe name (`file_names`), the suffixes `digseg segment` writes (`OUTPUT_SUFFIXES`)
and how a name too long for the file system is shortened (`fit_name`).

It knows nothing of images, models, folders or how a run is carried out (`digseg_cli.segment`), nor of Typer
or Rich; whether a prompt template is usable is `models.config.check_prompt_template`'s to say.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from digseg_cli.errors import UsageError
from digseg_cli.files import read_settings_file
from digseg_cli.inference import images
from digseg_cli.typecheck import check_type

_INSTRUCTION = re.compile(
    r"^(all|every|each|any|segment|find|detect|show|highlight|mark|select|extract|locate|identify|give|please)\b",
    re.IGNORECASE,
)
# What `digseg segment` writes beside each input's stem; class names never take these words.
MASK_SUFFIX = ".mask.png"
OVERLAY_SUFFIX = ".overlay.jpg"
PROB_SUFFIXES = {"png16": ".prob.png", "npy": ".prob.npy"}
# `--save-confidence`: the winning class's probability, its margin over the runner-up, the ensemble's spread.
CONFIDENCE_SUFFIXES = {"confidence": ".confidence.png", "margin": ".margin.png", "spread": ".spread.png"}
# A GeoTIFF input's outputs are GeoTIFFs: the label map, binary masks (<stem>.<class>.tif), probabilities and
# confidence maps.
MASK_TIF_SUFFIX, PROB_TIF_SUFFIX = ".mask.tif", ".prob.tif"
CONFIDENCE_TIF_SUFFIXES = {name: suffix.replace(".png", ".tif") for name, suffix in CONFIDENCE_SUFFIXES.items()}
VECTOR_SUFFIXES = {"geojson": ".regions.geojson", "gpkg": ".regions.gpkg"}  # --vector: one file per input
OUTPUT_SUFFIXES = (
    MASK_SUFFIX,
    OVERLAY_SUFFIX,
    *PROB_SUFFIXES.values(),
    *CONFIDENCE_SUFFIXES.values(),
    MASK_TIF_SUFFIX,
    PROB_TIF_SUFFIX,
    *CONFIDENCE_TIF_SUFFIXES.values(),
    *VECTOR_SUFFIXES.values(),
)
# Class names that would collide with <rel>.mask.png / .overlay.jpg / .prob.* / .confidence.png / ...
_RESERVED_NAMES = {"mask", "overlay", "prob", *CONFIDENCE_SUFFIXES}
MAX_FILE_NAME_BYTES = 255  # one path component (ext4, APFS, most others)
MAX_CLASS_NAME_BYTES = 96  # a class's part of `<stem>.<class>.prob.png`, leaving the stem most of the 255
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class PromptClass:
    """One class: `name` (legends, file names), `texts` whose scores are averaged (main prompt first, then
    synonyms), and optionally its own colour and threshold."""

    name: str
    texts: tuple[str, ...]
    color: RGB | None = None
    threshold: float | None = None


def _check_text(text: str) -> str:
    text = " ".join(text.split())
    if _INSTRUCTION.match(text):
        raise UsageError(
            f"prompt {text!r} reads like an instruction; give each class as a short noun phrase "
            f"(e.g. {_INSTRUCTION.sub('', text).strip(' .') or 'road'!r}), several classes separated by commas"
        )
    return text


def dedupe_classes(classes: list[PromptClass], warnings: list[str]) -> list[PromptClass]:
    """Drop repeated class names (case-insensitive), noting each in `warnings`."""
    seen: dict[str, PromptClass] = {}
    for c in classes:
        if c.name.lower() in seen:
            warnings.append(f"class {c.name!r} is given twice; the second one is ignored")
        else:
            seen[c.name.lower()] = c
    return list(seen.values())


def parse_prompts(text: str) -> tuple[list[PromptClass], list[str]]:
    """`"road|street, tree"` → classes (one per comma-separated item; `|` separates synonyms) and warnings."""
    classes, warnings = [], []
    for item in text.split(","):
        synonyms = [_check_text(s) for s in item.split("|") if s.strip()]
        if not synonyms:
            warnings.append(f"empty class in prompt {text!r} ignored")
            continue
        classes.append(PromptClass(synonyms[0], tuple(dict.fromkeys(synonyms))))
    if not classes:
        raise UsageError(f'`--prompt` {text!r} names no class: give e.g. --prompt "road, tree"')
    return dedupe_classes(classes, warnings), warnings


_CLASS_KEYS = ("name", "prompt", "synonyms", "color", "colour", "threshold", "id", "description")
# The type each key of a class entry must have (checked where the file is read, naming the key).
_KEY_TYPES: dict[str, Any] = {
    "name": str,
    "prompt": str | None,
    "synonyms": list[str] | str | None,
    "color": str | list[int] | None,
    "colour": str | list[int] | None,
    "threshold": float | None,
    "id": int | str | None,
    "description": str | None,
}


def _class_from_entry(entry: Any, where: str) -> PromptClass:
    """One class from a file's entry; `where` names it (`prompts.yaml: classes[2]`)."""
    if isinstance(entry, str):
        entry = {"name": entry.split("|")[0], "synonyms": entry.split("|")[1:]}
    if isinstance(entry, Mapping) and "name" in entry:
        check_type(entry["name"], str, f"{where}.name")
    if not isinstance(entry, Mapping) or not str(entry.get("name", "")).strip():
        raise UsageError(f"{where}: each class needs a `name` (got {entry!r:.60})")
    unknown = [k for k in entry if k not in _CLASS_KEYS]
    if unknown:
        hint = difflib.get_close_matches(str(unknown[0]), _CLASS_KEYS, 1)
        raise UsageError(
            f"{where}: unknown key {unknown[0]!r} in class {entry['name']!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else f"; known keys: {', '.join(_CLASS_KEYS)}")
        )
    for key, value in entry.items():
        check_type(value, _KEY_TYPES[key], f"{where}.{key}")
    synonyms = entry.get("synonyms") or []
    synonyms = synonyms.split("|") if isinstance(synonyms, str) else list(synonyms)
    texts = [_check_text(t) for t in [entry.get("prompt") or entry["name"], *synonyms] if t.strip()]
    color = entry.get("color", entry.get("colour"))
    threshold = entry.get("threshold")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UsageError(f"{where}.threshold must be a number in [0, 1], got {threshold!r}")
    return PromptClass(
        entry["name"].strip(),
        tuple(dict.fromkeys(texts)),
        images.parse_color(color) if color is not None else None,
        None if threshold is None else float(threshold),
    )


def _entries(data: Any, name: str) -> list[tuple[Any, str]]:
    """The class entries of a parsed prompts file, each with the name of its place (`classes.yaml: classes[2]`)."""
    if isinstance(data, Mapping) and "classes" in data:
        if set(data) - {"classes"}:
            extra = sorted(str(k) for k in set(data) - {"classes"})
            raise UsageError(f"{name}: unknown top-level keys {extra}; only `classes` is read")
        data, name = data["classes"], f"{name}: classes"
    elif isinstance(data, Mapping):  # {road: {color: ...}}, {road: [street, highway]}, {road: "asphalt road"}, {road: }
        entries = []
        for k, v in data.items():
            where = f"{name}: {check_type(k, str, f'{name}: class name {k!r}')}"
            if not isinstance(v, Mapping):
                v = {"synonyms": v} if isinstance(v, list) else {"prompt": v} if v is not None else {}
            entries.append(({"name": k, **v}, where))
        return entries
    if not isinstance(data, list) or not data:
        raise UsageError(f"{name}: expected a non-empty list of classes (see `digseg segment --help`)")
    return [(entry, f"{name}[{i}]") for i, entry in enumerate(data)]


def load_prompt_file(path: str | Path) -> tuple[list[PromptClass], list[str]]:
    """Classes from a JSON or YAML file: a list of names/entries, `{classes: [...]}`, or `{name: entry}`.

    An entry has `name` and optionally `prompt` (text, default the name), `synonyms` (list or `a|b`),
    `color` (name, `#rrggbb` or `r,g,b`), `threshold` (0–1) and `id`/`description` (kept for eval/train).
    Each value's type is checked, naming its place in the file (`classes.yaml: classes[2].synonyms`).
    """
    path = Path(path)
    entries = _entries(read_settings_file(path, "prompts file"), path.name)
    warnings: list[str] = []
    return dedupe_classes([_class_from_entry(e, where) for e, where in entries], warnings), warnings


def load_classes(prompts: Sequence[str], prompts_file: str | Path | None = None) -> tuple[list[PromptClass], list[str]]:
    """The classes of every `--prompt` text, then of the `--prompts` file, repeated names dropped; and warnings."""
    parsed = [parse_prompts(text) for text in prompts]
    if prompts_file is not None:
        parsed.append(load_prompt_file(prompts_file))
    classes = [c for found, _ in parsed for c in found]
    warnings = [w for _, more in parsed for w in more]
    return dedupe_classes(classes, warnings), warnings


def classes_from_config(classes: Sequence[Mapping] | None) -> list[PromptClass]:
    """A closed-set checkpoint's class list (`[{"id", "name", "synonyms"}]`) as prompt classes."""
    return [PromptClass(c["name"], tuple(dict.fromkeys([c["name"], *c.get("synonyms", [])]))) for c in classes or []]


def parse_thresholds(values: Sequence[str] | None) -> tuple[float | None, dict[str, float]]:
    """`["0.4"]`, `["road=0.4", "tree=0.3"]` or `["0.5,road=0.4"]` → (default, per-class thresholds)."""
    default, per_class = None, {}
    for item in (p.strip() for v in values or () for p in str(v).split(",") if p.strip()):
        name, _, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"`--threshold` {item!r} must be a number in [0, 1] or CLASS=NUMBER") from None
        if not 0 <= number <= 1:
            raise UsageError(f"`--threshold` {item!r} must be in [0, 1]")
        if name.strip():
            per_class[name.strip()] = number
        else:
            default = number
    return default, per_class


def resolve_thresholds(
    classes: Sequence[PromptClass],
    checkpoint_default: float,
    *,
    threshold: float | Sequence[float] | None = None,
    overrides: Mapping[str, float] | None = None,
) -> tuple[list[PromptClass], list[float]]:
    """Each class's threshold, by the one rule of digseg (segment runs and the pipeline both call this):

    1. its override by name (`--threshold road=0.4`, `overrides`), else
    2. its own (`threshold` in a prompts file, `PromptClass.threshold`), else
    3. `threshold`: one value for every class (`--threshold 0.4`) or, from the Python API, one per class, else
    4. the checkpoint's `default_threshold` (`checkpoint_default`).

    Returns the classes with their overrides put in (as `run.json` records them) and the K thresholds. An
    override that names no class, or a threshold outside [0, 1], is a `UsageError`.
    """
    overrides, names = overrides or {}, [c.name for c in classes]
    for name in overrides:
        if name not in names:
            hint = difflib.get_close_matches(name, names, 1)
            known = f"; did you mean {hint[0]!r}?" if hint else f"; classes: {', '.join(names)}"
            raise UsageError(f"`--threshold {name}=…` names no class{known}")
    classes = [replace(c, threshold=overrides[c.name]) if c.name in overrides else c for c in classes]
    one_value = threshold is None or isinstance(threshold, (int, float))
    run_wide = [threshold] * len(classes) if one_value else list(threshold)
    wrong = UsageError("`threshold` must be one value in [0, 1] or one per prompt")
    if len(run_wide) != len(classes):
        raise wrong
    resolved = [
        float(next(t for t in (c.threshold, run, checkpoint_default) if t is not None))
        for c, run in zip(classes, run_wide, strict=True)
    ]
    if not all(0 <= t <= 1 for t in resolved):
        raise wrong
    return classes, resolved


def fit_name(name: str, max_bytes: int) -> str:
    """`name` when its UTF-8 form fits `max_bytes`; else its head (cut between characters), `~` and 8 hex
    digits of the full name's sha256, so two long names that share a head still differ."""
    encoded = name.encode("utf-8")
    if len(encoded) <= max_bytes:
        return name
    import hashlib

    digest = hashlib.sha256(encoded).hexdigest()[:8]
    return encoded[: max(0, max_bytes - 9)].decode("utf-8", "ignore") + "~" + digest


def file_names(classes: Sequence[PromptClass]) -> list[str]:
    """File-safe, unique name per class for `<rel>.<name>.png`: no dots, none of `_RESERVED_NAMES` (`mask`,
    `overlay`, `prob`, `confidence`, `margin`, `spread`: a trailing `_` is added), at most `MAX_CLASS_NAME_BYTES`
    (a longer name is shortened by `fit_name`)."""
    names: list[str] = []
    for c in classes:
        base = re.sub(r"[^\w-]+", "_", c.name).strip("_") or "class"
        base = fit_name(base + "_" if base.lower() in _RESERVED_NAMES else base, MAX_CLASS_NAME_BYTES - 4)
        name, i = base, 2
        while name.lower() in (n.lower() for n in names):
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names
