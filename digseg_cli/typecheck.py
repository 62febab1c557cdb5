"""What a value read from a user's settings file must be, and the one message when it is not.

`check_type` checks a value that came out of a prompts file, a class list or a checkpoint config against
the annotation it must fit, naming the key (`prompts.yaml: classes[2].synonyms must be a list of strings,
got 5`), so a wrong type never reaches code that would fail on it with a traceback. Reading the files is
`digseg_cli.files.read_settings_file`'s job; what each key must be is the caller's. `check_known_keys` is the
one refusal of a key no setting has, with the nearest one suggested.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from digseg_cli.errors import UsageError

# What a settings value must be: a type, a tuple of types, or a description with its own check.
_NUMBER = (int, float)


def is_of_type(value: Any, expected: Any) -> bool:
    """Whether `value` fits the annotation `expected`: `str`, `int`, `float` (an int too), `bool`, `dict`,
    `list[X]`, `X | None` and unions of them. A bool is not a number (`True` is no resolution)."""
    import types
    import typing

    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(is_of_type(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(expected) or (Any,)
        return isinstance(value, list) and all(is_of_type(v, item) for v in value)
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    if expected in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, _NUMBER if expected is float else expected)


def type_name(expected: Any) -> str:
    """`expected` as the message says it: "an integer", "a list of strings", "a string or null"."""
    import types
    import typing

    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping"}
    names[type(None)] = "null"
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(expected))
    if origin is list:
        (item,) = typing.get_args(expected) or (Any,)
        return "a list" if item is Any else f"a list of {type_name(item).split(' ', 1)[1]}s"
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def check_type(value: Any, expected: Any, where: str, *, error: type[UsageError] = UsageError) -> Any:
    """`value` when it fits `expected` (see `is_of_type`), else `error("<where> must be <type>, got <value>")`:
    the one message for a wrong value type in a settings file (`prompts.yaml: classes[2].synonyms must be a
    list of strings, got 5`)."""
    if not is_of_type(value, expected):
        raise error(f"{where} must be {type_name(expected)}, got {value!r:.60}")
    return value


def check_known_keys(
    keys: Iterable[Any], known: Iterable[str], where: str, *, error: type[UsageError] = UsageError, hint: str = ""
) -> None:
    """Nothing when every key is one of `known`; else `error("unknown keys in <where>: 'max_step' (did you mean
    'max_steps'?)<hint>")`, the nearest known key suggested for each (difflib)."""
    import difflib

    known = list(known)
    unknown = sorted((k for k in keys if k not in known), key=str)
    if unknown:
        named = [
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), known, 1)) else "")
            for k in unknown
        ]
        raise error(f"unknown keys in {where}: {', '.join(named)}{hint}")
