"""The run behind ``digseg eval``: settings in, a checked or scored benchmark (with its reports) out.

One job: from an ``EvalSettings`` resolve the dataset (``digseg_cli.data.benchmarks.catalog``), download or
check it when asked, then score saved label maps or a model: join the processes of a multi-process launch
through Accelerate (one GPU per process under CUDA, gloo on the CPU), load the model with
``inference.pipeline.load_pipeline``, wrap it as a predictor and call ``evaluate.scoring``, which shards
the samples, sums the confusion matrices and writes the reports. Each image's noise comes from the seed and
the image's name (``inference.seeds.image_seed``), as in ``segment``. ``score_dataset`` is the scoring half
alone (an opened split, the processes already joined), for ``evaluate.suite`` to join them and load the model
(``SharedModel``) once for all its benchmarks.

It renders nothing and maps no exit codes (``digseg_cli.cli.eval`` does both); errors a user can cause are
``DigsegError``s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digseg_cli.errors import UsageError
from digseg_cli.evaluate.predictions import is_records_file, pipeline_predictor, score_predictions
from digseg_cli.evaluate.scoring import EvalResult, Progress, evaluate, protocol_kwargs
from digseg_cli.files import DEFAULT_OUT, require_writable_folder
from digseg_cli.inference.coco_rle import require_pycocotools
from digseg_cli.models.config import check_prompt_template

if TYPE_CHECKING:
    from accelerate import PartialState

    from digseg_cli.data.benchmarks.base import BenchmarkDataset
    from digseg_cli.data.benchmarks.catalog import LayoutReport
    from digseg_cli.inference.pipeline import DigsegPipeline

TILES = ("auto", "off")
Note = Callable[[str], None]  # a one-line note for the user (reduced precision), main process only


@dataclass
class EvalSettings:
    """What ``digseg eval`` was asked (the command's options; None: the benchmark's or the model's default)."""

    dataset: str  # a catalog name or a folder; "" for a suite (`evaluate.suite` sets each benchmark's)
    split: str | None = None
    data_root: Path | None = None
    download: bool = False
    check: bool = False  # only check the layout: no model, no scores
    predictions: Path | None = None  # score saved label maps (a folder, or COCO RLE records: FILE.json), no model
    resize_predictions: bool = False  # resize saved label maps of another size (nearest) instead of refusing
    weights: str = "demo"
    limit: int | None = None
    out: Path | None = None  # default digseg-out/eval/<dataset>-<split>
    absent_rule: str | None = None
    class_name: str | None = None
    threshold: float | None = None
    device: str = "auto"
    precision: str = "auto"
    steps: int | None = None
    ensemble: int | None = None
    resolution: int | None = None
    short_side: int | None = None  # 0 = off
    tile: str = "auto"
    decoder: str = "auto"
    encoder: str = "auto"
    prompt_template: str | None = None
    seed: int = 0
    compile: bool = False  # the model's parts through torch.compile (`inference.compiling`)
    word_test: str | None = None  # also run the word test of this vocabulary (`evaluate.words`)

    def validate(self) -> None:
        """``UsageError`` for an option value no run could use, named as the command line names it."""
        from digseg_cli.core.metrics import ABSENT_RULES
        from digseg_cli.inference.device import PRECISIONS

        if not self.dataset:
            raise UsageError("give `--dataset NAME` (one benchmark) or `--suite NAME` (a table of benchmarks)")
        if self.absent_rule is not None and self.absent_rule not in ABSENT_RULES:
            raise UsageError(f"`--absent-rule` must be {' or '.join(ABSENT_RULES)}; got {self.absent_rule!r}")
        if self.tile not in TILES:
            raise UsageError(f"`--tile` must be one of {', '.join(TILES)}; got {self.tile!r}")
        precisions = ("auto", *PRECISIONS)
        if self.precision not in precisions:
            raise UsageError(f"`--precision` must be one of {', '.join(precisions)}; got {self.precision!r}")
        if self.prompt_template is not None:
            check_prompt_template(self.prompt_template, "`--prompt-template`")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"`--threshold` must be in [0, 1]; got {self.threshold}")
        if self.predictions is not None and self.check:
            raise UsageError("`--check` and `--predictions` cannot be combined")
        if self.resize_predictions and self.predictions is None:
            raise UsageError("`--resize-predictions` applies to `--predictions` only")
        if self.predictions is not None and is_records_file(self.predictions):
            require_pycocotools(f"`--predictions {Path(self.predictions).name}` (COCO RLE records)")


