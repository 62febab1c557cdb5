"""``digseg eval --suite NAME``: the paper's table in one command.

One job: hold the suites as one declarative table (``SUITES``: suite → benchmarks; each benchmark: its catalog
dataset and the published DiGSeg numbers it is compared with, each with its metric key and where the number
comes from), run ``evaluate.run.score_dataset`` for every benchmark whose data is on this machine (one model,
``SharedModel``, loaded and compiled once for all of them), each into
``<out>/<dataset>/`` with its usual reports (and, with ``--predictions DIR``, from ``DIR/<dataset>/``), and
write ``<out>/suite.md`` and ``<out>/suite.json``: our number beside the paper's, the benchmarks that are
missing with the catalog's own text on how to get them, and the ones that failed.

Failures: a benchmark whose own data or predictions are wrong (a ``DatasetError`` or ``UsageError`` while it
is scored: a missing prediction, one of the wrong size, an unreadable label) is recorded as failed, with its
one-line error, and the other benchmarks still run; ``SuiteResult.failed`` then tells the command to exit 1.
An error that would stop every benchmark alike (weights, device, memory, an output folder that takes no
files, Ctrl-C) stops the suite with its own error. A suite of which no benchmark is present is a
``DatasetError`` (exit 7) naming how to get each.

It renders nothing and maps no exit codes (``digseg_cli.cli.eval`` does both); it knows no layout (the
catalog does) and no metric (``evaluate.scoring`` does).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digseg_cli.errors import DatasetError, UsageError, as_user_error
from digseg_cli.evaluate.report import json_safe
from digseg_cli.evaluate.run import EVAL_OUT, EvalSettings, Note, SharedModel, score_dataset
from digseg_cli.evaluate.scoring import EvalResult, Progress
from digseg_cli.files import atomic_write_json, atomic_write_text, require_writable_folder

if TYPE_CHECKING:
    from digseg_cli.data.benchmarks.base import BenchmarkDataset


# ------------------------------------------------------------------------------------------- the table
# Where each published number comes from (the table names the key; suite.md and suite.json give the text).
# DiGSeg (arXiv 2604.24575) published no code and its PDF was not read here: every number is as quoted, and
# shared/reference/datasets.md notes that the paper's per-dataset settings (splits, resolution, REFUGE variant,
# DeepGlobe split, zero-shot or not) are not confirmed.
SOURCES = {
    "aggregator": "third-party aggregator https://www.wizwand.com/paper/69f03f8155a3c32af89fa5f0, marked unverified "
    "in shared/reference/datasets.md (also quoted in issue 18)",
    "claimed": "DiGSeg's claimed open-vocabulary row, shared/reference/tools-2026.md and issue 18; not checked "
    "against the paper",
    "issue 18": "quoted in issue 18 only; in no shared/reference source, unverified",
    "none": "no DiGSeg number found, neither in shared/reference nor in issue 18",
}


@dataclass(frozen=True)
class Published:
    """One line of the table: our ``metric`` (a key of ``metrics.json``'s ``metrics``) beside DiGSeg's number.

    ``paper``: as published, in percent (None where none is); ``source``: a key of ``SOURCES``."""

    name: str  # the paper's name for the benchmark
    column: str  # the paper's column (setting)
    metric: str
    paper: float | None
    source: str


@dataclass(frozen=True)
class Benchmark:
    """One evaluation run (a catalog dataset, its protocol's split) and the published numbers it is compared with."""

    dataset: str  # the catalog name: also the folder under --out and under --predictions
    published: tuple[Published, ...]


OPEN_VOCAB = "open vocabulary"  # trained on COCO-Stuff-171, tested on other vocabularies
A847 = Published("A-847", OPEN_VOCAB, "miou", 19.9, "claimed")
PC459 = Published("PC-459", OPEN_VOCAB, "miou", 29.2, "claimed")
A150 = Published("A-150", OPEN_VOCAB, "miou", 43.2, "claimed")
PC59 = Published("PC-59", OPEN_VOCAB, "miou", 68.4, "claimed")
OPEN_VOCAB_ROWS = (
    Benchmark("ade20k-full", (A847,)),
    Benchmark("pascal-context-459", (PC459,)),
    Benchmark("ade20k", (A150,)),
    Benchmark("pascal-context-59", (PC59,)),
)
# "paper": the nine evaluations of DiGSeg's abstract. ADE20K is one run with two published numbers (semantic
# 58.6 and A-150 open vocabulary 43.2); PC-59 and PC-459 read one release. Cityscapes 38.5 is listed as
# semantic, as issue 18 does, although datasets.md reads so low a figure as a zero-shot column.
SUITES: dict[str, tuple[Benchmark, ...]] = {
    "open-vocab": OPEN_VOCAB_ROWS,
    "paper": (
        Benchmark("ade20k", (Published("ADE20K", "semantic", "miou", 58.6, "aggregator"), A150)),
        Benchmark("coco-stuff", (Published("COCO-Stuff-171", "semantic", "miou", 50.8, "issue 18"),)),
        Benchmark("cityscapes", (Published("Cityscapes", "semantic", "miou", 38.5, "aggregator"),)),
        Benchmark("ade20k-full", (A847,)),
        Benchmark("pascal-context-459", (PC459,)),
        Benchmark("pascal-context-59", (PC59,)),
        Benchmark("deepglobe", (Published("DeepGlobe road", "cross-domain", "road_iou", 65.78, "issue 18"),)),
        Benchmark(
            "refuge2",
            (
                Published("REFUGE2 disc", "cross-domain", "dice_disc", None, "none"),
                Published("REFUGE2 cup", "cross-domain", "dice_cup", None, "none"),
            ),
        ),
        Benchmark("phenobench", (Published("PhenoBench", "cross-domain", "phenobench_miou", 76.66, "issue 18"),)),
    ),
}
SUITE_NAMES = tuple(SUITES)


# ------------------------------------------------------------------------------------------- the run
@dataclass
class SuiteRow:
    """What became of one benchmark: ``scored`` (``result``), ``missing`` or ``failed`` (``message`` says why);
    ``present`` while it waits its turn."""

    benchmark: Benchmark
    status: str
    result: EvalResult | None = None
    message: str = ""
    exit_code: int | None = None  # failed: the code the error alone would have exited with


@dataclass
class SuiteResult:
    """The suite's rows in table order, the ``suite.json`` object, and the folder both tables are in."""

    name: str
    rows: list[SuiteRow]
    table: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    main_process: bool = True

    @property
    def failed(self) -> list[SuiteRow]:
        return [r for r in self.rows if r.status == "failed"]


def default_suite_out(name: str) -> Path:
    return EVAL_OUT / f"suite-{name}"


def get_suite(name: str) -> tuple[Benchmark, ...]:
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; use one of {', '.join(SUITE_NAMES)}")
    return SUITES[name]


def _check_settings(settings: EvalSettings, benchmarks: tuple[Benchmark, ...]) -> None:
    """``UsageError`` for the options a suite cannot take: each benchmark has its own dataset and split."""
    if settings.dataset:
        raise UsageError("`--suite` and `--dataset` cannot be combined: a suite names its own benchmarks")
    asked = {"--split": settings.split, "--class-name": settings.class_name}
    asked |= {"--check": settings.check, "--download": settings.download}
    wrong = [flag for flag, value in asked.items() if value]
    if wrong:
        raise UsageError(
            f"`{'`, `'.join(wrong)}` cannot be combined with `--suite`: each benchmark uses its protocol's split; "
            "check or fetch one with `digseg eval --dataset NAME --check` or `--download`"
        )
    replace(settings, dataset=benchmarks[0].dataset).validate()  # the other options, as one evaluation checks them
    if settings.predictions is not None and not Path(settings.predictions).is_dir():
        raise DatasetError(f"predictions folder {settings.predictions} does not exist")


def _locate(benchmarks, data_root) -> tuple[list[SuiteRow], dict[str, BenchmarkDataset]]:
    """Open each benchmark's protocol split; a dataset the catalog cannot open here is ``missing`` with its text."""
    from digseg_cli.data.benchmarks import catalog as D

    rows, opened = [], {}
    for bench in benchmarks:
        try:
            opened[bench.dataset] = D.open_dataset(D.get_spec(bench.dataset), data_root=data_root)
            rows.append(SuiteRow(bench, "present"))
        except DatasetError as exc:
            rows.append(SuiteRow(bench, "missing", message=str(exc)))
    return rows, opened


def run_suite(
    settings: EvalSettings,
    suite: str,
    *,
    progress: Progress | None = None,
    note: Note | None = None,
) -> SuiteResult:
    """Score every benchmark of ``suite`` that is present, write ``suite.md`` and ``suite.json``; see the module
    docstring. ``settings`` are one evaluation's, with ``dataset`` empty (each benchmark sets its own), ``out``
    the suite's folder and ``predictions`` the folder of per-benchmark folders. ``note(text)`` gets a line per
    benchmark as it starts ("benchmark k of N: ...") and the run's other notes."""
    from digseg_cli.inference.device import is_main, join_processes, leave_process_group

    benchmarks = get_suite(suite)
    _check_settings(settings, benchmarks)
    rows, opened = _locate(benchmarks, settings.data_root)
    if not opened:
        how = "; ".join(f"{r.benchmark.dataset}: {r.message}" for r in rows)
        raise DatasetError(f"no benchmark of suite {suite} is on this machine. {how}")
    out = require_writable_folder(settings.out or default_suite_out(suite), "--out")  # before any model loads
    processes = join_processes(settings.device)
    main = is_main(processes)
    say = note if note is not None and main else (lambda _text: None)
    missing = [r.benchmark.dataset for r in rows if r.status == "missing"]
    if missing:
        say(f"not on this machine, left out (suite.md says how to get them): {', '.join(missing)}")
    present = [r for r in rows if r.status == "present"]
    model = SharedModel()  # loaded (and compiled) by the first benchmark that scores it, kept for the others
    for k, row in enumerate(present, 1):
        name = row.benchmark.dataset
        say(f"benchmark {k} of {len(present)}: {name} ({', '.join(p.name for p in row.benchmark.published)})")
        one = replace(
            settings,
            dataset=name,
            out=out / name,
            predictions=None if settings.predictions is None else Path(settings.predictions) / name,
        )
        try:
            row.result = score_dataset(
                one, opened[name], processes=processes, progress=progress, note=note, model=model
            )
            row.status = "scored"
        except Exception as exc:
            error = as_user_error(exc)
            if not isinstance(error, (DatasetError, UsageError)):  # weights, device, memory, output: stop
                raise
            row.status, row.message, row.exit_code = "failed", str(error), error.exit_code
            say(f"{name} failed: {error}")
    leave_process_group()
    result = SuiteResult(suite, rows, out_dir=out, main_process=main)
    result.table = json_safe(suite_table(result, settings))
    if main:
        atomic_write_json(out / "suite.json", result.table)
        atomic_write_text(out / "suite.md", suite_markdown(result.table))
    return result


# ------------------------------------------------------------------------------------------- the tables
def _percent(value: Any) -> float | None:
    return None if not isinstance(value, (int, float)) or value != value else round(100 * float(value), 2)


def suite_table(result: SuiteResult, settings: EvalSettings) -> dict[str, Any]:
    """The ``suite.json`` object: one entry per benchmark (status, report, our numbers beside the paper's)."""
    from digseg_cli._version import __version__

    entries = []
    for row in result.rows:
        metrics = row.result.metrics if row.result is not None else {}
        lines = [
            {
                "name": p.name,
                "column": p.column,
                "metric": p.metric,
                "ours": metrics.get("metrics", {}).get(p.metric),  # a fraction, as in the benchmark's metrics.json
                "ours_percent": _percent(metrics.get("metrics", {}).get(p.metric)),
                "paper": p.paper,  # percent, as published
                "paper_source": p.source,
            }
            for p in row.benchmark.published
        ]
        entries.append(
            {
                "dataset": row.benchmark.dataset,
                "status": row.status,
                "split": metrics.get("split"),
                "num_images": metrics.get("num_images"),
                "protocol": metrics.get("protocol"),
                "report": f"{row.benchmark.dataset}/report.md" if row.result is not None else None,
                "message": row.message or None,
                "exit_code": row.exit_code,
                "results": lines,
            }
        )
    return {
        "suite": result.name,
        "source": "predictions" if settings.predictions is not None else "model",
        "weights": None if settings.predictions is not None else settings.weights,
        "predictions": None if settings.predictions is None else str(settings.predictions),
        "limit": settings.limit,
        "digseg_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "benchmarks": entries,
        "missing": [e["dataset"] for e in entries if e["status"] == "missing"],
        "failed": [e["dataset"] for e in entries if e["status"] == "failed"],
        "sources": SOURCES,
    }


TABLE_HEADER = ("benchmark", "dataset", "column", "metric", "ours", "DiGSeg", "source")


def table_lines(table: dict[str, Any]) -> list[tuple[str, ...]]:
    """The table's cells as shown to people, one line per published number: percent with 2 decimals, ``—``
    where the paper has none, and the status (``missing``, ``failed``) where we have none. ``suite.md`` and
    the command's Rich table show the same."""
    lines = []
    for entry in table["benchmarks"]:
        for r in entry["results"]:
            ours = entry["status"] if entry["status"] != "scored" else _shown(r["ours_percent"], ".2f")
            cells = (r["name"], entry["dataset"], r["column"], r["metric"], ours, _shown(r["paper"], "g"))
            lines.append((*cells, r["paper_source"]))
    return lines


def _shown(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def suite_markdown(table: dict[str, Any]) -> str:
    """``suite.md``: the table, then what is missing (and how to get it), what failed, and how to read it."""
    what = f"predictions from {table['predictions']}" if table["predictions"] else f"weights {table['weights']}"
    out = [f"# digseg eval --suite {table['suite']}", "", f"Ours: {what}; limit {table['limit'] or 'none'}.", ""]
    out += ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in table_lines(table)]
    scored = [e for e in table["benchmarks"] if e["status"] == "scored"]
    if scored:
        out += ["", "Reports: " + ", ".join(f"[{e['dataset']}]({e['report']})" for e in scored)]
    for status, title in (("missing", "Missing on this machine"), ("failed", "Failed")):
        rows = [e for e in table["benchmarks"] if e["status"] == status]
        if rows:
            out += ["", f"## {title}", ""] + [f"- **{e['dataset']}**: {e['message']}" for e in rows]
    out += ["", "## Where the published numbers come from", ""]
    out += [f"- **{key}**: {text}" for key, text in table["sources"].items()]
    out += ["", "## Reading the table", "", *NOTES, ""]
    return "\n".join(out)


NOTES = (
    "- Ours is in percent (×100 of the fraction in each benchmark's metrics.json), scored with the catalog's "
    "protocol for that benchmark (split, ignore value, absent-class rule, test-time short side).",
    "- Open vocabulary: DiGSeg trained on COCO-Stuff-171 and tested on the other vocabularies; a model scored "
    "here is compared fairly only if it was trained so too.",
    "- ADE20K is one evaluation run with two published numbers beside it: 58.6 (semantic, closed set) and 43.2 "
    "(A-150, open vocabulary). Our run follows the open-vocabulary protocol (short side 640, detectron2 rule); "
    "closed-set papers often resize to short side 512 and use the mmseg rule.",
    "- DiGSeg's per-dataset settings are not confirmed (shared/reference/datasets.md); the last column says "
    "where each published number comes from, and which are unverified.",
)
