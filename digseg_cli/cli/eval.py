"""``digseg eval``: score a model (or a folder of saved label maps) on a benchmark with its exact protocol.

The command resolves the dataset (``digseg_cli.data.benchmarks.catalog``), optionally downloads or checks it, then calls
one library function (``evaluate`` with a pipeline predictor, or ``score_predictions``) which always writes
the reports; it renders the same numbers as a Rich table on stderr and, with ``--json``, the metrics
object on stdout. It knows nothing of layouts, metrics or the model internals.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from digseg_cli.cli.common import DECODER_HELP, Decoder, err_console, handle_errors, stderr_is_terminal
from digseg_cli.errors import EXIT_DATASET, UsageError
from digseg_cli.models.config import check_prompt_template

TILES = ("auto", "off")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def _progress(description: str):
    """A ``progress(done, total, stem)`` callback printing a line every ~5 s (or 10 % on a terminal)."""
    state = {"t": time.monotonic()}

    def update(done: int, total: int, stem: str) -> None:
        now = time.monotonic()
        if done == total or now - state["t"] >= (2.0 if stderr_is_terminal() else 5.0):
            err_console.print(f"{description}: {done}/{total if total >= 0 else '?'} ({stem})", highlight=False)
            state["t"] = now

    return update


def _maybe_init_distributed() -> str | None:
    """Under ``torchrun``/``accelerate launch`` (WORLD_SIZE > 1): join the process group; return this
    rank's device (``cuda:LOCAL_RANK`` when CUDA is there)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else None


def _render_check(report) -> None:
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


