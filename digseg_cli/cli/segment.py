"""``digseg segment``: segment images, folders, globs and lists with text prompts.

Builds `SegmentSettings` from the flags, opens the model through `digseg_cli.segment.loading.open_pipeline`,
calls `digseg_cli.segment.run.run_segment` once (or `segment.plan.dry_run` for ``--dry-run``) and renders the
banner, progress, per-image records (``--json`` on stdout) and summary (stderr). It knows nothing of devices,
weights folders, file layouts, seeds or output formats.
"""

from __future__ import annotations

import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from digseg_cli.cli import segment_view as view
from digseg_cli.cli.common import DECODER_HELP, ENCODER_HELP, Compile, Decoder, Encoder, err_console, handle_errors
from digseg_cli.errors import EXIT_CODES_HELP, DigsegError, UsageError
from digseg_cli.files import DEFAULT_OUT

if TYPE_CHECKING:
    from digseg_cli.segment.inputs import InputFile
    from digseg_cli.segment.loading import LoadedPipeline
    from digseg_cli.segment.outputs import ImageResult, RunSummary
    from digseg_cli.segment.settings import SegmentSettings
    from digseg_cli.segment.shard import Shard


EPILOG = (
    'Examples:  digseg segment photos/ --recursive --prompt "road, tree|bush, building"  ·  '
    "digseg segment '*.jpg' @more.txt --prompts classes.yaml --save-probs --json > results.jsonl.  "
    "Outputs per image, mirroring the input tree under --out: <name>.mask.png (palette PNG, 0 = background, "
    "k = k-th class), <name>.overlay.jpg, <name>.<class>.png (--save-binary), <name>.<class>.prob.png "
    "(--save-probs; probability = value / 65535), <name>.confidence.png, .margin.png, .spread.png "
    "(--save-confidence), and run.json (and sem_seg_predictions.json with --rle) for the run. GeoTIFF inputs (geo "
    "extra) give GeoTIFFs (.mask.tif, .<class>.tif, .<class>.prob.tif, ...) with their CRS, transform and no-data "
    "mask.  " + EXIT_CODES_HELP
)


class Mode(str, Enum):
    semantic = "semantic"
    multilabel = "multilabel"


class ProbsFormat(str, Enum):
    png16 = "png16"
    npy = "npy"


class VectorFormat(str, Enum):
    geojson = "geojson"
    gpkg = "gpkg"


