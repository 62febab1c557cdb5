"""Vocabularies: the words a model trains on for each class, the unrelated words it learns mean "nothing
here", and the words held out from both to test it on (`vocabularies/*.yaml`, or any YAML file).

One job: read and check a vocabulary file, so that no held-out word is also a training word (the test would
then measure memory, not understanding) and every key and value has its type. What training does with the
words is `train.samples`'; what the word test measures is `evaluate.words`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digseg_cli.errors import UsageError
from digseg_cli.files import read_settings_file
from digseg_cli.typecheck import check_known_keys, check_type

VOCABULARIES_DIR = Path(__file__).with_name("vocabularies")
_KEYS = ("classes", "unrelated", "held_out", "held_out_unrelated")


@dataclass(frozen=True)
class Vocabulary:
    """`synonyms` and `held_out`: class name → words; `unrelated` and `held_out_unrelated`: words."""

    name: str
    synonyms: dict[str, tuple[str, ...]]
    unrelated: tuple[str, ...]
    held_out: dict[str, tuple[str, ...]]
    held_out_unrelated: tuple[str, ...]

    def training_words(self) -> set[str]:
        return {
            word_key(w) for w in (*self.unrelated, *self.synonyms, *(w for ws in self.synonyms.values() for w in ws))
        }

    def synonyms_of(self, name: str) -> tuple[str, ...]:
        """The training words of class `name` (case and spaces ignored), none for a class it does not list."""
        return next((ws for n, ws in self.synonyms.items() if word_key(n) == word_key(name)), ())


def word_key(word: str) -> str:
    """The form in which two words are the same word: case and spacing ignored (`Crop  field` is `crop field`)."""
    return " ".join(word.lower().split())


def shipped_vocabularies() -> list[str]:
    return sorted(p.stem for p in VOCABULARIES_DIR.glob("*.yaml"))


def load_vocabulary(name_or_file: str) -> Vocabulary:
    """A shipped vocabulary by name, or a YAML/JSON file; a `UsageError` (exit 2) for anything it cannot be."""
    path = VOCABULARIES_DIR / f"{name_or_file}.yaml"
    if name_or_file not in shipped_vocabularies():
        path = Path(name_or_file).expanduser()
        if not path.is_file():
            raise UsageError(
                f"--vocabulary {name_or_file}: no such file, and not a shipped vocabulary "
                f"({', '.join(shipped_vocabularies())})"
            )
    where = f"vocabulary {path}"
    data = check_type(read_settings_file(path, "vocabulary"), dict, where)
    check_known_keys(data, _KEYS, where)
    vocabulary = Vocabulary(
        name=name_or_file,
        synonyms=_by_class(data.get("classes"), f"{where}: classes"),
        unrelated=_words(data.get("unrelated"), f"{where}: unrelated"),
        held_out=_by_class(data.get("held_out"), f"{where}: held_out"),
        held_out_unrelated=_words(data.get("held_out_unrelated"), f"{where}: held_out_unrelated"),
    )
    trained = vocabulary.training_words()
    tested = [*(w for ws in vocabulary.held_out.values() for w in ws), *vocabulary.held_out_unrelated]
    if leaked := sorted({w for w in tested if word_key(w) in trained}):
        raise UsageError(f"{where}: held-out words are also training words: {', '.join(leaked)}")
    return vocabulary


def _words(value: Any, where: str) -> tuple[str, ...]:
    words = check_type(value if value is not None else [], list[str], where)
    return tuple(dict.fromkeys(" ".join(w.split()) for w in words if w.strip()))


def _by_class(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    mapping = check_type(value if value is not None else {}, dict, where)
    return {check_type(k, str, f"{where}: class name"): _words(v, f"{where}.{k}") for k, v in mapping.items()}