def _render_result(result) -> None:
    from rich.table import Table

    from digseg_cli.evaluate.report import fmt

    m = result.metrics
    table = Table(title=f"{m['dataset']} ({m['split']}): {m['num_images']} images, absent rule {m['absent_rule']}",
                  title_justify="left")
    for col in ("id", "class", "IoU", "Dice", "precision", "recall", "GT pixels"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c in m["per_class"]:
        style = None if c["counted"] else "dim"
        table.add_row(str(c["id"]), c["name"], fmt(c["iou"]), fmt(c["dice"]), fmt(c["precision"]), fmt(c["recall"]),
                      str(c["gt_pixels"]), style=style)
    err_console.print(table)
    summary = "  ".join(f"{k} {fmt(v)}" for k, v in m["metrics"].items())
    err_console.print(summary, highlight=False, soft_wrap=True)
    err_console.print(f"[bold]{m['headline']['name']}: {fmt(m['headline']['value'])}[/]", highlight=False)
    if result.out_dir is not None:
        err_console.print(f"reports written to {result.out_dir}", highlight=False)


def eval_command(
    *,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Benchmark name (ade20k, ade20k-full, cityscapes, "
                       "pascal-context-59, pascal-context-459, coco-stuff, deepglobe, deepglobe-landcover, refuge2, "
                       "phenobench, synth) or a folder in the training format.")],
    split: Annotated[Optional[str], typer.Option(help="Split to score (default: the protocol's split).")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Folder holding the datasets "
                         "(default: $DIGSEG_DATA_ROOT, else the user data folder).")] = None,
    download: Annotated[bool, typer.Option("--download", help="Fetch the dataset first where its licence allows "
                        "it; otherwise print the manual steps.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Only check the layout (no model); exit 7 if "
                     "unusable.")] = False,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", help="Score saved label maps "
                           "(<stem>.png, values = label ids) instead of running a model.")] = None,
    weights: Annotated[str, typer.Option("--weights", "-w", help="Checkpoint folder, registry name or "
                       "Hub id.")] = "demo",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N images (smoke test).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder (default "
                   "digseg-out/eval/<dataset>-<split>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics object as JSON on stdout.")] = False,
    absent_rule: Annotated[Optional[str], typer.Option("--absent-rule", help="Classes in the mean IoU: detectron2 "
                           "(present in GT) or mmseg (union > 0). Default: the benchmark's.")] = None,
    class_name: Annotated[Optional[str], typer.Option("--class-name", help="Folder datasets: masks are 0/255 of "
                          "this one class.")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Probability threshold for "
                         "background/binary benchmarks (default: the benchmark's, 0.5).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32, fp16 or bf16.")] = "auto",
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps (default: the model's).")] = None,
    ensemble: Annotated[Optional[int], typer.Option("--ensemble", help="Predictions averaged per image.")] = None,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Processing resolution of the "
                          "model.")] = None,
    short_side: Annotated[Optional[int], typer.Option("--short-side", help="Resize test images to this short side "
                          "first (default: the protocol's, e.g. 640 for ADE; 0 = off).")] = None,
    tile: Annotated[str, typer.Option("--tile", help="Sliding-window tiling: auto or off.")] = "auto",
    decoder: Annotated[Decoder, typer.Option("--decoder", help=DECODER_HELP)] = Decoder.auto,
    prompt_template: Annotated[Optional[str], typer.Option("--prompt-template", help="Prompt text around each "
                               "class name, e.g. 'a photo of a {name}'.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Base seed (each image adds its own content hash).")] = 0,
) -> None:
    """Evaluate on a benchmark with its exact protocol; always writes metrics.json, CSVs, a confusion matrix
    and report.md. Exit 7 when the dataset is missing or invalid, 2 on a usage error."""
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun/accelerate launch, rank 0 reports
    with handle_errors():
        if absent_rule is not None and absent_rule not in ("detectron2", "mmseg"):
            raise UsageError(f"`--absent-rule` must be detectron2 or mmseg; got {absent_rule!r}")
        if tile not in TILES:
            raise UsageError(f"`--tile` must be one of {', '.join(TILES)}; got {tile!r}")
        if precision not in PRECISIONS:
            raise UsageError(f"`--precision` must be one of {', '.join(PRECISIONS)}; got {precision!r}")
        if prompt_template is not None:
            check_prompt_template(prompt_template, "`--prompt-template`")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UsageError(f"`--threshold` must be in [0, 1]; got {threshold}")
        if predictions is not None and check:
            raise UsageError("`--check` and `--predictions` cannot be combined")

        from digseg_cli.data.benchmarks import catalog as D

        spec = D.get_spec(dataset, class_name=class_name)
        if download:
            D.download_dataset(spec, data_root=data_root)
        if check:
            report = D.check_layout(spec, split=split, data_root=data_root)
            if as_json:
                typer.echo(json.dumps(report.to_json(), indent=2))
            _render_check(report)
            if not report.ok:
                raise typer.Exit(code=EXIT_DATASET)
            return

        data = D.open_dataset(spec, split=split, data_root=data_root)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec.name).name or spec.name).strip("_")
        out_dir = out or Path("digseg-out") / "eval" / f"{slug}-{data.split}"
        from digseg_cli.evaluate.scoring import evaluate, pipeline_predictor, protocol_kwargs, score_predictions

        kwargs = protocol_kwargs(spec)
        kwargs["absent_rule"] = absent_rule or spec.absent_rule
        if threshold is not None:
            kwargs["threshold"] = threshold
        side = spec.short_side if short_side is None else short_side
        settings = {"data_root": str(data.root), "limit": limit, "absent_rule_source": "option" if absent_rule else
                    "benchmark default"}
        if predictions is not None:
            settings["predictions"] = str(predictions)
            result = score_predictions(data, predictions, out_dir=out_dir, split=data.split, settings=settings,
                                       limit=limit, progress=_progress("scoring"),
                                       decode_prediction=spec.decode_prediction, **kwargs)
        else:
            rank_device = _maybe_init_distributed()
            from digseg_cli.inference.pipeline import load_pipeline

            dtype = None if precision == "auto" else precision
            pipe = load_pipeline(weights, device=rank_device or device, dtype=dtype)
            from digseg_cli.inference.device import leave_process_group, precision_note

            if (note := precision_note(pipe.dtype, pipe.device)) is not None and main_process:
                err_console.print(note, style="dim", highlight=False, markup=False, soft_wrap=True)
            decoder_used = pipe.resolve_decoder(decoder.value)
            settings.update(weights=weights, device=str(pipe.device), precision=str(pipe.dtype).removeprefix("torch."),
                            steps=steps, ensemble=ensemble, resolution=resolution, short_side=side or None,
                            max_side=spec.max_side if side else None, tile=tile,
                            decoder=decoder_used,
                            prompt_template=prompt_template or pipe.config.prompt_template, seed=seed,
                            prompts=[p if len(p) > 1 else p[0] for p in spec.prompts][:50],
                            precision_fallbacks=pipe.notes)  # the pipeline's own list: filled if fp16 overflows
            predictor = pipeline_predictor(pipe, steps=steps, ensemble=ensemble, seed=seed, resolution=resolution,
                                           tile=tile, prompt_template=prompt_template, short_side=side or None,
                                           max_side=spec.max_side, decoder=decoder_used)
            result = evaluate(data, spec.class_names or (), predictor, out_dir=out_dir, split=data.split,
                              settings=settings, limit=limit, progress=_progress("evaluating"), **kwargs)
            leave_process_group()

    if not main_process:  # every process holds the summed metrics; one prints them
        return
    _render_result(result)
    if as_json:
        from digseg_cli.evaluate.report import json_safe

        typer.echo(json.dumps(json_safe(result.metrics), indent=2))


def register(app: typer.Typer) -> None:
    app.command("eval", help=eval_command.__doc__)(eval_command)
