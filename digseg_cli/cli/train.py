"""`digseg train`: fine-tune DiGSeg on a folder of image/mask pairs (thin wrapper over `digseg_cli.train.loop`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from digseg_cli.cli.common import err_console, handle_errors, stderr_is_terminal
from digseg_cli.errors import EXIT_CODES_HELP
from digseg_cli.models.config import OBJECTIVES


def _parse_duration(text: str | None) -> float | None:
    """`90`, `90s`, `45m`, `2h` → seconds."""
    if text is None:
        return None
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise typer.BadParameter(f"{text!r} is not a duration (examples: 900, 45m, 2h)") from None


def train_command(
    ctx: typer.Context,
    *,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Training folder: images/, masks/, classes.json or classes.txt (a resumed run reuses its own).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Run folder (config, metrics, last/ and best/ checkpoints).")
    ] = Path("digseg-train"),
    base: Annotated[
        str, typer.Option(help="SD base (folder or Hub id) or compact config name (tiny, small).")
    ] = "stabilityai/stable-diffusion-2",
    init: Annotated[
        str | None,
        typer.Option(help="Start from these weights (checkpoint folder, registry name) instead of a fresh base."),
    ] = None,
    val: Annotated[Path | None, typer.Option(help="Validation folder (default: a split of --data).")] = None,
    val_split: Annotated[float, typer.Option(help="Fraction of --data held out for validation.")] = 0.1,
    class_name: Annotated[str | None, typer.Option(help="Class name for 0/255 binary masks.")] = None,
    objective: Annotated[str, typer.Option(help=f"{' or '.join(OBJECTIVES)}.")] = OBJECTIVES[0],
    resolution: Annotated[int | None, typer.Option(help="Training resolution (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per process per micro-batch.")] = 4,
    effective_batch: Annotated[
        int | None, typer.Option(help="Accumulate gradients up to this many samples per step.")
    ] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 3e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps, then cosine decay.")] = 100,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Stop after this many epochs.")] = None,
    time_budget: Annotated[str | None, typer.Option("--time", help="Wall-clock budget, e.g. 45m or 2h.")] = None,
    val_every: Annotated[int, typer.Option(help="Validate (mIoU) every N steps.")] = 500,
    save_every: Annotated[int, typer.Option(help="Write last/ every N steps.")] = 500,
    ema: Annotated[float, typer.Option(help="EMA decay of the weights (0 = off).")] = 0.0,
    precision: Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16 (mixed precision on GPUs).")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for memory (SD-size U-Nets).")] = False,
    decoded_loss: Annotated[
        float, typer.Option(help="one-step: weight of a loss on the decoded mask (MSE + Dice).")
    ] = 0.0,
    foreground_weight: Annotated[
        float,
        typer.Option(
            help="Weight of the latent pixels the target covers, against 1 for the rest (small classes learn sooner).",
        ),
    ] = 1.0,
    vae_steps: Annotated[int, typer.Option(help="Compact bases: autoencoder steps for the VAE first (stage 1).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for the split, data order, augmentation and noise.")] = 0,
    deterministic: Annotated[bool, typer.Option(help="Use deterministic torch algorithms.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last/ checkpoint.")
    ] = False,
    resume_from: Annotated[Path | None, typer.Option(help="Continue from this training checkpoint instead.")] = None,
    cpu: Annotated[bool, typer.Option("--cpu", help="Train on the CPU even if a GPU is present.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start a new run in an --out that already holds one.")] = False,
) -> None:
    """Fine-tune a DiGSeg model on a folder of masks; resumable, on one machine or many (accelerate launch)."""
    from digseg_cli.errors import UsageError

    with handle_errors():
        resume_path = resume_from or ((out / "last") if resume else None)
        if resume_path is not None:
            from digseg_cli.train.state import require_resumable

            require_resumable(resume_path)
        if resume_path is None and (out / "last").exists() and not overwrite:
            raise UsageError(
                f"{out} already holds a run: pass --resume to continue it, --overwrite to start over, "
                "or choose another --out"
            )
        from digseg_cli.train.loop import TrainSettings, train

        fields = dict(
            data=data,
            out=out,
            base=base,
            init=init,
            val=val,
            val_split=val_split,
            class_name=class_name,
            objective=objective,
            resolution=resolution,
            batch_size=batch_size,
            effective_batch=effective_batch,
            lr=lr,
            warmup_steps=warmup_steps,
            max_steps=max_steps,
            epochs=epochs,
            time_limit=_parse_duration(time_budget),
            val_every=val_every,
            save_every=save_every,
            ema=ema,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
            decoded_loss=decoded_loss,
            foreground_weight=foreground_weight,
            vae_steps=vae_steps,
            seed=seed,
            deterministic=deterministic,
            cpu=cpu,
        )
        if resume_path is not None:
            # A resumed run keeps its own settings; only options given on this command line change them
            # (e.g. a longer --max-steps or --time).
            fields = {**_stored_settings(resume_path), **{k: v for k, v in fields.items() if _given(ctx, k)}}
            fields["out"] = out if _given(ctx, "out") or resume_from is None else resume_path.parent
        elif data is None:
            raise UsageError("--data is required (a folder with images/, masks/ and classes.json or classes.txt)")
        settings = TrainSettings(**{**fields, "resume": resume_path})
        with _Progress() as progress:
            result = train(settings, progress=progress)
        if not result.is_main_process:
            return
        best = f", best validation mIoU {result.best_miou:.3f} in {result.best}" if result.best_miou is not None else ""
        err_console.print(f"done: {result.step} steps ({result.stopped_by}); last checkpoint {result.last}{best}")


def _given(ctx: typer.Context, field: str) -> bool:
    """Whether a setting was given on the command line or through the environment (not a default)."""
    name = {"time_limit": "time_budget"}.get(field, field)
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
    from digseg_cli.train.settings import TrainSettings

    known = {f.name for f in dataclasses.fields(TrainSettings)}
    if not isinstance(stored, dict) or set(stored) - known:
        extra = sorted(set(stored) - known) if isinstance(stored, dict) else []
        raise CheckpointError(f"{checkpoint}/digseg_config.json records settings this digseg does not know: {extra}")
    stored.pop("resume", None)
    for key in ("data", "out", "val"):
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
