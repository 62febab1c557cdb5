"""`DigsegConfig`: the settings that travel with every checkpoint as `digseg_config.json` (DESIGN §3).

Every method choice of DESIGN §1 is a field here, never a constant hidden in code. This module reads and
writes JSON and validates values (each key's type where the file is read); it knows nothing of torch,
models or the command line.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digseg_cli.core import OBJECTIVES
from digseg_cli.errors import CheckpointError, UsageError
from digseg_cli.files import read_settings_file
from digseg_cli.typecheck import check_known_keys, check_type

FORMAT_VERSION = 1
CONFIG_NAME = "digseg_config.json"
MASK_ENCODINGS = ("mask",)  # "overlay" (the mask drawn over the image) is kept for later (DESIGN §1.2)
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Mask decoders and image encoders a pipeline can use; "auto" is the fast one when its recorded accuracy check
# passed (`inference.fast_parts`).
DECODERS = ENCODERS = ("auto", "vae", "fast")


def check_prompt_template(template: str, what: str = "`prompt_template`") -> str:
    """`template` if it puts a class name into a prompt: it has the field `{name}` and no other (`{{`/`}}` are
    literal braces). Else a `UsageError` naming the option (`what`). The one check for checkpoints, `--prompt-template`
    of segment and eval, and training samples."""
    try:
        usable = template.format(name="\0") != template.format(name="")
    except (KeyError, IndexError, ValueError):  # another field, `{}`, or a lone brace
        usable = False
    if not usable:
        raise UsageError(f"{what} must contain {{name}} and no other fields, got {template!r}")
    return template


@dataclass
class DigsegConfig:
    """Model behaviour and provenance; CLI `None` values resolve to the `default_*` fields."""

    base_model: str  # Hub id, local folder, or "compact:<name>"
    base_revision: str | None = None
    prediction_type: str = "v_prediction"
    objective: str = "one-step"
    mask_encoding: str = "mask"
    prompt_template: str = "{name}"
    default_steps: int = 1
    default_ensemble: int = 1
    default_resolution: int = 512
    default_threshold: float = 0.5
    film_hidden: int = 256
    classes: list[dict] | None = None  # closed-set models: [{"id", "name", "synonyms"}]
    unrelated_words: list[str] | None = None  # prompts trained as "nothing here" (with `classes`: its vocabulary)
    # A prompt whose pooled embedding has a cosine similarity under this with every trained word is flagged
    # as far from what the model knows (all-MiniLM-L6-v2: held-out synonyms 0.48-0.89, nonsense 0.16-0.44).
    known_prompt_similarity: float = 0.45
    description: str = ""
    training: dict = field(default_factory=dict)  # how it was trained (command, data, steps, ...)
    evaluation: dict = field(default_factory=dict)  # scores, e.g. {"synth-val": {"miou": 0.83}}
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"`objective` must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.mask_encoding not in MASK_ENCODINGS:
            raise UsageError(f"`mask_encoding` must be one of {', '.join(MASK_ENCODINGS)}, got {self.mask_encoding!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise UsageError(
                f"`prediction_type` must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        check_prompt_template(self.prompt_template)
        if not 0.0 <= self.default_threshold <= 1.0:
            raise UsageError(f"`default_threshold` must be in [0, 1], got {self.default_threshold}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = CONFIG_NAME) -> DigsegConfig:
        """A config from the parsed `digseg_config.json`; every key and value type is checked, and any
        problem is a `CheckpointError` naming the key (`digseg_config.json: default_threshold must be a
        number, got 'x'`)."""
        check_type(data, dict, where, error=CheckpointError)
        known = {f.name: f for f in dataclasses.fields(cls)}
        check_known_keys(data, known, where, error=CheckpointError)
        missing = [
            n for n, f in known.items() if n not in data and f.default is f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise CheckpointError(f"{where} lacks {', '.join(missing)}: re-save the checkpoint")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            check_type(value, hints[key], f"{where}: {key}", error=CheckpointError)
        for i, entry in enumerate(data.get("classes") or []):
            check_type(entry.get("name"), str, f"{where}: classes[{i}].name", error=CheckpointError)
            check_type(entry.get("synonyms", []), list[str], f"{where}: classes[{i}].synonyms", error=CheckpointError)
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {version} is newer than this digseg understands ({FORMAT_VERSION}): "
                "upgrade digseg (pip install -U digseg)"
            )
        try:
            return cls(**data)
        except UsageError as exc:
            raise CheckpointError(f"{where}: {exc}") from None

    def save(self, folder: Path) -> None:
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, folder: Path) -> DigsegConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.exists():
            raise CheckpointError(f"{folder} is not a digseg checkpoint: {CONFIG_NAME} is missing")
        return cls.from_dict(read_settings_file(path, "checkpoint config", error=CheckpointError), str(path))

    def trained_words(self) -> list[str]:
        """Every prompt the model trained on: class names, their synonyms and the unrelated words."""
        words = [w for c in self.classes or [] for w in (c["name"], *c.get("synonyms", []))]
        return list(dict.fromkeys(words + list(self.unrelated_words or [])))

    def class_names(self) -> list[str] | None:
        return [c["name"] for c in self.classes] if self.classes else None