@dataclass
class EvalRun:
    """What a run gave: ``check`` (the layout report, with ``check=True``) or ``result`` (the scores, whose
    reports are written). ``main_process``: whether this process reports; under a multi-process launch every
    process holds the summed numbers and only one shows them."""

    check: LayoutReport | None = None
    result: EvalResult | None = None
    main_process: bool = True


def run_eval(settings: EvalSettings, *, progress: Progress | None = None, note: Note | None = None) -> EvalRun:
    """Check, or score, one benchmark split as ``settings`` say; see the module docstring.

    ``progress(done, total, stem)`` is called after each image this process scores; ``note(text)`` gets the
    main process's notes for the user (e.g. that bf16 moves probabilities)."""
    from digseg_cli.data.benchmarks import catalog as D
    from digseg_cli.inference.device import is_main, join_processes, leave_process_group

    s = settings
    # 1. Options, dataset, and what was asked besides scoring.
    s.validate()
    spec = D.get_spec(s.dataset, class_name=s.class_name)
    if s.download:
        D.download_dataset(spec, data_root=s.data_root)
    if s.check:
        return EvalRun(check=D.check_layout(spec, split=s.split, data_root=s.data_root))
    # 2. The samples; then the processes (one shard of the samples each) and the scores.
    data = D.open_dataset(spec, split=s.split, data_root=s.data_root)
    processes = join_processes(s.device)
    result = score_dataset(s, data, processes=processes, progress=progress, note=note)
    leave_process_group()
    return EvalRun(result=result, main_process=is_main(processes))


def score_dataset(
    settings: EvalSettings,
    data: BenchmarkDataset,
    *,
    processes: PartialState | None = None,
    progress: Progress | None = None,
    note: Note | None = None,
    model: SharedModel | None = None,
) -> EvalResult:
    """Score an opened split as ``settings`` say (saved label maps, or the model) and write its reports.

    ``processes``: the group this process joined (``join_processes``), or None for one process; ``model``: the
    model to score, loaded on first use (None: loaded for this split alone). A suite joins the processes and
    loads (and compiles) the model once for all its benchmarks."""
    s, spec = settings, data.spec
    # Where the reports go (probed before the model loads), the protocol and what the reports record of this run.
    out_dir = require_writable_folder(s.out or default_out_dir(spec.name, data.split), "--out")
    protocol = protocol_kwargs(spec)
    protocol["absent_rule"] = s.absent_rule or spec.absent_rule
    if s.threshold is not None:
        protocol["threshold"] = s.threshold
    record: dict[str, Any] = {
        "data_root": str(data.root),
        "limit": s.limit,
        "absent_rule_source": "option" if s.absent_rule else "benchmark default",
    }
    common = {
        "out_dir": out_dir,
        "split": data.split,
        "settings": record,
        "limit": s.limit,
        "progress": progress,
        "processes": processes,
        **protocol,
    }
    if s.predictions is None:
        model = SharedModel() if model is None else model
        return _score_model(s, data, model, processes=processes, note=note, record=record, common=common)
    record["predictions"] = str(s.predictions)
    return score_predictions(
        data,
        s.predictions,
        decode_prediction=spec.decode_prediction,
        resize_predictions=s.resize_predictions,
        category_ids=spec.category_ids,
        **common,
    )


@dataclass
class SharedModel:
    """The model a run scores: loaded (and compiled, with ``--compile``) by the first ``get`` and kept, so that
    ``eval --suite`` loads it once for all its benchmarks. Every benchmark of a suite has the same weights,
    device, precision and ``--compile``."""

    pipe: DigsegPipeline | None = None

    def get(self, s: EvalSettings, processes: PartialState | None, note: Note | None) -> DigsegPipeline:
        if self.pipe is None:
            from digseg_cli.inference import pipeline  # loads diffusers: only when a model is scored
            from digseg_cli.inference.device import is_main, precision_note

            # Under CUDA each process has its own GPU (Accelerate picked cuda:LOCAL_RANK); elsewhere --device holds.
            cuda = processes is not None and processes.device.type == "cuda"
            device = str(processes.device) if cuda else s.device
            dtype = None if s.precision == "auto" else s.precision
            self.pipe = pipeline.load_pipeline(s.weights, device=device, dtype=dtype, compile=s.compile)
            text = precision_note(self.pipe.dtype, self.pipe.device)
            if note is not None and is_main(processes) and text is not None:
                note(text)
        return self.pipe


