"""`digseg train`: fine-tune DiGSeg on folders of image/mask pairs or benchmarks by name (thin wrapper over
`digseg_cli.train.loop`). The settings are a recipe's (`--recipe`, `digseg_cli.train.recipes`) or a resumed
run's, with the options given on the command line over them; `--print-config` prints them and stops.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from digseg_cli.cli.common import DataRoot, err_console, handle_errors, stderr_is_terminal
from digseg_cli.errors import EXIT_CODES_HELP
from digseg_cli.models.config import OBJECTIVES
from digseg_cli.train.recipes import load_recipe, resolve_settings, shipped_recipes
from digseg_cli.train.settings import LR_SCHEDULES, TrainSettings, check_inputs, parse_duration

# A run takes every option not given from the recipe, else from `TrainSettings`: the defaults declared below
# only show in --help, and are `TrainSettings`' own (`_D`'s, where the line has room).
_D = TrainSettings()
# Parameters that are settings under another name, and those that are not settings.
_SETTING_OF = {"time_budget": "time_limit", "dataset": "datasets"}
_NOT_SETTINGS = ("recipe", "print_config", "resume", "resume_from", "overwrite")


def train_command(
    ctx: typer.Context,
    *,
    recipe: Annotated[
        str | None,
        typer.Option(
            help=f"Start from a recipe: {', '.join(shipped_recipes())} or a YAML file of settings "
            "(options given here override it).",
        ),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved settings as a YAML recipe and exit.")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Training folder: images/, masks/, classes.json or classes.txt (a resumed run reuses its own).",
        ),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset",
            help="Benchmark name or training folder, NAME[:WEIGHT] (repeat it for a mixture sampled by weight).",
        ),
    ] = None,
    data_root: DataRoot = None,
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (config, metrics, last/ and best/ checkpoints).")
    ] = _D.out,
    base: Annotated[
        str, typer.Option(help="SD base (folder or Hub id) or compact config name (tiny, small).")
    ] = _D.base,
    init: Annotated[
        str | None,
        typer.Option(help="Start from these weights (checkpoint folder, registry name) instead of a fresh base."),
    ] = None,
    val: Annotated[Path | None, typer.Option(help="Validation folder (default: a split of --data).")] = None,
    val_split: Annotated[float, typer.Option(help="Fraction of --data held out for validation.")] = _D.val_split,
    val_limit: Annotated[int | None, typer.Option(help="Validate on at most this many images.")] = _D.val_limit,
    class_name: Annotated[str | None, typer.Option(help="Class name for 0/255 binary masks.")] = None,
    objective: Annotated[str, typer.Option(help=f"{' or '.join(OBJECTIVES)}.")] = _D.objective,
    resolution: Annotated[int | None, typer.Option(help="Training resolution (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per process per micro-batch.")] = _D.batch_size,
    effective_batch: Annotated[
        int | None, typer.Option(help="Accumulate gradients up to this many samples per step.")
    ] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = _D.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = _D.weight_decay,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps, then --lr-schedule.")] = _D.warmup_steps,
    lr_schedule: Annotated[
        str, typer.Option(help=f"Learning-rate schedule after the warm-up: {', '.join(LR_SCHEDULES)}.")
    ] = _D.lr_schedule,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Stop after this many epochs.")] = None,
    time_budget: Annotated[str | None, typer.Option("--time", help="Wall-clock budget, e.g. 45m or 2h.")] = None,
    val_every: Annotated[int, typer.Option(help="Validate (mIoU) every N steps.")] = _D.val_every,
    save_every: Annotated[int, typer.Option(help="Write last/ every N steps.")] = _D.save_every,
    log_every: Annotated[int, typer.Option(help="Log loss and learning rate every N steps.")] = _D.log_every,
    ema: Annotated[float, typer.Option(help="EMA decay of the weights (0 = off).")] = _D.ema,
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16 (mixed precision on GPUs).")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for memory (SD-size U-Nets).")] = False,
    prompt_template: Annotated[str, typer.Option(help="Prompt around a class name: 'a photo of a {name}'.")] = "{name}",
    absent_prob: Annotated[float, typer.Option(help="Share of prompts for a class the image lacks.")] = _D.absent_prob,
    vocabulary: Annotated[
        str | None,
        typer.Option(
            help="More words per class, and unrelated words trained as 'nothing here': a YAML file, or synth.",
        ),
    ] = None,
    noise_strength: Annotated[float, typer.Option(help="diffusion: multi-resolution noise strength.")] = 0.0,
    decoded_loss: Annotated[float, typer.Option(help="one-step: weight of a decoded-mask loss (MSE + Dice).")] = 0.0,
    foreground_weight: Annotated[
        float,
        typer.Option(
            help="Weight of the latent pixels the target covers, against 1 for the rest (small classes learn sooner).",
        ),
    ] = _D.foreground_weight,
    vae_steps: Annotated[int, typer.Option(help="Compact bases: autoencoder steps for the VAE first (stage 1).")] = 0,
    vae_lr: Annotated[float, typer.Option(help="Compact bases: learning rate of the VAE stage.")] = _D.vae_lr,
    seed: Annotated[int, typer.Option(help="Seed for the split, data order, augmentation and noise.")] = _D.seed,
    workers: Annotated[
        int | None, typer.Option(help="Data-loading worker processes (default: from the usable cores).")
    ] = None,
    deterministic: Annotated[bool, typer.Option(help="Use deterministic torch algorithms.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last/ checkpoint.")
    ] = False,
    resume_from: Annotated[Path | None, typer.Option(help="Continue from this training checkpoint instead.")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Train on the CPU even if a GPU is present.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start a new run in an --out that already holds one.")] = False,
) -> None:
    """Fine-tune DiGSeg on folders of masks or on benchmarks, from a recipe; resumable, on one machine or many."""
    from digseg_cli.errors import UsageError

    with handle_errors():
        settings = _resolve(ctx, recipe)
        if print_config:
            typer.echo(settings.to_yaml(), nl=False)
            return
        if settings.resume is None and (Path(settings.out) / "last").exists() and not overwrite:
            raise UsageError(
                f"{settings.out} already holds a run: pass --resume to continue it, --overwrite to start over, "
                "or choose another --out"
            )
        if settings.resume is None and settings.data is None and not settings.datasets:
            raise UsageError(
                "--data or --dataset is required (a folder with images/, masks/ and classes.json or classes.txt, "
                "or a benchmark name)"
            )
        from digseg_cli.train.loop import train

        with _Progress() as progress:
            result = train(settings, progress=progress)
        if not result.is_main_process:
            return
        best = f", best validation mIoU {result.best_miou:.3f} in {result.best}" if result.best_miou is not None else ""
        err_console.print(f"done: {result.step} steps ({result.stopped_by}); last checkpoint {result.last}{best}")


def _resolve(ctx: typer.Context, recipe: str | None) -> TrainSettings:
    """The run's settings: the options given on the command line over the recipe's over the defaults. A resumed
    run's stored settings lie under both: it keeps its own settings but for those given here (e.g. a longer
    --max-steps or --time). Checked (`check_inputs`) before `--print-config` or a run uses them."""
    params = ctx.params
    given = {_SETTING_OF.get(k, k): v for k, v in params.items() if k not in _NOT_SETTINGS and _given(ctx, k)}
    if "time_limit" in given:
        given["time_limit"] = parse_duration(given["time_limit"], "--time")
    if "datasets" in given:
        given["datasets"] = list(given["datasets"])
    start = load_recipe(recipe) if recipe is not None else {}
    out = given.get("out", start.get("out"))
    resume_path = params["resume_from"] or ((Path(out or params["out"]) / "last") if params["resume"] else None)
    if resume_path is not None:
        from digseg_cli.train.state import require_resumable

        require_resumable(resume_path)
        start = {**_stored_settings(resume_path), **start}
        # Without --out, a run continued from another checkpoint writes beside it.
        out = out or (resume_path.parent if params["resume_from"] else params["out"])
        given.update(out=out, resume=resume_path)
    settings = resolve_settings(start, given)
    check_inputs(settings)
    return settings


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the parameter `name` was given on the command line or through the environment (not a default)."""
    source = ctx.get_parameter_source(name)
    # Compared by name: Typer may carry its own copy of click, whose enum is not click's.
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _stored_settings(checkpoint: Path) -> dict:
    """The settings a training checkpoint was written with (its `digseg_config.json` training record)."""
    import dataclasses
    import json

    from digseg_cli.errors import CheckpointError

    try:
        stored = json.loads((checkpoint / "digseg_config.json").read_text())["training"]["settings"]
    except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{checkpoint} does not record the settings it was trained with") from None
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    if not isinstance(stored, dict) or set(stored) - known:
        extra = sorted(set(stored) - known) if isinstance(stored, dict) else []
        raise CheckpointError(f"{checkpoint}/digseg_config.json records settings this digseg does not know: {extra}")
    stored.pop("resume", None)
    for key in ("data", "out", "val", "data_root"):
        if stored.get(key) is not None:
            stored[key] = Path(stored[key])
    return stored


