"""``digseg eval``: score a model (or a folder of saved label maps) on a benchmark with its exact protocol.

The command builds an ``EvalSettings`` from its options and calls one library function,
``digseg_cli.evaluate.run.run_eval`` (which resolves and checks the dataset, joins the processes of a
multi-process launch, loads the model, scores and always writes the reports), or with ``--suite``
``digseg_cli.evaluate.suite.run_suite`` (every benchmark of the suite into one table); it renders the layout
report, the numbers or the suite's table as a Rich table on stderr and, with ``--json``, the object on
stdout, and maps errors to exit codes. It knows nothing of layouts, metrics, devices, processes or the model
internals.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from digseg_cli.cli.common import (
    DECODER_HELP,
    ENCODER_HELP,
    Compile,
    DataRoot,
    Decoder,
    Encoder,
    err_console,
    handle_errors,
    stderr_is_terminal,
)
from digseg_cli.errors import EXIT_DATASET, EXIT_PARTIAL

if TYPE_CHECKING:
    from digseg_cli.data.benchmarks.catalog import LayoutReport
    from digseg_cli.evaluate.scoring import EvalResult
    from digseg_cli.evaluate.suite import SuiteResult


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
    if m.get("seconds_per_image") is not None:
        per = f"{m['seconds_per_image']:.3g} s per image with {m['prompts_per_image']} prompts"
        err_console.print(f"{per} (model and label rule; reading and scoring not counted)", highlight=False)
    if result.out_dir is not None:
        err_console.print(f"reports written to {result.out_dir}", highlight=False)


def _render_word_test(test: dict) -> None:
    from rich.table import Table

    from digseg_cli.evaluate.report import fmt

    table = Table(
        title=f"word test ({test['vocabulary']}): {test['images']} images, one prompt each", title_justify="left"
    )
    for col in ("kind", "class", "word", "IoU / marked"):
        table.add_column(col, justify="right" if col.startswith("IoU") else "left")
    for r in test["rows"]:
        value = fmt(r["iou"]) if "iou" in r else f"{100 * r['marked']:.2f} %"
        table.add_row(r["kind"], r["class"] or "", r["word"], value)
    err_console.print(table)
    s = test["summary"]
    err_console.print(
        f"[bold]names {fmt(s['name_iou'])}, held-out words {fmt(s['held_out_iou'])} "
        f"({fmt(s['held_out_ratio'])} of the names), unrelated words mark {100 * (s['unrelated_marked'] or 0):.2f} % "
        "of the pixels[/]",
        highlight=False,
    )


def _render_suite(result: SuiteResult, as_json: bool) -> None:
    """The suite's table on stderr (and its object on stdout with ``--json``); exit 1 if a benchmark failed."""
    from rich.markup import escape
    from rich.table import Table

    from digseg_cli.evaluate.suite import TABLE_HEADER, table_lines

    if not result.main_process:
        return
    table = Table(title=f"suite {result.name} (ours beside DiGSeg's published numbers)", title_justify="left")
    for col in TABLE_HEADER:
        table.add_column(col, justify="right" if col in ("ours", "DiGSeg") else "left")
    lines = table_lines(result.table)
    for line in lines:
        table.add_row(*map(escape, line), style="dim" if line[4] in ("missing", "failed") else None)
    err_console.print(table)
    for key in dict.fromkeys(line[-1] for line in lines):  # what each source named in the table means
        err_console.print(f"{key}: {result.table['sources'][key]}", style="dim", highlight=False, markup=False)
    for row in result.rows:
        if row.status != "scored":
            err_console.print(f"{row.benchmark.dataset} {row.status}: {row.message}", highlight=False, markup=False)
    err_console.print(f"suite.md and suite.json written to {result.out_dir}", highlight=False)
    if as_json:
        typer.echo(json.dumps(result.table, indent=2))
    if result.failed:
        raise typer.Exit(code=EXIT_PARTIAL)


def eval_command(
    *,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Benchmark name (ade20k, ade20k-full, cityscapes, "
            "pascal-context-59, pascal-context-459, coco-stuff, deepglobe, deepglobe-landcover, refuge2, "
            "phenobench, synth) or a folder in the training format.",
        ),
    ] = None,
    suite: Annotated[
        str | None,
        typer.Option(
            "--suite",
            help="Instead of --dataset: every benchmark of a suite that is on this machine, each with its "
            "protocol, in one table (suite.md, suite.json) beside the paper's numbers: open-vocab (A-847, PC-459, "
            "A-150, PC-59) or paper (all nine). --predictions DIR then reads DIR/<dataset>/. Exit 1 if one failed.",
        ),
    ] = None,
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
            "--predictions",
            help="Score saved label maps instead of running a model: a folder of <stem>.png (values = label ids), "
            'or a detectron2 sem_seg_predictions.json (COCO RLE records; needs pip install "digseg[coco]").',
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
        Path | None,
        typer.Option(
            "--out", "-o", help="Report folder (default digseg-out/eval/<dataset>-<split>, or .../suite-<name>)."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the metrics (or suite.json) object as JSON on stdout.")
    ] = False,
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
    compile: Compile = False,
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
    encoder: Annotated[Encoder, typer.Option("--encoder", help=ENCODER_HELP)] = Encoder.auto,
    prompt_template: Annotated[
        str | None,
        typer.Option("--prompt-template", help="Prompt text around each class name, e.g. 'a photo of a {name}'."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Base seed (each image's noise comes from it and the image's name).")
    ] = 0,
    word_test: Annotated[
        str | None,
        typer.Option(
            "--word-test",
            help="Also ask for each class by the vocabulary's held-out words, one prompt at a time, and count "
            "what its unrelated words mark (word_test.json): a vocabulary file, or synth.",
        ),
    ] = None,
) -> None:
    """Evaluate on a benchmark (or a --suite of them, in one table beside the paper's numbers) with its exact
    protocol; always writes metrics.json, CSVs, a confusion matrix and report.md. Exit 7 when the dataset is
    missing or invalid, 2 on a usage error, 1 when a benchmark of a suite failed."""
    with handle_errors():
        from digseg_cli.evaluate.run import EvalSettings, run_eval

        settings = EvalSettings(
            dataset=dataset or "",
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
            compile=compile,
            steps=steps,
            ensemble=ensemble,
            resolution=resolution,
            short_side=short_side,
            tile=tile,
            decoder=decoder.value,
            encoder=encoder.value,
            prompt_template=prompt_template,
            seed=seed,
            word_test=word_test,
        )
        progress = _progress("scoring" if predictions is not None else "evaluating")
        if suite is not None:
            from digseg_cli.evaluate.suite import run_suite

            suite_result = run_suite(settings, suite, progress=progress, note=_note)
        else:
            run = run_eval(settings, progress=progress, note=_note)
    if suite is not None:
        _render_suite(suite_result, as_json)
        return
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
    if run.result.word_test is not None:
        _render_word_test(run.result.word_test)
    if as_json:
        from digseg_cli.evaluate.report import json_safe

        typer.echo(json.dumps(json_safe(run.result.metrics), indent=2))


def register(app: typer.Typer) -> None:
    app.command("eval", help=eval_command.__doc__)(eval_command)
