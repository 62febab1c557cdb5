"""A `digseg segment` run planned without the model (`--dry-run`): per input its size, tiles, outputs and fate.

One job: say what a run would do from file headers and the checkpoint config alone (no weights loaded, no
network), by the same rules as the run: the pipeline's tiling (`count_tiles`, which the run's out-of-memory
back-off uses too), the output names and the existing-outputs verdict of `outputs.py`.

It knows nothing of Typer or Rich (the CLI renders `DryRun`); reading a config without the weights is
`loading.py`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digseg_cli.inference import images
from digseg_cli.inference.prompts import PromptClass
from digseg_cli.segment import rasters
from digseg_cli.segment.inputs import InputFile, header_size
from digseg_cli.segment.loading import peek_config
from digseg_cli.segment.outputs import check_outputs, existing_verdict, output_paths
from digseg_cli.segment.settings import SegmentSettings


def count_tiles(height: int, width: int, tile: int | str, resolution: int, overlap: float) -> int:
    """How many windows the pipeline runs for an image (1 = whole image), by the pipeline's own rule."""
    from digseg_cli.core import transforms

    return transforms.tile_count(height, width, transforms.tile_size_for(tile, resolution, height, width), overlap)


def plan_segment(
    files: Sequence[InputFile],
    out_dir: str | Path,
    settings: SegmentSettings,
    classes: Sequence[PromptClass],
    *,
    resolution: int,
    members: int = 1,
) -> list[dict[str, Any]]:
    """What a run would do per input, from file headers only: size, tiles, outputs, action."""
    rows = []
    for item in files:
        paths = output_paths(Path(out_dir), item, classes, settings, members=members)
        row: dict[str, Any] = {"input": str(item.path), "relative_path": str(item.rel), "mask": str(paths["mask"])}
        try:
            w, h = header_size(item.path)
            row.update(width=w, height=h, tiles=count_tiles(h, w, settings.tile, resolution, settings.overlap))
            whole = settings.tile == "off" or not rasters.reads_as_raster(item.path)  # rasters: block by block
            too_big = whole and settings.max_pixels and w * h > settings.max_pixels
            verdict = ("failed", "over --max-pixels") if too_big else existing_verdict(paths, settings)
        except images.ImageReadError as exc:
            verdict = ("failed", exc.reason)
        row["action"] = "segment" if verdict is None else f"{verdict[0]}: {verdict[1]}"
        rows.append(row)
    return rows


def _check_device(device: str, compile: bool) -> None:
    """The run's own device checks, without a model: `device` resolves (exit 2 or 4) and, with `--compile`,
    torch.compile can run on it (exit 2)."""
    from digseg_cli.inference.compiling import BACKEND, require_compiler
    from digseg_cli.inference.device import resolve_device

    resolved = resolve_device(device)
    if compile:
        require_compiler(BACKEND, resolved)


@dataclass(frozen=True)
class DryRun:
    """A run's plan: one row per input (`plan_segment`), the processing resolution and why the plan is partial."""

    rows: list[dict[str, Any]]
    resolution: int | None  # None when neither the settings nor a local checkpoint config give one
    note: str | None  # e.g. the weights are not available locally


def dry_run(
    files: Sequence[InputFile],
    out_dir: str | Path,
    settings: SegmentSettings,
    *,
    weights: str,
    cache_dir: Path | None = None,
    device: str = "auto",
    compile: bool = False,
) -> DryRun:
    """Plan a run of `weights` on `files`; the checkpoint config is read only when the settings leave the
    resolution, the classes or (for `--save-confidence`'s spread map) the ensemble to it. The plan refuses what
    the run would refuse before its first image: a `device` that is not here, `--compile` without a compiler."""
    _check_device(device, compile)
    resolution, classes, note = settings.resolution, list(settings.classes), None
    members = settings.ensemble or 1
    if resolution is None or not classes or (settings.save_confidence and settings.ensemble is None):
        config = peek_config(weights, cache_dir)
        if config is None:
            note = (
                f"weights {weights!r} are not available locally: a run would download them (or fail offline); "
                f"see `digseg weights info {weights}`"
            )
        else:
            resolution = config.default_resolution if resolution is None else resolution
            classes = settings.classes_for(config)
            members = config.default_ensemble if settings.ensemble is None else settings.ensemble
    classes = classes or [PromptClass("class", ("class",))]
    files = check_outputs(files, Path(out_dir), classes, settings, members=members)  # the run's own refusal
    rows = plan_segment(files, out_dir, settings, classes, resolution=resolution or 0, members=members)
    return DryRun(rows, resolution, note)
