"""The registry of named weights: what each released entry is and where its files come from.

One job: describe the weights digseg can fetch by name (``FileSpec``, ``WeightsSpec``) and list them
(``REGISTRY``), with the error that names an unknown entry and the closest known one.

It does not know where entries are cached or how they are fetched (``store.py``), listed, verified or removed
(``cache.py``), how a checkpoint is loaded (``models.checkpoint``) nor the Hub's own ways (``hub.py``); it does
no I/O.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from digseg_cli.errors import WeightsUnavailableError
from digseg_cli.weights.hub import HUB_ALLOW

SOURCES = ("bundled", "hub", "url")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class FileSpec:
    """One file of a URL entry: path relative to the entry folder (and to its base URL)."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class WeightsSpec:
    """A released set of weights. ``source`` says where its files come from."""

    name: str
    description: str
    source: str  # "bundled" | "hub" | "url"
    repo_id: str | None = None  # hub
    revision: str | None = None  # hub: pinned 40-hex commit; url: a version label (optional)
    base_url: str | None = None  # url: file i is fetched from base_url/files[i].path
    files: tuple[FileSpec, ...] = ()
    licence: str = ""
    base_model: str | None = None
    classes: tuple[str, ...] = ()
    homepage: str = ""
    size_hint: int | None = None  # bytes, when ``files`` is not listed (hub entries)
    allow_patterns: tuple[str, ...] = field(default=HUB_ALLOW)

    def __post_init__(self) -> None:
        assert NAME_RE.match(self.name), f"bad weights name {self.name!r}"
        assert self.source in SOURCES, f"{self.name}: source must be one of {SOURCES}"
        assert self.source != "hub" or (self.repo_id and self.revision), f"{self.name}: hub needs repo_id+revision"
        assert self.source != "url" or (self.base_url and self.files), f"{self.name}: url needs base_url+files"

    @property
    def size(self) -> int | None:
        return sum(f.size for f in self.files) if self.files else self.size_hint


REGISTRY: dict[str, WeightsSpec] = {
    spec.name: spec
    for spec in (
        WeightsSpec(
            name="demo",
            description="Built-in compact demo model (CPU-sized; synthetic aerial scenes)",
            source="bundled",
            licence="Apache-2.0",
            classes=("road", "tree", "building", "water", "field"),
        ),
        WeightsSpec(
            name="sd2",
            description="Stable Diffusion 2 (768 px, v-prediction): base for fine-tuning",
            source="hub",
            repo_id="stabilityai/stable-diffusion-2",
            revision="1e128c8891e52218b74cde8f26dbfc701cb99d79",
            licence="CreativeML Open RAIL++-M",
            homepage="https://huggingface.co/stabilityai/stable-diffusion-2",
            size_hint=5_160_000_000,
        ),
        WeightsSpec(
            name="sd15",
            description="Stable Diffusion 1.5 (512 px, epsilon): base for fine-tuning",
            source="hub",
            repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
            licence="CreativeML Open RAIL-M",
            homepage="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5",
            size_hint=4_270_000_000,
        ),
    )
}


def unknown_weights_error(text: str, registry: Mapping[str, WeightsSpec]) -> WeightsUnavailableError:
    close = difflib.get_close_matches(text, list(registry), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return WeightsUnavailableError(
        f"unknown weights '{text}': not a local file or folder, not a registry name "
        f"({', '.join(sorted(registry))}) and not a Hub id owner/name or owner/name@revision.{hint} "
        f"See: digseg weights list"
    )
