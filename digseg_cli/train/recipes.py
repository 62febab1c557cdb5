"""Recipes: a YAML file of `TrainSettings` values that `digseg train --recipe NAME|FILE` starts from.

`load_recipe` reads a shipped recipe by name (the YAML files in `recipes/` beside this module, package data)
or any YAML/JSON file by path, and checks it as the command line would be checked: every key a settings field
(a dash may stand for an underscore: `max-steps` is `max_steps`), an unknown key refused with the nearest
one suggested, every value of its field's type (`time_limit` also as a duration such as `45m`; `1e-3` read
as the number YAML 1.1 leaves as text), and `extends: NAME|FILE` laying another recipe under it.
`resolve_settings` lays the command line over the recipe over the defaults. What a run folder records of its
recipe is `TrainSettings.to_yaml`: the resolved values, not the chain they came from.

It knows nothing of the command line's parsing or of what a run does with its settings.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

from digseg_cli.errors import UsageError
from digseg_cli.files import read_settings_file
from digseg_cli.train.settings import RUN_ONLY, TrainSettings, parse_duration
from digseg_cli.typecheck import check_known_keys, check_type

RECIPES_DIR = Path(__file__).with_name("recipes")
# YAML 1.1 (PyYAML) reads `1e-3` as a string: it wants a dot (`1.0e-3`). In a number's place it means the number.
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def shipped_recipes() -> list[str]:
    """The names `--recipe` takes besides a file: the shipped recipes' file stems."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_file(name_or_file: str, *, beside: Path | None = None, asked_by: str = "--recipe") -> Path:
    """The shipped recipe of that name, else the file at that path (relative to the folder `beside`, the
    extending recipe's, when given); neither is a `UsageError` naming both and who asked (`asked_by`)."""
    shipped = RECIPES_DIR / f"{name_or_file}.yaml"
    if name_or_file in shipped_recipes():
        return shipped
    path = Path(name_or_file).expanduser()
    if beside is not None and not path.is_absolute():
        path = beside / path
    if not path.exists():
        raise UsageError(
            f"{asked_by} {name_or_file}: no such file, and not a shipped recipe ({', '.join(shipped_recipes())})"
        )
    return path


def load_recipe(name_or_file: str) -> dict[str, Any]:
    """The settings a recipe sets, checked (see the module docstring), with `recipe` set to `name_or_file`:
    a key or value the recipe cannot set, a file that is missing, not YAML or not a mapping is one
    `UsageError` line (exit 2) naming the file and the key. A recipe with `extends: NAME|FILE` sets what
    that recipe sets, its own keys over them (a file named relative to the extending recipe's folder)."""
    return {**_load(recipe_file(name_or_file), ()), "recipe": name_or_file}


def _load(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The settings of the recipe at `path`, its `extends` chain laid under them; `chain` is the recipes that
    extend it, so that one that extends itself, directly or not, is refused instead of recursing forever."""
    where, resolved = f"recipe {path}", path.resolve()
    if resolved in chain:
        raise UsageError(f"{where} extends itself (through {', '.join(str(p) for p in chain)}); remove a link")
    data = read_settings_file(path, "recipe")
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise UsageError(f"{where} must be a mapping of settings (`lr: 3.0e-5`, one a line), got {got}")
    parent = data.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise UsageError(f"{where}: `extends` must be a recipe's name or file, got {parent!r}")
    if parent is None:
        return _settings(data, where)
    under = _load(recipe_file(parent, beside=path.parent, asked_by=f"{where}: extends:"), (*chain, resolved))
    return {**under, **_settings(data, where)}


def _settings(data: dict[Any, Any], where: str) -> dict[str, Any]:
    """One recipe file's own keys as settings, each checked (see the module docstring)."""
    fields = {f.name for f in dataclasses.fields(TrainSettings)} - set(RUN_ONLY)
    keys = [k.replace("-", "_") if isinstance(k, str) else k for k in data]
    if run_only := sorted(set(RUN_ONLY) & set(keys)):
        raise UsageError(f"{where}: `{run_only[0]}` is not a recipe setting (pass --resume or --resume-from)")
    check_known_keys(keys, fields, where, hint="; `digseg train --print-config` lists every key")
    if len(set(keys)) < len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise UsageError(f"{where} sets {', '.join(twice)} twice (once with dashes, once with underscores)")
    hints = typing.get_type_hints(TrainSettings)
    return {key: _value(value, hints[key], key, where) for key, value in zip(keys, data.values(), strict=True)}


def _value(value: Any, hint: Any, key: str, where: str) -> Any:
    """`value` as the field `key` (annotated `hint`) holds it, checked against the type a YAML file can give
    for it: paths as text made `Path`s, durations and exponent numbers read, whole numbers of a float field
    made floats (so a recorded recipe reads `0.0` where the default does)."""
    if key == "time_limit" and isinstance(value, str):
        try:
            value = parse_duration(value, key)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
    numeric = _allows(hint, float) and not _allows(hint, int)
    if numeric and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)
    if numeric and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    is_path = _allows(hint, Path)
    check_type(value, (str if hint is Path else str | None) if is_path else hint, f"{where}: `{key}`")
    return Path(value) if is_path and value is not None else value


def _allows(hint: Any, kind: type) -> bool:
    """Whether the annotation `hint` is `kind` or a union with it (`Path | None`, `float | None`)."""
    return hint is kind or kind in typing.get_args(hint)


def resolve_settings(recipe: dict[str, Any], given: dict[str, Any]) -> TrainSettings:
    """The settings of a run: the options given on the command line over the recipe's (`load_recipe`, or a
    resumed run's stored settings) over `TrainSettings`' defaults. Not checked: `check_inputs` does that."""
    return TrainSettings(**{**recipe, **given})
