"""`digseg train --recipe NAME|FILE` and `--print-config` (issue 18, items 4 and 6): a recipe's values under the
command line's, unknown keys and bad values refused in one line, the shipped recipes valid, and the run folder's
`recipe.yaml` what `--print-config` printed."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from digseg_cli.cli import train as train_cli
from digseg_cli.cli.app import app
from digseg_cli.errors import UsageError
from digseg_cli.train import recipes
from digseg_cli.train.settings import LR_SCHEDULES, TrainSettings, check_inputs, parse_duration

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _print_config(*args: str) -> dict:
    result = runner.invoke(app, ["train", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def _refused(*args: str) -> str:
    """The one error line of a refused `digseg train` (exit 2)."""
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_command_line_option_overrides_the_recipe_and_the_recipe_the_defaults(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "base: tiny\nlr: 1e-3\nmax-steps: 5\nbatch_size: 2\ntime_limit: 45m\n")
    printed = _print_config("--recipe", str(recipe), "--lr", "0.01")
    assert printed["lr"] == 0.01  # the command line wins
    assert (printed["base"], printed["max_steps"], printed["batch_size"]) == ("tiny", 5, 2)  # the recipe's
    assert printed["time_limit"] == 2700.0  # a duration, as --time takes it
    assert printed["warmup_steps"] == TrainSettings().warmup_steps  # neither: the default
    assert printed["recipe"] == str(recipe)  # where the settings came from
    assert "resume" not in printed  # a run's, not a recipe's


def test_an_unknown_key_is_refused_naming_the_nearest_valid_one(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "max_step: 5\n")
    line = _refused("--recipe", str(recipe), "--print-config")
    assert "unknown keys in recipe" in line and "'max_step'" in line and "did you mean 'max_steps'?" in line


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("batch_size: eight\n", "`batch_size` must be an integer, got 'eight'"),
        ("datasets: ade20k\n", "`datasets` must be a list of strings"),
        ("time_limit: soon\n", "`time_limit` must be a duration"),
        ("resume: run/last\n", "`resume` is not a recipe setting"),
        ("- lr\n", "must be a mapping of settings"),
        ("", "got an empty file"),
        ("lr: [1\n", "is not valid YAML"),
        ("max-steps: 1\nmax_steps: 2\n", "sets max_steps twice"),
        ("lr_schedule: nope\n", "`--lr-schedule` must be one of"),
    ],
)
def test_a_bad_recipe_is_one_line_and_exit_2(tmp_path, text, says):
    recipe = _write(tmp_path / "r.yaml", text)
    assert says in _refused("--recipe", str(recipe), "--print-config")


def test_a_recipe_extends_another_its_own_keys_over_the_others(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "base.yaml", "base: tiny\nlr: 1e-3\nmax_steps: 5\n")
    _write(tmp_path / "sub" / "mid.yaml", "extends: ../base.yaml\nmax_steps: 7\nbatch_size: 2\n")  # beside it
    top = _write(tmp_path / "top.yaml", "extends: sub/mid.yaml\nbatch_size: 3\n")
    printed = _print_config("--recipe", str(top), "--lr", "0.01")
    assert (printed["base"], printed["max_steps"], printed["batch_size"], printed["lr"]) == ("tiny", 7, 3, 0.01)
    assert printed["recipe"] == str(top) and "extends" not in printed  # the resolved values, not the chain
    # A shipped recipe by name: demo-256 is demo-192's values with three changed.
    assert _print_config("--recipe", "demo-256", "--max-steps", "1200", "--lr", "2e-4", "--resolution", "192") == {
        **_print_config("--recipe", "demo-192"),
        "recipe": "demo-256",
    }


@pytest.mark.parametrize(
    ("files", "says"),
    [
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"}, "extends itself (through"),
        ({"a.yaml": "extends: a.yaml\n"}, "extends itself (through"),
        ({"a.yaml": "extends: [demo]\n"}, "`extends` must be a recipe's name or file"),
        ({"a.yaml": "extends: missing.yaml\n"}, "a.yaml: extends: missing.yaml: no such file"),  # who asked
        ({"a.yaml": "extends: b.yaml\n", "b.yaml": "max_step: 1\n"}, "b.yaml"),  # the parent's bad key, named
    ],
)
def test_a_bad_extends_is_one_line_and_exit_2(tmp_path, files, says):
    for name, text in files.items():
        _write(tmp_path / name, text)
    assert says in _refused("--recipe", str(tmp_path / "a.yaml"), "--print-config")


def test_a_recipe_that_is_neither_shipped_nor_a_file_names_the_shipped_ones(tmp_path):
    line = _refused("--recipe", str(tmp_path / "missing.yaml"), "--print-config")
    assert "no such file" in line and "paper-open-vocab" in line


@pytest.mark.parametrize("name", ["paper-open-vocab", "paper-ade20k", "demo", "demo-192", "demo-256"])
def test_each_shipped_recipe_resolves_to_settings_a_run_can_use(name):
    assert name in recipes.shipped_recipes()
    settings = recipes.resolve_settings(recipes.load_recipe(name), {})
    check_inputs(settings)
    assert settings.recipe == name
    text = recipes.recipe_file(name).read_text()
    if name.startswith("paper-"):
        assert settings.base == "stabilityai/stable-diffusion-2" and settings.effective_batch == 32
        assert settings.datasets == {"paper-open-vocab": ["coco-stuff"], "paper-ade20k": ["ade20k"]}[name]
        assert "A RECONSTRUCTION, NOT THE PAPER'S RECIPE" in text and "published neither code nor" in text
    else:
        assert (settings.base, settings.datasets, settings.vocabulary) == ("small-minilm", ["synth-train"], "synth")
        stage = {"demo": "three chained runs", "demo-192": "second stage", "demo-256": "third stage"}[name]
        assert stage in text
        if name != "demo":  # a later stage: from the one before (the bundled demo unless --init says)
            assert (settings.init, settings.vae_steps, settings.resolution) == ("demo", 0, int(name[-3:]))


def test_the_shipped_recipes_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "digseg_cli.train" in config["packages"]
    patterns = config["package-data"]["digseg_cli.train"]
    package = ROOT / "digseg_cli" / "train"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert shipped == set(recipes.RECIPES_DIR.glob("*.yaml")) and len(shipped) == 5


def test_print_config_touches_nothing_and_loads_no_model(tmp_path, monkeypatch):
    import digseg_cli.train.loop as loop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("--print-config ran the training"))
    printed = _print_config("--recipe", "demo", "--out", str(tmp_path / "run"))
    assert printed["out"] == str(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_the_new_options_reach_the_settings(tmp_path, monkeypatch):
    args = [
        *("--absent-prob", "0.1", "--prompt-template", "a photo of a {name}", "--noise-strength", "0.2"),
        *("--weight-decay", "0", "--lr-schedule", "constant", "--workers", "2", "--val-limit", "8"),
        *("--dataset", "ade20k:1", "--dataset", "coco-stuff:2", "--data-root", str(tmp_path / "datasets")),
        *("--log-every", "5", "--vae-lr", "0.002", "--out", str(tmp_path / "run")),
    ]
    expected = {
        "absent_prob": 0.1,
        "prompt_template": "a photo of a {name}",
        "noise_strength": 0.2,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
        "workers": 2,
        "val_limit": 8,
        "datasets": ["ade20k:1", "coco-stuff:2"],
        "data_root": tmp_path / "datasets",
        "log_every": 5,
        "vae_lr": 0.002,
    }
    printed = _print_config(*args)
    assert {k: printed[k] for k in expected} == {**expected, "data_root": str(tmp_path / "datasets")}
    # A run gets the same settings (and --dataset stands in for --data).
    import digseg_cli.train.loop as loop

    seen = []
    monkeypatch.setattr(
        loop, "train", lambda s, progress=None: seen.append(s) or SimpleNamespace(is_main_process=False)
    )
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0 and len(seen) == 1, result.output
    assert {k: getattr(seen[0], k) for k in expected} == expected


def test_every_setting_is_a_command_line_option_and_every_option_a_setting():
    params = {train_cli._SETTING_OF.get(p, p) for p in inspect.signature(train_cli.train_command).parameters}
    params -= {"ctx", *train_cli._NOT_SETTINGS}
    fields = {f.name for f in dataclasses.fields(TrainSettings)} - {"resume", "recipe"}  # --resume, --recipe
    assert params == fields


def test_a_bad_option_value_is_one_line_and_exit_2():
    line = _refused("--lr-schedule", "nope", "--print-config")
    assert line.startswith("error: `--lr-schedule` must be one of linear, cosine") and "got 'nope'" in line
    assert "`--time` must be a duration" in _refused("--time", "soon", "--print-config")
    assert "`--absent-prob` must be in [0, 1]" in _refused("--absent-prob", "2", "--print-config")


def test_without_data_or_a_dataset_a_run_is_refused(tmp_path):
    line = _refused("--out", str(tmp_path / "run"), "--base", "tiny", "--max-steps", "1")
    assert "--data or --dataset is required" in line


def test_the_lr_schedules_are_diffusers_names_that_need_no_step_rules():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULES) == {s.value for s in SchedulerType} - {"piecewise_constant"}


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "45m", "2h", None)] == [90.0, 90.0, 2700.0, 7200.0, None]
    with pytest.raises(UsageError, match="`--time` must be a duration"):
        parse_duration("2 days")


def test_a_run_from_a_recipe_records_what_print_config_printed(tmp_path):
    from digseg_cli.data.synth import write_synth_dataset

    data = tmp_path / "scenes"
    write_synth_dataset(data, 12, seed=5, size=32)
    recipe = _write(
        tmp_path / "tiny.yaml",
        "base: tiny\nbatch-size: 4\nlr: 1e-3\nwarmup_steps: 1\nseed: 3\nmax_steps: 3\nval_every: 0\ncpu: true\n",
    )
    args = ["train", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2"]
    printed = runner.invoke(app, [*args, "--print-config"])
    assert printed.exit_code == 0, printed.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    recorded = (tmp_path / "run" / "recipe.yaml").read_text()
    assert recorded == printed.stdout
    assert yaml.safe_load(recorded)["max_steps"] == 2  # the override, not the recipe's 3
    # The record is itself a recipe: it starts the same run again.
    again = _print_config("--recipe", str(tmp_path / "run" / "recipe.yaml"))
    assert {**again, "recipe": None} == {**yaml.safe_load(recorded), "recipe": None}
    # A resumed run keeps its stored settings but for the options given.
    resumed = _print_config("--out", str(tmp_path / "run"), "--resume", "--max-steps", "4")
    assert {**resumed, "max_steps": 2} == yaml.safe_load(recorded) and resumed["max_steps"] == 4
