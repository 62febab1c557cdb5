"""Issue 17: nothing a user can cause ends in a traceback. A table of hostile inputs, each with the exit code
and the one line of error it must give; and out of memory (GPU or CPU) is exit 6 wherever it happens.

Each row is a command line, the files to create first and what must come out. In a row's `files`, a path
under `ck/` edits a copy of a tiny checkpoint (built once for the module), one under `data/` a copy of a
small training folder; `None` removes the file (`ck/tokenizer/*`: every file of that folder). Arguments may
name `{tmp}` (the test's folder), `{ck}` and `{data}` (the copies when the row edits them, else the shared
ones). The next case is one more line in `CASES`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint, a small training folder and one image, built once for the module."""
    from digseg_cli.data.synth import write_synth_dataset
    from digseg_cli.models.checkpoint import build_compact, save_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    save_checkpoint(root / "ck", build_compact("tiny"))
    write_synth_dataset(root / "data", 6, seed=0, size=32)
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(root / "a.png")
    return {"ck": root / "ck", "data": root / "data", "image": root / "a.png"}


def _config_with(**changes) -> str:
    """`digseg_config.json` of a tiny checkpoint with `changes` (a value `...` removes the key)."""
    from digseg_cli.models.checkpoint import build_compact

    config = {**build_compact("tiny").config.to_dict(), **changes}
    return json.dumps({k: v for k, v in config.items() if v is not ...})


def _segment(*args: str) -> list[str]:
    return ["segment", "{image}", "--out", "{tmp}/out", "--weights", "{ck}", *args]


def _train(*args: str) -> list[str]:
    return ["train", "--data", "{data}", "--base", "tiny", "--out", "{tmp}/run", "--max-steps", "1", "--cpu", *args]


