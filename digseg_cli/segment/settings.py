"""What a `digseg segment` run is asked to do, and what that comes to for one model.

One job: `SegmentSettings` holds every choice of a folder run except the model, validated when it is made;
`resolve_run` turns the settings and a loaded pipeline into a `ResolvedRun` once, before the first image: the
classes, each class's threshold (by `prompts.resolve_thresholds`, the one threshold rule), the label palette
and the pipeline's arguments; `prompt_warnings` says what the model's tokenizer makes of those classes' prompts.

It knows nothing of files, scheduling or outputs (`run.py`, `outputs.py`), nor of Typer or Rich; parsing
prompts is `inference/prompts.py`'s job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from digseg_cli.errors import UsageError
from digseg_cli.inference import images
from digseg_cli.inference.coco_rle import require_pycocotools
from digseg_cli.inference.prompts import RGB, PromptClass, classes_from_config, resolve_thresholds
from digseg_cli.models.config import DECODERS, DigsegConfig, check_prompt_template

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline, Prompt

MODES = ("semantic", "multilabel")
PROBS_FORMATS = ("png16", "npy")


def parse_tile(text: str | int | None) -> str | int:
    """`auto|off|N` → "auto", "off" or a tile size in pixels."""
    value = str(text if text is not None else "auto").strip().lower()
    if value in ("auto", "off"):
        return value
    if not value.isdigit() or int(value) < 8:
        raise UsageError(f"`--tile` must be auto, off or a size in pixels (≥ 8), got {text!r}")
    return int(value)


def parse_batch_size(text: str) -> int | None:
    """`auto|N` → None (the pipeline's own) or a number of (tile, prompt) pairs per U-Net call."""
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise UsageError(f"`--batch-size` must be auto or a positive integer, got {text!r}")
    return None if text == "auto" else int(text)


@dataclass(frozen=True)
class SegmentSettings:
    """Everything a folder run needs besides the model. `None` values resolve to the checkpoint's defaults;
    empty `classes` means the checkpoint's own class list (closed-set models)."""

    classes: tuple[PromptClass, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)  # per-class overrides by class name
    threshold: float | None = None  # for classes without their own
    steps: int | None = None
    ensemble: int | None = None
    resolution: int | None = None
    mode: str = "semantic"  # semantic: argmax + threshold; multilabel: each class alone (+ binary masks)
    seed: int = 0
    tile: int | str = "auto"
    decoder: str = "auto"  # vae | fast | auto (fast when the checkpoint's distilled decoder passed its check)
    encoder: str = "auto"  # vae | fast | auto, the same rule for the image encoder (`inference.fast_parts`)
    overlap: float = 0.25
    max_pixels: int = 100_000_000  # 0 = no limit
    prompt_template: str | None = None
    recursive: bool = False
    overlay: bool = True
    overlay_alpha: float = 0.5
    save_binary: bool = False
    save_probs: bool = False
    probs_format: str = "png16"
    save_confidence: bool = False  # <rel>.confidence.png, .margin.png (+ .spread.png with an ensemble)
    rle: bool = False  # sem_seg_predictions.json: every label map as COCO RLE records (detectron2's format)
    overwrite: bool = False
    skip_existing: bool = False
    fail_fast: bool = False
    batch_size: int | None = None  # (tile, prompt) pairs per U-Net call; None = the pipeline's
    workers: int = 2  # I/O threads: reading ahead and writing behind
    jpeg_quality: int = 90
    bands: tuple[int, ...] | None = None  # a GeoTIFF's bands shown as R,G,B (or one as grey), 1-based; None: 1,2,3
    vector: str | None = None  # geojson | gpkg: one polygon per connected region per class (`segment.vectors`)
    min_area: float | None = None  # smaller regions are left out (CRS units² for GeoTIFFs, else pixels)
    simplify: float | None = None  # coverage simplification tolerance (CRS units for GeoTIFFs, else pixels)
    raster_block: int | None = None  # side of a GeoTIFF's blocks in pixels; None: 8 tiles (results do not change)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"`mode` must be one of {', '.join(MODES)}, got {self.mode!r}")
        for part in ("decoder", "encoder"):
            if getattr(self, part) not in DECODERS:
                raise UsageError(f"`{part}` must be one of {', '.join(DECODERS)}, got {getattr(self, part)!r}")
        if self.probs_format not in PROBS_FORMATS:
            raise UsageError(f"`probs_format` must be one of {', '.join(PROBS_FORMATS)}, got {self.probs_format!r}")
        if self.overwrite and self.skip_existing:
            raise UsageError("`--overwrite` and `--skip-existing` contradict each other: pick one")
        if not 0 <= self.overlap < 1:
            raise UsageError(f"`overlap` must be in [0, 1), got {self.overlap}")
        if not 0 <= self.overlay_alpha <= 1:
            raise UsageError(f"`overlay_alpha` must be in [0, 1], got {self.overlay_alpha}")
        if self.max_pixels < 0 or self.workers < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise UsageError("`max_pixels` must be ≥ 0 (0 = no limit), `workers` and `batch_size` ≥ 1")
        if len(self.classes) > 255:
            raise UsageError(f"at most 255 classes fit a label PNG, got {len(self.classes)}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UsageError(f"`threshold` must be in [0, 1], got {self.threshold}")
        if self.prompt_template is not None:
            check_prompt_template(self.prompt_template, "`--prompt-template`")
        if self.rle:
            require_pycocotools("`--rle`")
        parse_tile(self.tile)
        self._check_geo()

    def _check_geo(self) -> None:
        from digseg_cli.segment.rasters import require_geo
        from digseg_cli.segment.vectors import VECTOR_FORMATS

        if self.vector is not None and self.vector not in VECTOR_FORMATS:
            raise UsageError(f"`vector` must be one of {', '.join(VECTOR_FORMATS)}, got {self.vector!r}")
        for name in ("min_area", "simplify"):
            if (value := getattr(self, name)) is not None and (value < 0 or self.vector is None):
                flag = f"--{name.replace('_', '-')}"
                raise UsageError(f"`{flag}` must be ≥ 0, got {value}" if value < 0 else f"`{flag}` needs --vector")
        if self.bands is not None and (len(self.bands) not in (1, 3) or min(self.bands) < 1):
            raise UsageError(f"`bands` must be three band numbers (from 1) or one, got {self.bands}")
        if self.raster_block is not None and self.raster_block < 16:
            raise UsageError(f"`raster_block` must be at least 16 pixels, got {self.raster_block}")
        if self.vector is not None:
            require_geo("--vector", ("rasterio", "shapely", "pyogrio"))
        if self.bands is not None:
            require_geo("--bands (GeoTIFF inputs)")

    def classes_for(self, config: DigsegConfig) -> list[PromptClass]:
        """The classes asked for, else the checkpoint's own (possibly none), thresholds not yet resolved."""
        return list(self.classes) or classes_from_config(config.classes)


@dataclass(frozen=True)
class ResolvedRun:
    """What the settings come to for one model, the same for every image of the run."""

    classes: list[PromptClass]  # `--threshold NAME=…` overrides put in, as run.json records them
    thresholds: list[float]  # one per class, by `prompts.resolve_thresholds`
    palette: list[RGB]  # label 0 (background) first, then each class's colour
    call: dict[str, Any]  # the pipeline's keyword arguments shared by every image (all but seed and tile)
    members: int = 1  # ensemble members per image (the settings', else the checkpoint's default)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def prompts(self) -> list[Prompt]:
        """One prompt per class: its text, or its synonyms (the pipeline averages their scores)."""
        return [c.texts[0] if len(c.texts) == 1 else list(c.texts) for c in self.classes]


def resolve_classes(settings: SegmentSettings, config: DigsegConfig) -> tuple[list[PromptClass], list[float]]:
    """The classes to run (threshold overrides in) and their thresholds; a `UsageError` when there are none."""
    classes = settings.classes_for(config)
    if not classes:
        raise UsageError(
            'no classes to segment: pass --prompt "road, tree" or --prompts classes.yaml '
            "(this model has no built-in class list)"
        )
    return resolve_thresholds(
        classes, config.default_threshold, threshold=settings.threshold, overrides=settings.thresholds
    )


def resolve_run(pipe: DigsegPipeline, settings: SegmentSettings) -> ResolvedRun:
    """Resolve classes, thresholds, colours and the pipeline's arguments once per run."""
    classes, thresholds = resolve_classes(settings, pipe.config)
    defaults = images.default_palette(len(classes) + 1)[1:]
    palette = [(0, 0, 0)] + [c.color or d for c, d in zip(classes, defaults, strict=True)]
    call = dict(
        steps=settings.steps,
        ensemble=settings.ensemble,
        resolution=settings.resolution,
        threshold=thresholds,
        overlap=settings.overlap,
        prompt_template=settings.prompt_template,
        decoder=pipe.resolve_decoder(settings.decoder),
        encoder=pipe.resolve_encoder(settings.encoder),
        spread=settings.save_confidence,
    )
    members = pipe.config.default_ensemble if settings.ensemble is None else settings.ensemble
    return ResolvedRun(classes, thresholds, palette, call, members)


def prompt_warnings(pipe: DigsegPipeline, settings: SegmentSettings) -> list[str]:
    """What the model's tokenizer says of each prompt text (too long, unknown words), before a run."""
    classes, _ = resolve_classes(settings, pipe.config)
    return [
        warning
        for c in classes
        for text in c.texts
        for warning in pipe.check_prompt(pipe.format_prompt(text, settings.prompt_template))
    ]