def segment(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders, quoted globs ('**/*.jpg') and @list.txt files (one path per line).",
            show_default=False,
        ),
    ],
    *,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            "-p",
            help='Classes, comma-separated: "road, tree|bush" (| separates synonyms, scores averaged). Repeatable.',
            show_default=False,
        ),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="JSON/YAML class file: name, prompt, synonyms, color, threshold per class.",
            show_default=False,
        ),
    ] = None,
    weights: Annotated[
        str,
        typer.Option("--weights", "-w", envvar="DIGSEG_WEIGHTS", help="Registry name, checkpoint folder or Hub id."),
    ] = "demo",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder; the input tree is mirrored in it.")
    ] = DEFAULT_OUT,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Search folders recursively.")] = False,
    device: Annotated[
        str,
        typer.Option(
            "--device", envvar="DIGSEG_DEVICE", help="auto|cpu|cuda|cuda:N|mps; an explicit device must exist."
        ),
    ] = "auto",
    precision: Annotated[
        str, typer.Option("--precision", help="auto|fp32|fp16|bf16 (auto: bf16/fp16 on CUDA, fp32 elsewhere).")
    ] = "auto",
    compile: Compile = False,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Denoising steps (default: the checkpoint's).", show_default=False)
    ] = None,
    ensemble: Annotated[
        int | None,
        typer.Option(
            "--ensemble", help="Average N predictions (seeds, or flips for one-step models).", show_default=False
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            "--resolution",
            help="Processing resolution (long side); 0 = native; default: the checkpoint's.",
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--threshold",
            help="Probability threshold: 0.5, or per class road=0.4 (repeatable, comma-separated).",
            show_default="checkpoint's (0.5)",
        ),
    ] = None,
    mode: Annotated[
        Mode,
        typer.Option(
            "--mode",
            help="semantic: one label per pixel; multilabel: each class "
            "thresholded alone (writes per-class binary masks).",
        ),
    ] = Mode.semantic,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Run seed; each image's seed also depends on its file name, never on order or batch."
        ),
    ] = 0,
    tile: Annotated[
        str,
        typer.Option(
            "--tile",
            help="auto|off|N: tiled inference at native scale (auto: when the long side > 1.5× the resolution).",
        ),
    ] = "auto",
    overlap: Annotated[float, typer.Option("--overlap", help="Tile overlap as a fraction of the tile.")] = 0.25,
    decoder: Annotated[Decoder, typer.Option("--decoder", help=DECODER_HELP)] = Decoder.auto,
    encoder: Annotated[Encoder, typer.Option("--encoder", help=ENCODER_HELP)] = Encoder.auto,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Refuse larger images (0 = no limit).")] = 100_000_000,
    save_binary: Annotated[bool, typer.Option("--save-binary", help="Also write <name>.<class>.png (0/255).")] = False,
    save_probs: Annotated[bool, typer.Option("--save-probs", help="Also write per-class probability maps.")] = False,
    probs_format: Annotated[
        ProbsFormat,
        typer.Option("--probs-format", help="png16: 16-bit PNG, probability = value / 65535; npy: float32."),
    ] = ProbsFormat.png16,
    save_confidence: Annotated[
        bool,
        typer.Option(
            "--save-confidence",
            help="Also write <name>.confidence.png (the winning class's probability) and <name>.margin.png (its "
            "lead over the runner-up); with --ensemble N > 1 also <name>.spread.png (its standard deviation "
            "across the members). 16-bit PNG: value / 65535.",
        ),
    ] = False,
    rle: Annotated[
        bool,
        typer.Option(
            "--rle",
            help="Also write sem_seg_predictions.json: every label map as COCO RLE records, detectron2's format "
            '(category_id = label value, 0 = background). Needs pip install "digseg[coco]".',
        ),
    ] = False,
    no_overlay: Annotated[bool, typer.Option("--no-overlay", help="Do not write <name>.overlay.jpg.")] = False,
    bands: Annotated[
        str | None, typer.Option("--bands", help="GeoTIFF bands shown as R,G,B: 3,2,1 (one band: grey); default 1,2,3.")
    ] = None,
    vector: Annotated[
        VectorFormat | None,
        typer.Option("--vector", help="Also write <name>.regions.geojson|gpkg: a polygon per region per class."),
    ] = None,
    min_area: Annotated[
        float | None, typer.Option("--min-area", help="Leave out smaller regions (CRS units² for GeoTIFFs, else px).")
    ] = None,
    simplify: Annotated[
        float | None, typer.Option("--simplify", help="Simplify polygons, shared borders kept (CRS units, else px).")
    ] = None,
    overlay_alpha: Annotated[float, typer.Option("--overlay-alpha", help="Opacity of class colours.")] = 0.5,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Skip images whose outputs all exist (resume an interrupted run).")
    ] = False,
    batch_size: Annotated[
        str,
        typer.Option(
            "--batch-size",
            help="(image or tile, prompt) pairs per U-Net call: N, or auto (on CUDA sized from free memory).",
        ),
    ] = "auto",
    workers: Annotated[int, typer.Option("--workers", min=1, help="I/O threads reading ahead and writing behind.")] = 2,
    prompt_template: Annotated[
        str | None,
        typer.Option(
            "--prompt-template", help="Template with {name}, e.g. 'aerial photo of {name}'.", show_default=False
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="JSON Lines on stdout: one object per image, then a "
            "summary (schema digseg.segment/1); logs stay on stderr.",
        ),
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", envvar="DIGSEG_CACHE_DIR", help="Weights cache folder.", show_default=False),
    ] = None,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline", envvar="DIGSEG_OFFLINE", help="Never touch the network; missing weights exit with code 5."
        ),
    ] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first image that fails.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (files, sizes, tiles, outputs) without loading the model.")
    ] = False,
    deterministic: Annotated[
        bool, typer.Option("--deterministic", help="Use torch's deterministic algorithms (slower on GPUs).")
    ] = False,
) -> None:
    """Segment images with text prompts; one class per comma-separated item of --prompt.

    INPUTS may be `-` (one image on stdin) and --out may be `-` (the label PNG of one image on stdout).
    """
    arguments = {k: v for k, v in locals().items()}
    with handle_errors(), tempfile.TemporaryDirectory(prefix="digseg-") as scratch:
        from digseg_cli.segment.inputs import expand_inputs

        # 1. Unix pipes, then flags → settings (no model, no torch yet): every usage error surfaces here.
        inputs, out, to_stdout = _pipes(inputs, out, Path(scratch), as_json or dry_run)
        settings, warnings = _settings(arguments)
        files = expand_inputs(inputs, recursive=recursive, exclude=out)
        if to_stdout and len(files) != 1:
            raise UsageError(f"`--out -` takes exactly one input image, found {len(files)}")
        view.warn(warnings)
        if dry_run:
            from digseg_cli.segment.plan import dry_run as plan_run

            plan = plan_run(files, out, settings, weights=weights, cache_dir=cache_dir, device=device, compile=compile)
            view.show_plan(plan, out, weights, as_json)
            return
        # 2. The output folder takes files (exit code 2), then device, precision and weights (4 and 5).
        from digseg_cli.segment.loading import open_pipeline
        from digseg_cli.segment.outputs import prepare_out_dir
        from digseg_cli.segment.settings import prompt_warnings
        from digseg_cli.segment.shard import join_shard

        prepare_out_dir(out)
        shard = join_shard(device)  # under `accelerate launch`/`torchrun`: this process's share of the inputs
        loaded = open_pipeline(
            weights,
            device=device if shard is None else shard.device_for(device),
            precision=precision,
            cache_dir=cache_dir,
            offline=offline,
            deterministic=deterministic,
            compile=compile,
        )
        if shard is None or shard.main:
            view.show_banner(loaded, len(files), out, weights)
            view.warn(prompt_warnings(loaded.pipe, settings))
        # 3. Run, streaming records; the mask to stdout for `-o -`.
        arguments.update(out="-" if to_stdout else str(out))
        run = {"weights": weights, "arguments": arguments, "as_json": as_json, "shard": shard}
        summary = _run(files, out, loaded, settings, **run)
        if to_stdout and summary.processed == 1:
            from digseg_cli.inference.prompts import MASK_SUFFIX, MASK_TIF_SUFFIX

            masks = [out / f"{files[0].key}{suffix}" for suffix in (MASK_SUFFIX, MASK_TIF_SUFFIX)]
            sys.stdout.buffer.write(next(m for m in masks if m.exists()).read_bytes())  # a GeoTIFF's is a GeoTIFF
            sys.stdout.flush()
    raise typer.Exit(summary.exit_code)