P = "{tmp}/prompts.yaml"
CASES = [
    # --prompts files: YAML tags are refused (never run), and every value's type is checked, naming its key.
    (
        "yaml python tag",
        _segment("--prompts", P),
        {"prompts.yaml": "!!python/object/apply:os.system ['true']\n"},
        2,
        "not valid YAML: could not determine a constructor",
    ),
    ("malformed yaml", _segment("--prompts", P), {"prompts.yaml": "classes: [road, {name: \n"}, 2, "is not valid YAML"),
    ("prompts not utf-8", _segment("--prompts", P), {"prompts.yaml": b"\xff\xfe road"}, 2, "is not UTF-8 text"),
    (
        "synonyms: 5",
        _segment("--prompts", P),
        {"prompts.yaml": "classes:\n - name: road\n   synonyms: 5\n"},
        2,
        "prompts.yaml: classes[0].synonyms must be a list of strings",
    ),
    (
        "color: 5",
        _segment("--prompts", P),
        {"prompts.yaml": "classes:\n - road\n - name: tree\n   color: 5\n"},
        2,
        "prompts.yaml: classes[1].color must be",
    ),
    (
        "color of two",
        _segment("--prompts", P),
        {"prompts.yaml": "- name: road\n  color: [1, 2]\n"},
        2,
        "colour [1, 2] must be",
    ),
    (
        "name a list",
        _segment("--prompts", P),
        {"prompts.yaml": "- name: [road]\n"},
        2,
        "prompts.yaml[0].name must be a string",
    ),
    (
        "threshold text",
        _segment("--prompts", P),
        {"prompts.yaml": "road: {threshold: high}\n"},
        2,
        "prompts.yaml: road.threshold must be a number",
    ),
    (
        "class name a number",
        _segment("--prompts", P),
        {"prompts.yaml": "1: road\n"},
        2,
        "class name 1 must be a string",
    ),
    ("prompts a number", _segment("--prompts", P), {"prompts.yaml": "5\n"}, 2, "expected a non-empty list of classes"),
    ("prompts a folder", _segment("--prompts", "{tmp}"), {}, 2, "is a folder"),
    (
        "prompts json",
        _segment("--prompts", "{tmp}/p.json"),
        {"p.json": '{"classes": [{"name": "road",}]}'},
        2,
        "is not valid JSON",
    ),
    # digseg_config.json: a top-level array, a missing key, wrong types; exit 5 (the checkpoint is damaged).
    (
        "config an array",
        _segment("-p", "road"),
        {"ck/digseg_config.json": "[]"},
        5,
        "digseg_config.json must be a mapping, got []",
    ),
    (
        "config lacks base_model",
        _segment("-p", "road"),
        {"ck/digseg_config.json": _config_with(base_model=...)},
        5,
        "lacks base_model",
    ),
    (
        "config threshold text",
        _segment("-p", "road"),
        {"ck/digseg_config.json": _config_with(default_threshold="x")},
        5,
        "default_threshold must be a number, got 'x'",
    ),
    (
        "config resolution text",
        _segment("-p", "road"),
        {"ck/digseg_config.json": _config_with(default_resolution="64")},
        5,
        "default_resolution must be an integer",
    ),
    (
        "config classes wrong",
        _segment("-p", "road"),
        {"ck/digseg_config.json": _config_with(classes=[{"name": 5}])},
        5,
        "classes[0].name must be a string",
    ),
    (
        "config objective",
        _segment("-p", "road"),
        {"ck/digseg_config.json": _config_with(objective="best")},
        5,
        "`objective` must be one of",
    ),
    ("config not utf-8", _segment("-p", "road"), {"ck/digseg_config.json": b"\xff{}"}, 5, "is not UTF-8 text"),
    ("config not json", _segment("-p", "road"), {"ck/digseg_config.json": "{"}, 5, "is not valid JSON"),
    # The components' configs and files.
    (
        "unet config not json",
        _segment("-p", "road"),
        {"ck/unet/config.json": "{"},
        5,
        "unet/config.json is not valid JSON",
    ),
    (
        "unet config wrong type",
        _segment("-p", "road"),
        {"ck/unet/config.json": '{"block_out_channels": 5}'},
        5,
        "cannot build a model part from",
    ),
    (
        "vae config wrong type",
        _segment("-p", "road"),
        {"ck/vae/config.json": '{"latent_channels": "x"}'},
        5,
        "vae/config.json",
    ),
    (
        "text encoder no model type",
        _segment("-p", "road"),
        {"ck/text_encoder/config.json": '{"hidden_size": 8}'},
        5,
        "text_encoder/config.json",
    ),
    (
        "text pathway wrong type",
        _segment("-p", "road"),
        {"ck/text_pathway/config.json": '{"text_dim": "x"}'},
        5,
        "text_pathway/config.json: text_dim must be an integer",
    ),
    ("text pathway an array", _segment("-p", "road"), {"ck/text_pathway/config.json": "[]"}, 5, "must be a mapping"),
    (
        "scheduler an array",
        _segment("-p", "road"),
        {"ck/scheduler/scheduler_config.json": "[1]"},
        5,
        "scheduler_config.json must be a mapping",
    ),
    (
        "scheduler wrong values",
        _segment("-p", "road"),
        {"ck/scheduler/scheduler_config.json": '{"num_train_timesteps": "x"}'},
        5,
        "scheduler_config.json",
    ),
    ("tokenizer empty", _segment("-p", "road"), {"ck/tokenizer/*": None}, 5, "cannot build a model part from"),
    (
        "fast decoder config",
        _segment("-p", "road"),
        {"ck/fast_decoder/config.json": "[]"},
        5,
        "fast_decoder/config.json must be a mapping",
    ),
    # Class files of training folders: exit 7 (the dataset is invalid).
    (
        "classes synonyms 5",
        ["data", "check", "{data}"],
        {"data/classes.json": '{"classes": [{"id": 1, "name": "road", "synonyms": 5}]}'},
        7,
        "synonyms of class 1 must be a list of strings",
    ),
    (
        "classes color 5",
        ["data", "check", "{data}"],
        {"data/classes.json": '{"classes": [{"id": 1, "name": "road", "color": 5}]}'},
        7,
        "colour 5 must be",
    ),
    (
        "classes background text",
        ["data", "check", "{data}"],
        {"data/classes.json": '{"classes": ["road"], "background": "x"}'},
        7,
        "background must be an integer",
    ),
    (
        "classes.txt not utf-8",
        ["data", "check", "{data}"],
        {"data/classes.json": None, "data/classes.txt": b"1 r\xe9seau\n"},
        7,
        "is not UTF-8 text",
    ),
    (
        "classes.yaml tag",
        _train(),
        {"data/classes.json": None, "data/classes.yaml": "!!python/name:os.system\n"},
        7,
        "is not valid YAML",
    ),
    # Training options no run can use: exit 2 before any work (`train.settings.check_inputs`).
    ("train batch 0", _train("--batch-size", "0"), {}, 2, "`--batch-size` must be at least 1, got 0"),
    ("train lr -1", _train("--lr", "-1"), {}, 2, "`--lr` must be a positive number, got -1.0"),
    ("train max steps -5", _train("--max-steps", "-5"), {}, 2, "`--max-steps` must be at least 1, got -5"),
    ("train ema 1.5", _train("--ema", "1.5"), {}, 2, "`--ema` must be in [0, 1)"),
    ("train vae steps -1", _train("--vae-steps", "-1"), {}, 2, "`--vae-steps` must be 0 or more"),
    ("train warmup -1", _train("--warmup-steps", "-1"), {}, 2, "`--warmup-steps` must be 0 or more"),
    ("train val every -1", _train("--val-every", "-1"), {}, 2, "`--val-every` must be 0 (off) or more"),
    ("train save every -1", _train("--save-every", "-1"), {}, 2, "`--save-every` must be 0 (off) or more"),
    ("train foreground 0.5", _train("--foreground-weight", "0.5"), {}, 2, "`--foreground-weight` must be at least 1"),
    ("train val split 1", _train("--val-split", "1"), {}, 2, "`--val-split` must be in [0, 1)"),
    ("train time 0", _train("--time", "0"), {}, 2, "`--time` must be a positive duration"),
    (
        "train resolution 33",
        _train("--resolution", "33"),
        {},
        2,
        "`--resolution` must be a multiple of 4 for this model, got 33",
    ),
    ("train out a file", _train("--out", "{tmp}/file"), {"file": "x"}, 2, "--out {tmp}/file is a file, not a folder"),
    (
        "decoder steps 0",
        ["decoder", "train", "--weights", "{ck}", "--out", "{tmp}/d", "--steps", "0"],
        {},
        2,
        "`--steps` must be at least 1",
    ),
    (
        "decoder lr 0",
        ["decoder", "train", "--weights", "{ck}", "--out", "{tmp}/d", "--lr", "0"],
        {},
        2,
        "`--lr` must be a positive number",
    ),
    (
        "decoder width 0",
        ["decoder", "train", "--weights", "{ck}", "--out", "{tmp}/d", "--width", "0"],
        {},
        2,
        "`--width` must be at least 1",
    ),
    # Files and folders that cannot be written: `strerror: path`, exit 2.
    (
        "eval out a file",
        ["eval", "-d", "{data}", "--weights", "{ck}", "--limit", "1", "--out", "{tmp}/file"],
        {"file": "x"},
        2,
        "--out {tmp}/file is a file, not a folder",
    ),
    (
        "segment out a file",
        _segment("-p", "road", "--out", "{tmp}/file"),
        {"file": "x"},
        2,
        "--out {tmp}/file is a file, not a folder",
    ),
    (
        "segment out under a file",
        _segment("-p", "road", "--out", "{tmp}/file/out"),
        {"file": "x"},
        2,
        "cannot write to --out {tmp}/file/out: Not a directory",
    ),
    (
        "train out under a file",
        _train("--out", "{tmp}/file/out"),
        {"file": "x"},
        2,
        "cannot write to --out {tmp}/file/out: Not a directory",
    ),
    (
        "eval out under a file",
        ["eval", "-d", "{data}", "--weights", "{ck}", "--limit", "1", "--out", "{tmp}/file/out"],
        {"file": "x"},
        2,
        "cannot write to --out {tmp}/file/out: Not a directory",
    ),
]


