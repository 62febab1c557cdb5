"""``digseg eval``: score a model (or a folder of saved label maps) on a benchmark with its exact protocol.

The command builds an ``EvalSettings`` from its options and calls one library function,
``digseg_cli.evaluate.run.run_eval`` (which resolves and checks the dataset, joins the processes of a
multi-process launch, loads the model, scores and always writes the reports); it renders the layout
report or the same numbers as a Rich table on stderr and, with ``--json``, the object on stdout, and maps
errors to exit codes. It knows nothing of layouts, metrics, devices, processes or the model internals.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from digseg_cli.cli.common import DECODER_HELP, DataRoot, Decoder, err_console, handle_errors, stderr_is_terminal
from digseg_cli.errors import EXIT_DATASET

if TYPE_CHECKING:
    from digseg_cli.data.benchmarks.catalog import LayoutReport
    from digseg_cli.evaluate.scoring import EvalResult


def _progress(description: str):
    """A ``progress(done, total, stem)`` callback printing a line every ~5 s (or 10 % on a terminal)."""
    state = {"t": time.monotonic()}

    def update(done: int, total: int, stem: str) -> None:
        now = time.monotonic()
        if done == total or now - state["t"] >= (2.0 if stderr_is_terminal() else 5.0):
            err_console.print(f"{description}: {done}/{total if total >= 0 else '?'} ({stem})", highlight=False)
            state["t"] = now

    return update


def _note(text: str) -> None:
    err_console.print(text, style="dim", highlight=False, markup=False, soft_wrap=True)


def _render_check(report: LayoutReport) -> None:
    from rich.table import Table

    table = Table(title=f"{report.dataset} ({report.split}) at {report.root}", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_row("images", str(report.images))
    table.add_row("labels", str(report.labels))
    for line in report.missing:
        table.add_row("[red]missing[/]", line)
    for line in report.problems:
        table.add_row("[red]problem[/]", line)
    table.add_row("status", "[green]ok[/]" if report.ok else "[red]not usable[/]")
    err_console.print(table)
    if not report.ok and report.hint:
        err_console.print(report.hint, highlight=False, soft_wrap=True)


def _render_result(result: EvalResult) -> None:
    from rich.table import Table

    from digseg_cli.evaluate.report import fmt

    m = result.metrics
    table = Table(
        title=f"{m['dataset']} ({m['split']}): {m['num_images']} images, absent rule {m['absent_rule']}",
        title_justify="left",
    )
    for col in ("id", "class", "IoU", "Dice", "precision", "recall", "GT pixels"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in m["per_class"]:
        style = None if c["counted"] else "dim"
        table.add_row(
            str(c["id"]),
            c["name"],
            fmt(c["iou"]),
            fmt(c["dice"]),
            fmt(c["precision"]),
            fmt(c["recall"]),
            str(c["gt_pixels"]),
            style=style,
        )
    err_console.print(table)
    summary = "  ".join(f"{k} {fmt(v)}" for k, v in m["metrics"].items())
    err_console.print(summary, highlight=False, soft_wrap=True)
    err_console.print(f"[bold]{m['headline']['name']}: {fmt(m['headline']['value'])}[/]", highlight=False)
    if result.out_dir is not None:
        err_console.print(f"reports written to {result.out_dir}", highlight=False)


def eval_command(
    *,
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            "-d",
            help="Benchmark name (ade20k, ade20k-full, cityscapes, "
            "pascal-context-59, pascal-context-459, coco-stuff, deepglobe, deepglobe-landcover, refuge2, "
            "phenobench, synth) or a folder in the training format.",
        ),
    ],
    split: Annotated[str | None, typer.Option(help="Split to score (default: the protocol's split).")] = None,
    data_root: DataRoot = None,
    download: Annotated[
        bool,
        typer.Option(
            "--download", help="Fetch the dataset first where its licence allows it; otherwise print the manual steps."
        ),
    ] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Only check the layout (no model); exit 7 if unusable.")
    ] = False,
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions", help="Score saved label maps (<stem>.png, values = label ids) instead of running a model."
        ),
    ] = None,
    resize_predictions: Annotated[
        bool,
        typer.Option(
            "--resize-predictions",
            help="Resize --predictions of another size than their label (nearest neighbour) instead of exit 2.",
        ),
    ] = False,
    weights: Annotated[
        str, typer.Option("--weights", "-w", help="Checkpoint folder, registry name or Hub id.")
    ] = "demo",
    limit: Annotated[int | None, typer.Option("--limit", help="Score only the first N images (smoke test).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Report folder (default digseg-out/eval/<dataset>-<split>).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics object as JSON on stdout.")] = False,
    absent_rule: Annotated[
        str | None,
        typer.Option(
            "--absent-rule",
            help="Classes in the mean IoU: detectron2 (present in GT) or mmseg (union > 0). Default: the benchmark's.",
        ),
    ] = None,
    class_name: Annotated[
        str | None, typer.Option("--class-name", help="Folder datasets: masks are 0/255 of this one class.")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Probability threshold for background/binary benchmarks (default: the benchmark's, 0.5).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32, fp16 or bf16.")] = "auto",
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps (default: the model's).")] = None,
    ensemble: Annotated[int | None, typer.Option("--ensemble", help="Predictions averaged per image.")] = None,
    resolution: Annotated[int | None, typer.Option("--resolution", help="Processing resolution of the model.")] = None,
    short_side: Annotated[
        int | None,
        typer.Option(
            "--short-side",
            help="Resize test images to this short side first (default: the protocol's, e.g. 640 for ADE; 0 = off).",
        ),
    ] = None,
    tile: Annotated[str, typer.Option("--tile", help="Sliding-window tiling: auto or off.")] = "auto",
    decoder: Annotated[Decoder, typer.Option("--decoder", help=DECODER_HELP)] = Decoder.auto,
    prompt_template: Annotated[
        str | None,
        typer.Option("--prompt-template", help="Prompt text around each class name, e.g. 'a photo of a {name}'."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Base seed (each image's noise comes from it and the image's name).")
    ] = 0,
) -> None:
    """Evaluate on a benchmark with its exact protocol; always writes metrics.json, CSVs, a confusion matrix
    and report.md. Exit 7 when the dataset is missing or invalid, 2 on a usage error."""
    with handle_errors():
        from digseg_cli.evaluate.run import EvalSettings, run_eval

        settings = EvalSettings(
            dataset=dataset,
            split=split,
            data_root=data_root,
            download=download,
            check=check,
            predictions=predictions,
            resize_predictions=resize_predictions,
            weights=weights,
            limit=limit,
            out=out,
            absent_rule=absent_rule,
            class_name=class_name,
            threshold=threshold,
            device=device,
            precision=precision,
            steps=steps,
            ensemble=ensemble,
            resolution=resolution,
            short_side=short_side,
            tile=tile,
            decoder=decoder.value,
            prompt_template=prompt_template,
            seed=seed,
        )
        run = run_eval(settings, progress=_progress("scoring" if predictions is not None else "evaluating"), note=_note)
    if run.check is not None:
        if as_json:
            typer.echo(json.dumps(run.check.to_json(), indent=2))
        _render_check(run.check)
        if not run.check.ok:
            raise typer.Exit(code=EXIT_DATASET)
        return
    if not run.main_process:  # every process holds the summed metrics; one prints them
        return
    _render_result(run.result)
    if as_json:
        from digseg_cli.evaluate.report import json_safe

        typer.echo(json.dumps(json_safe(run.result.metrics), indent=2))


def register(app: typer.Typer) -> None:
    app.command("eval", help=eval_command.__doc__)(eval_command)