def _pipes(inputs: list[str], out: Path, scratch: Path, machine_output: bool) -> tuple[list[str], Path, bool]:
    """`-` in → a scratch file holding stdin; `-o -` → a scratch folder (its mask goes to stdout later)."""
    to_stdout = str(out) == "-"
    if "-" in inputs:
        if len(inputs) > 1:
            raise UsageError("`-` (read one image from stdin) cannot be combined with other inputs")
        (scratch / "stdin").write_bytes(sys.stdin.buffer.read())
        inputs = [str(scratch / "stdin")]
    if to_stdout:
        if machine_output:
            raise UsageError("`--out -` writes the label PNG to stdout: it cannot go with --json or --dry-run")
        out = scratch / "out"
    return inputs, out, to_stdout


def _settings(flags: dict[str, Any]) -> tuple[SegmentSettings, list[str]]:
    """The command's flags (its arguments by name) → settings, and the warnings parsing the prompts gave."""
    from digseg_cli.inference.prompts import load_classes, parse_thresholds
    from digseg_cli.segment.rasters import parse_bands
    from digseg_cli.segment.settings import SegmentSettings, parse_batch_size, parse_tile

    classes, warnings = load_classes(flags["prompt"] or [], flags["prompts_file"])
    default_threshold, per_class = parse_thresholds(flags["threshold"])
    same = (  # flags that are settings of the same name
        "steps ensemble resolution seed overlap max_pixels prompt_template recursive overlay_alpha "
        "save_binary save_probs save_confidence rle overwrite skip_existing fail_fast workers min_area simplify"
    ).split()
    return SegmentSettings(
        classes=tuple(classes),
        thresholds=per_class,
        threshold=default_threshold,
        batch_size=parse_batch_size(flags["batch_size"]),
        mode=flags["mode"].value,
        tile=parse_tile(flags["tile"]),
        **{part: flags[part].value for part in ("decoder", "encoder")},
        overlay=not flags["no_overlay"],
        probs_format=flags["probs_format"].value,
        bands=parse_bands(flags["bands"]),
        vector=flags["vector"].value if flags["vector"] is not None else None,
        **{name: flags[name] for name in same},
    ), warnings


def _run(
    files: list[InputFile],
    out: Path,
    loaded: LoadedPipeline,
    settings: SegmentSettings,
    *,
    weights: str,
    arguments: dict[str, Any],
    as_json: bool,
    shard: Shard | None = None,
) -> RunSummary:
    """`run_segment` with a progress bar, a line per failure or warning, the records on stdout (`--json`) and
    the summary; also when the run ends early (interrupted, out of memory), before its error is raised."""
    from digseg_cli.segment.run import run_segment

    def on_result(result: ImageResult) -> None:
        if as_json:
            view.echo_json(result.to_json())
        if result.status == "failed":
            err_console.print(
                f"[red]failed:[/] {result.relative_path}: {result.reason}", highlight=False, soft_wrap=True
            )
        view.warn(result.warnings)

    summary = None
    try:
        with view.Reporter(len(files), enabled=shard is None or shard.main) as reporter:
            summary = run_segment(
                files,
                out,
                loaded.pipe,
                settings,
                progress=reporter,
                on_result=on_result,
                weights=weights,
                weights_folder=loaded.weights_folder,
                arguments=arguments,
                shard=shard,
            )
    except DigsegError as exc:  # interrupted / out of memory: show what was done, then exit
        summary = getattr(exc, "summary", None)
        raise
    finally:
        if summary is not None and summary.reports:  # many processes: the first shows the merged run
            if as_json:
                view.echo_json(summary.to_json())
            view.print_summary(summary)
        if summary is not None and shard is not None:  # every rank got this far: they leave together
            shard.leave()
    return summary


def register(app: typer.Typer) -> None:
    app.command("segment", epilog=EPILOG, no_args_is_help=True)(segment)
