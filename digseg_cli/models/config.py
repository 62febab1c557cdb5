"""`DigsegConfig`: the settings that travel with every checkpoint as `digseg_config.json` (DESIGN §3).

Every method choice of DESIGN §1 is a field here, never a constant hidden in code. This module reads and
writes JSON and validates values; it knows nothing of torch, models or the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digseg_cli.core import OBJECTIVES
from digseg_cli.errors import CheckpointError, UsageError

FORMAT_VERSION = 1
CONFIG_NAME = "digseg_config.json"
MASK_ENCODINGS = ("mask",)  # "overlay" (the mask drawn over the image) is kept for later (DESIGN §1.2)
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Mask decoders a pipeline can use; "auto" is the fast one when its recorded accuracy check passed.
DECODERS = ("auto", "vae", "fast")


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
    def from_dict(cls, data: dict[str, Any]) -> DigsegConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = [
                f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                for k in unknown
            ]
            raise CheckpointError(f"unknown keys in {CONFIG_NAME}: {', '.join(hints)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {version} is newer than this digseg understands ({FORMAT_VERSION}): "
                "upgrade digseg (pip install -U digseg)"
            )
        return cls(**data)

    def save(self, folder: Path) -> None:
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, folder: Path) -> DigsegConfig:
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{folder} is not a digseg checkpoint: {CONFIG_NAME} is missing") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)

    def class_names(self) -> list[str] | None:
        return [c["name"] for c in self.classes] if self.classes else None
