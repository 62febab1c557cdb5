"""`digseg decoder train` and `digseg encoder train`: distil a checkpoint's VAE mask decoder or image encoder into
a fast one (thin wrappers over `digseg_cli.train.distill_decoder` and `distill_encoder`, one command each,
made by one factory). No `from __future__ import annotations` here: the options' help names the part, so
their annotations are evaluated when each command is made, not later in this module's globals."""

import time
from pathlib import Path
from typing import Annotated

import typer

from digseg_cli.cli.common import err_console, handle_errors
from digseg_cli.errors import EXIT_CODES_HELP
from digseg_cli.train.distill_parts import PARTS  # torch-free: the help is made without loading torch


def _train_command(part: str):
    """The `train` command of `part` ("decoder" or "encoder")."""
    about = PARTS[part]
    loss = about.loss.upper()

    def train_command(
        *,
        weights: Annotated[str, typer.Option("--weights", help="Checkpoint folder or registry name (e.g. demo).")],
        out: Annotated[Path, typer.Option("--out", help=f"Folder for the copy of the checkpoint with fast_{part}/.")],
        steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 800,
        batch_size: Annotated[int, typer.Option(help=f"{about.inputs.capitalize()} per step.")] = 8,
        lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 2e-3,
        width: Annotated[int, typer.Option(help="Channels at latent resolution.")] = about.width,
        blocks: Annotated[int, typer.Option(help="Residual blocks at latent resolution.")] = 2,
        pool: Annotated[int, typer.Option(help=f"Synthetic scenes in the distillation pool ({about.each}).")] = 192,
        resolution: Annotated[int | None, typer.Option(help="Scene size (default: the model's resolution).")] = None,
        val_limit: Annotated[int | None, typer.Option(help="Score only this many synth validation images.")] = None,
        tolerance: Annotated[
            float, typer.Option(help=f"Largest mIoU change (points) for --{part} auto to use it.")
        ] = 0.5,
        seed: Annotated[int, typer.Option(help="Seed for the pool, the sampling and the initialisation.")] = 0,
        overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    ) -> None:
        # The options are `DistillSettings`' fields, one to one; a closure's locals() holds its free variables too.
        options = {k: v for k, v in locals().items() if k not in ("part", "about", "loss")}
        with handle_errors():
            from digseg_cli.train import distill_decoder, distill_encoder
            from digseg_cli.train.distill import DistillSettings

            train = {"decoder": distill_decoder.train_fast_decoder, "encoder": distill_encoder.train_fast_encoder}
            result = train[part](DistillSettings(**options), progress=_Lines(about.inputs, loss))
        ev = result.evaluation
        speedup = ev[f"{about.verb}_speedup"]
        verdict = "passed" if ev["passed"] else f"NOT passed (--{part} auto keeps the VAE {part})"
        err_console.print(
            f"done: {result.params:,}-parameter {part}, {result.steps} steps, {loss} {result.loss:.4f}; "
            f"synth mIoU {ev['miou_vae']:.2f} (vae) → {ev['miou_fast']:.2f} (fast), change "
            f"{ev['miou_change_points']:+.2f} points: {verdict}; {about.verb} {speedup:.0f}× faster; "
            f"wrote {result.out}",
            highlight=False,
        )

    return train_command


class _Lines:
    """A plain progress line every 10 s (and at the end of each phase)."""

    def __init__(self, inputs: str, loss: str) -> None:
        self.last, self.inputs, self.loss = 0.0, inputs, loss

    def __call__(self, event: dict) -> None:
        done, total = event.get("done", event.get("step")), event.get("total", event.get("max_steps"))
        if time.monotonic() - self.last < 10 and done != total:
            return
        self.last = time.monotonic()
        kind = event["event"]
        what = {"pool": f"{self.inputs[:-1]} pool", "step": "train", "eval": "mIoU"}[kind]
        if kind == "eval":
            what += f" ({event['choice']} {event['part']})"
        loss = f", {self.loss} {event['loss']:.4f}" if "loss" in event else ""
        err_console.print(f"{what}: {done}/{total}{loss}", highlight=False)


def register(app: typer.Typer) -> None:
    for part, about in PARTS.items():
        sub = typer.Typer(
            name=part,
            help=f"Fast {about.what}s: distil the VAE {part} into a small network.",
            no_args_is_help=True,
            context_settings={"help_option_names": ["-h", "--help"]},
        )
        sub.command(
            "train",
            epilog=EXIT_CODES_HELP,
            help=f"Train a small {about.what} against the VAE {part}'s own output and check its mIoU on synth.",
        )(_train_command(part))
        app.add_typer(sub, name=part)