def _prepare(tmp: Path, shared: dict[str, Path], files: dict) -> dict[str, str]:
    """Write a row's files (copying the checkpoint or the data folder it edits); the argument placeholders."""
    names = {"tmp": str(tmp), "image": str(shared["image"]), "ck": str(shared["ck"]), "data": str(shared["data"])}
    for folder in ("ck", "data"):
        if any(name.startswith(f"{folder}/") for name in files):
            shutil.copytree(shared[folder], tmp / folder)
            names[folder] = str(tmp / folder)
    for name, content in files.items():
        path = tmp / name
        if content is None:
            for gone in path.parent.glob(path.name):
                gone.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return names


@pytest.mark.parametrize(("args", "files", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_its_exit_code(shared, tmp_path, args, files, code, message):
    names = _prepare(tmp_path, shared, files)
    result = runner.invoke(app, [a.format(**names) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert message.format(**names) in errors[0], errors[0]
    assert result.exit_code == code, result.output


def _raise(exc: BaseException):
    def fail(*_args, **_kwargs):
        raise exc

    return fail


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 1 GB"),
        lambda: RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB"),
        lambda: MemoryError(),
        lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
    ids=["cpu-allocator", "cpu-not-enough", "MemoryError", "cuda"],
)
def test_out_of_memory_is_exit_6_in_train_and_eval(shared, tmp_path, monkeypatch, make_error):
    """The real error types, raised where the work happens (the training loop, the benchmark scorer)."""
    import digseg_cli.evaluate.run as eval_run
    import digseg_cli.train.setup as setup

    monkeypatch.setattr(setup, "set_up_optimisation", _raise(make_error()))
    train = runner.invoke(app, [a.format(tmp=tmp_path, data=shared["data"]) for a in _train()])
    monkeypatch.setattr(eval_run, "_score_model", _raise(make_error()))
    evaluate = runner.invoke(app, ["eval", "-d", str(shared["data"]), "--weights", str(shared["ck"]), "--limit", "1"])
    for result in (train, evaluate):
        assert result.exit_code == 6, result.output
        assert "out of memory" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_bug_keeps_its_traceback(shared, tmp_path, monkeypatch):
    """Only what a user can cause is mapped: any other exception is a bug and is not hidden."""
    import digseg_cli.train.setup as setup

    monkeypatch.setattr(setup, "set_up_optimisation", _raise(ValueError("a bug")))
    result = runner.invoke(app, [a.format(tmp=tmp_path, data=shared["data"]) for a in _train()])
    assert isinstance(result.exception, ValueError) and result.exit_code == 1