def _score_model(
    s: EvalSettings,
    data: BenchmarkDataset,
    model: SharedModel,
    *,
    processes: PartialState | None,
    note: Note | None,
    record: dict[str, Any],
    common: dict[str, Any],
) -> EvalResult:
    """Get the model on this process's device, record the settings it runs with, score it."""
    from digseg_cli.inference.compiling import compile_record
    from digseg_cli.inference.device import PRECISION_NAMES, is_main
    from digseg_cli.inference.warmup import warm_up

    spec = data.spec
    vocabulary = _word_test_vocabulary(s, spec)  # checked before the model loads and the images are scored
    pipe = model.get(s, processes, note)
    main = is_main(processes)
    decoder, encoder = pipe.resolve_decoder(s.decoder), pipe.resolve_encoder(s.encoder)
    side = spec.short_side if s.short_side is None else s.short_side
    record.update(
        weights=s.weights,
        device=str(pipe.device),
        precision=PRECISION_NAMES[pipe.dtype],
        steps=s.steps,
        ensemble=s.ensemble,
        resolution=s.resolution,
        short_side=side or None,
        max_side=spec.max_side if side else None,
        tile=s.tile,
        decoder=decoder,
        encoder=encoder,
        prompt_template=s.prompt_template or pipe.config.prompt_template,
        seed=s.seed,
        prompts=[p if len(p) > 1 else p[0] for p in spec.prompts][:50],
        precision_fallbacks=pipe.notes,
    )  # the pipeline's own list: filled if fp16 overflows
    predictor = pipeline_predictor(
        pipe,
        steps=s.steps,
        ensemble=s.ensemble,
        seed=s.seed,
        resolution=s.resolution,
        tile=s.tile,
        prompt_template=s.prompt_template,
        short_side=side or None,
        max_side=spec.max_side,
        decoder=decoder,
        encoder=encoder,
    )
    # --compile: the calls that compile, timed apart (`compile.warmup_s`): seconds_per_image leaves them out.
    warm_up(pipe, spec.prompts, predictor.settings)
    record["compile"] = compile_record(pipe)
    result = evaluate(data, spec.class_names or (), predictor, **common)
    if s.word_test is not None and main:
        result.word_test = _word_test(
            s, vocabulary, spec, data, predictor, out_dir=result.out_dir, threshold=common["threshold"]
        )
    return result


def _word_test_vocabulary(s: EvalSettings, spec):
    if s.word_test is None:
        return None
    from digseg_cli.data.vocabulary import load_vocabulary

    if spec.label_mode != "background":
        raise UsageError(f"--word-test needs a benchmark whose label 0 is 'nothing' (synth, a folder); not {spec.name}")
    return load_vocabulary(s.word_test)


def _word_test(s: EvalSettings, vocabulary, spec, data, predictor, *, out_dir: Path | None, threshold: float) -> dict:
    """The word test of `--word-test` on the same images, written to `word_test.json` beside the scores."""
    from digseg_cli.evaluate.words import word_test
    from digseg_cli.files import atomic_write_json

    test = word_test(
        data,
        spec.class_names or (),
        predictor,
        vocabulary,
        threshold=threshold,
        ignore_index=spec.ignore_index,
        limit=s.limit,
    )
    if out_dir is not None:
        atomic_write_json(out_dir / "word_test.json", test)
    return test


EVAL_OUT = DEFAULT_OUT / "eval"  # where `eval` and `eval --suite` write when given no --out


def default_out_dir(dataset: str, split: str) -> Path:
    """``digseg-out/eval/<dataset>-<split>``, the dataset's name (a folder's last part) made file-name safe."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset).name or dataset).strip("_")
    return EVAL_OUT / f"{slug}-{split}"
