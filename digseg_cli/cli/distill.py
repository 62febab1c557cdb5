"""`digseg decoder train`: distil a checkpoint's VAE mask decoder into a fast one (thin wrapper over
`digseg_cli.train.distill_decoder`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from digseg_cli.cli.common import err_console, handle_errors
from digseg_cli.errors import EXIT_CODES_HELP

decoder_app = typer.Typer(
    name="decoder",
    help="Fast mask decoders: distil the VAE decoder into a small network.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@decoder_app.command("train", epilog=EXIT_CODES_HELP)
def train_command(
    *,
    weights: Annotated[str, typer.Option("--weights", help="Checkpoint folder or registry name (e.g. demo).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the copy of the checkpoint with fast_decoder/.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 800,
    batch_size: Annotated[int, typer.Option(help="Latents per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 2e-3,
    width: Annotated[int, typer.Option(help="Channels at latent resolution.")] = 32,
    blocks: Annotated[int, typer.Option(help="Residual blocks at latent resolution.")] = 2,
    pool: Annotated[int, typer.Option(help="Synthetic scenes in the distillation pool (3 latents each).")] = 192,
    resolution: Annotated[int | None, typer.Option(help="Scene size (default: the model's resolution).")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Score only this many synth validation images.")] = None,
    tolerance: Annotated[float, typer.Option(help="Largest mIoU change (points) for decoder=auto to use it.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed for the pool, the sampling and the initialisation.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Train a small mask decoder against the VAE decoder's own output and check its mIoU on synth."""
    with handle_errors():
        from digseg_cli.train.distill_decoder import DecoderTrainSettings, train_fast_decoder

        settings = DecoderTrainSettings(
            weights=weights,
            out=out,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            width=width,
            blocks=blocks,
            pool=pool,
            resolution=resolution,
            val_limit=val_limit,
            tolerance=tolerance,
            seed=seed,
            overwrite=overwrite,
        )
        result = train_fast_decoder(settings, progress=_Lines())
    ev = result.evaluation
    verdict = "passed" if ev["passed"] else "NOT passed (decoder=auto keeps the VAE decoder)"
    err_console.print(
        f"done: {result.params:,}-parameter decoder, {result.steps} steps, BCE {result.loss:.4f}; "
        f"synth mIoU {ev['miou_vae']:.2f} (vae) → {ev['miou_fast']:.2f} (fast), change {ev['miou_change_points']:+.2f} "
        f"points: {verdict}; decode {ev['decode_speedup']:.0f}× faster; wrote {result.out}",
        highlight=False,
    )


class _Lines:
    """A plain progress line every 10 s (and at the end of each phase)."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, event: dict) -> None:
        done, total = event.get("done", event.get("step")), event.get("total", event.get("max_steps"))
        if time.monotonic() - self.last < 10 and done != total:
            return
        self.last = time.monotonic()
        kind = event["event"]
        what = {"pool": "latent pool", "step": "train", "eval": f"mIoU ({event.get('decoder')} decoder)"}[kind]
        loss = f", BCE {event['loss']:.4f}" if "loss" in event else ""
        err_console.print(f"{what}: {done}/{total}{loss}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(decoder_app, name="decoder")