class _Progress:
    """Rich progress (step, loss, lr, it/s, ETA) on a terminal; a plain line every 30 s otherwise."""

    def __init__(self) -> None:
        self.rich = stderr_is_terminal()
        self.last_line = 0.0

    def __enter__(self):
        if self.rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=err_console.real,
            )
            self.bar.__enter__()
            self.tasks: dict[str, int] = {}
        return self

    def __exit__(self, *exc):
        if self.rich:
            self.bar.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "note":
            err_console.print(event["text"], style="dim", highlight=False, markup=False, soft_wrap=True)
            return
        if kind == "val":
            each = "".join(f", {k} {v:.4f}" for k, v in (event.get("val_miou_by_dataset") or {}).items())
            err_console.print(f"step {event['step']}: validation mIoU {event['val_miou']:.4f}{each}", highlight=False)
            return
        name = "vae" if kind == "vae_step" else "train"
        info = f"loss {event['loss']:.4g}" + (
            f" lr {event['lr']:.2e} {event['it_per_s']:.2f} it/s" if "lr" in event else ""
        )
        if self.rich:
            if name not in self.tasks:
                self.tasks[name] = self.bar.add_task(
                    "VAE (stage 1)" if name == "vae" else "train", total=event.get("max_steps"), info=""
                )
            self.bar.update(self.tasks[name], completed=event["step"], total=event.get("max_steps"), info=info)
        elif time.monotonic() - self.last_line >= 30 or event["step"] == event.get("max_steps"):
            self.last_line = time.monotonic()
            total = f"/{event['max_steps']}" if event.get("max_steps") else ""
            err_console.print(f"{name} step {event['step']}{total}: {info}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("train", epilog=EXIT_CODES_HELP)(train_command)
