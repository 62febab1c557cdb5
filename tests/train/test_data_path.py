"""Training on benchmarks by name and on mixtures, ignore pixels, loader workers, the optimizer's weight
decay and a time-bounded schedule (issue: train like the paper)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import write_ade20k, write_cityscapes, write_coco_stuff
from PIL import Image
from safetensors.torch import load_file

from digseg_cli.errors import DatasetError, UsageError
from digseg_cli.train.loop import TrainSettings, train

TINY = dict(base="tiny", batch_size=2, lr=1e-3, warmup_steps=1, seed=3, vae_steps=0, val_limit=1, log_every=1)
WRITERS = {"ade20k": write_ade20k, "coco-stuff": write_coco_stuff, "cityscapes": write_cityscapes}


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> Path:
    """ADE20K, COCO-Stuff and Cityscapes in their official layouts under one data root, 32 px, 4 per split."""
    root = tmp_path_factory.mktemp("data-root")
    for write in WRITERS.values():
        write(root, n=4, size=32, seed=5)
    return root


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_few_steps_on_a_benchmark_by_name(benchmarks, tmp_path, name, one_torch_thread):
    from digseg_cli.data.benchmarks.catalog import get_spec

    out = tmp_path / "run"
    result = train(TrainSettings(out=out, datasets=[name], data_root=benchmarks, max_steps=2, val_every=2, **TINY))
    assert result.step == 2 and result.best_miou is not None
    config = json.loads((out / "last" / "digseg_config.json").read_text())
    spec = get_spec(name)
    assert [c["name"] for c in config["classes"]] == [p[0] for p in spec.prompts]
    assert all(c["sources"] == [name] for c in config["classes"])
    run = json.loads((out / "config.json").read_text())
    assert run["datasets"] == [{"name": name, "kind": "benchmark", "weight": 1.0, "ignore_index": spec.ignore_index}]
    assert "val_miou" in _records(out)[-1]


def test_a_mixture_asks_each_sample_about_its_own_datasets_classes(benchmarks):
    from digseg_cli.data.benchmarks.catalog import get_spec
    from digseg_cli.train.samples import SegmentationTrainDataset
    from digseg_cli.train.sources import open_sources

    s = TrainSettings(datasets=["ade20k:1", "cityscapes:3"], data_root=benchmarks, seed=0)
    sources = open_sources(s)
    dataset = SegmentationTrainDataset(sources, 32, seed=0, absent_prob=0.5)
    assert len(dataset) == 8  # the datasets' images together
    words = {name: {w for p in get_spec(name).prompts for w in p} for name in ("ade20k", "cityscapes")}
    seen = {"ade20k": 0, "cityscapes": 0}
    for epoch in range(40):
        for i in range(len(dataset)):
            sample = dataset[(epoch, i)]
            assert sample["prompt"] in words[sample["dataset"]]
            seen[sample["dataset"]] += 1
            assert torch.equal(dataset[(epoch, i)]["pixel_values"], sample["pixel_values"])  # from its key only
    share = seen["cityscapes"] / sum(seen.values())
    assert 0.68 < share < 0.82  # weight 3 of 4: 240 of 320 expected (binomial sd 7.7)


def test_training_on_a_mixture_records_the_union_and_each_datasets_miou(benchmarks, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    settings = TrainSettings(
        out=out, datasets=["cityscapes:2", "coco-stuff"], data_root=benchmarks, max_steps=2, val_every=2, **TINY
    )
    train(settings)
    config = json.loads((out / "last" / "digseg_config.json").read_text())
    sources = {c["name"]: c["sources"] for c in config["classes"]}
    assert sources["person"] == ["cityscapes", "coco-stuff"] and sources["road"] == ["cityscapes", "coco-stuff"]
    assert sources["giraffe"] == ["coco-stuff"] and sources["terrain"] == ["cityscapes"]
    assert len(config["classes"]) == len(set(sources))
    last = _records(out)[-1]
    by_dataset = last["val_miou_by_dataset"]
    assert set(by_dataset) == {"cityscapes", "coco-stuff"}
    assert last["val_miou"] == pytest.approx(sum(by_dataset.values()) / 2)
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    assert header.split(",")[-2:] == ["val_miou[cityscapes]", "val_miou[coco-stuff]"]
    assert float(rows[-1].split(",")[-1]) == pytest.approx(by_dataset["coco-stuff"], abs=1e-5)


def test_a_missing_benchmark_is_exit_7_and_an_evaluation_only_one_says_so(tmp_path):
    with pytest.raises(DatasetError, match="how|not found|Expected layout") as missing:
        train(TrainSettings(out=tmp_path / "a", datasets=["ade20k"], data_root=tmp_path / "empty", max_steps=1))
    assert missing.value.exit_code == 7
    with pytest.raises(UsageError, match="no training split"):
        train(TrainSettings(out=tmp_path / "b", datasets=["pascal-context-59"], data_root=tmp_path, max_steps=1))


def test_a_benchmark_without_its_validation_split_trains_unvalidated_and_says_so(tmp_path, caplog):
    from digseg_cli.data.benchmarks.catalog import get_spec
    from digseg_cli.train.sources import benchmark_source

    write_ade20k(tmp_path, n=1, size=32)
    validation = tmp_path / "ade20k/ADEChallengeData2016/images/validation"
    for f in validation.iterdir():
        f.unlink()
    with caplog.at_level("WARNING", logger="digseg"):
        source = benchmark_source(get_spec("ade20k"), 1.0, data_root=tmp_path)
    assert source.validation is None
    assert "ade20k: no val split to validate on" in caplog.text and "training unvalidated" in caplog.text


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [("ade20k", ("ade20k", 1.0)), ("coco-stuff:2", ("coco-stuff", 2.0)), ("deepglobe:0.5", ("deepglobe", 0.5))],
)
def test_dataset_entries_and_their_weights(entry, parsed):
    from digseg_cli.train.sources import parse_entry

    assert parse_entry(entry) == parsed


@pytest.mark.parametrize("entry", ["ade20k:0", "ade20k:-1", "ade20k:inf"])
def test_a_weight_that_is_no_positive_number_is_refused(entry):
    from digseg_cli.train.sources import parse_entry

    with pytest.raises(UsageError, match="positive number"):
        parse_entry(entry)


# --- ignore means ignore ---------------------------------------------------------------------------------


def _ignore_batch(model, seed: int) -> tuple[dict, dict]:
    """Two batches that differ only in the target under the ignore pixels (valid 0 in the left half)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    target = (torch.rand(2, 1, 32, 32, generator=g) > 0.6).float()
    valid = torch.ones(2, 1, 32, 32)
    valid[..., :, :13] = 0  # 13 px: partly covers latent pixels (the tiny VAE's factor is 2)
    other = target.clone()
    other[..., :, :13] = 1 - other[..., :, :13]
    ids = torch.zeros(2, 8, dtype=torch.long)
    a = {"pixel_values": pixels, "target": target, "valid": valid, "input_ids": ids}
    return a, {**a, "target": other}


@pytest.mark.parametrize("objective", ["one-step", "diffusion"])
def test_labels_under_ignore_pixels_leave_the_loss_exactly_unchanged(objective, one_torch_thread):
    from digseg_cli.core import diffusion
    from digseg_cli.models.loader import load_model
    from digseg_cli.train.loss import batch_loss

    loaded = load_model("tiny")
    scheduler = diffusion.make_scheduler(loaded.scheduler_config)
    a, b = _ignore_batch(loaded.model, 0)
    kwargs = dict(objective=objective, decoded_weight=0.5 if objective == "one-step" else 0.0, foreground_weight=5.0)
    loss_a = batch_loss(loaded.model, a, scheduler, generator=torch.Generator().manual_seed(1), **kwargs)
    loss_b = batch_loss(loaded.model, b, scheduler, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(loss_a, loss_b)
    all_valid = {**b, "valid": torch.ones_like(b["valid"])}  # the same labels, now counted: another loss
    loss_c = batch_loss(loaded.model, all_valid, scheduler, generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.equal(loss_a, loss_c)


def _folder_with_region(root: Path, region_value: int) -> Path:
    """Six 32 px pairs whose top-left 12x12 square is `region_value` (255 = ignore, 0 = background)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps({"classes": {"1": "road", "2": "tree"}, "ignore_index": 255}))
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        labels = rng.integers(0, 3, (32, 32)).astype(np.uint8)
        labels[:12, :12] = region_value
        Image.fromarray(labels).save(root / "masks" / f"{i}.png")
    return root


def test_a_region_marked_ignore_trains_other_weights_than_the_same_region_as_background(tmp_path, one_torch_thread):
    runs = {}
    for name, value in (("ignored", 255), ("background", 0)):
        folder = _folder_with_region(tmp_path / f"data-{name}", value)
        out = tmp_path / f"run-{name}"
        train(TrainSettings(folder, out, val_split=0, max_steps=3, deterministic=True, **TINY))
        runs[name] = _unet(out / "last")
    assert runs["ignored"].keys() == runs["background"].keys()
    assert any(not torch.equal(runs["ignored"][k], runs["background"][k]) for k in runs["ignored"])


# --- workers, optimizer, schedule ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth24(tmp_path_factory) -> Path:
    from digseg_cli.data.synth import write_synth_dataset

    folder = tmp_path_factory.mktemp("synth") / "scenes"
    write_synth_dataset(folder, 24, seed=11, size=32)
    return folder


def test_zero_and_two_loader_workers_end_with_identical_weights(synth24, tmp_path, one_torch_thread):
    weights = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        # 24 images, 2 per batch, 2 micro-batches per step: the run crosses an epoch at step 6
        settings = TrainSettings(synth24, out, workers=workers, effective_batch=4, max_steps=7, val_every=0, **TINY)
        train(settings)
        weights[workers] = _unet(out / "last")
        records = _records(out)
        assert records[-1]["epoch"] == 1 and all(r["data_wait_s"] >= 0 for r in records)
    assert all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_weight_decay_falls_only_on_weights_of_two_or_more_dimensions():
    from digseg_cli.train.optim import adamw

    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2))
    optimizer = adamw(list(layer.parameters()), lr=1e-3, weight_decay=0.1)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for name, p in layer.named_parameters():
        assert (id(p) in decay) == (p.ndim >= 2), name
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.1, 0.0}


def test_a_run_bounded_by_time_decays_its_rate_over_the_time_and_resumes_the_curve():
    from digseg_cli.train.optim import lr_schedule, time_progress

    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=1.0)
        return opt, lr_schedule(opt, kind="cosine", warmup_steps=2, max_steps=None)

    opt, sched = make()
    rates = []
    for progress in (0.0, 0.0, 0.25, 0.5, 1.0):
        time_progress(sched).progress = progress
        opt.step()
        sched.step()
        rates.append(sched.get_last_lr()[0])
    # steps 1-2 warm up; then the cosine at the time spent: 0.25 → 0.854, 0.5 → 0.5, all of it → 0
    assert rates[0] == pytest.approx(0.5) and rates[2] == pytest.approx(0.8536, abs=1e-3)
    assert rates[3] == pytest.approx(0.5, abs=1e-3) and rates[4] == pytest.approx(0.0, abs=1e-6)
    state = json.loads(json.dumps(sched.state_dict()))  # JSON-able, as the trainer state is written
    opt2, resumed = make()
    resumed.load_state_dict(state)
    assert time_progress(resumed).progress == 1.0 and resumed.get_last_lr() == sched.get_last_lr()


def test_the_command_line_trains_on_a_benchmark_and_a_missing_one_is_one_line_and_exit_7(benchmarks, tmp_path):
    from typer.testing import CliRunner

    from digseg_cli.cli.app import app

    args = ["train", "--base", "tiny", "--batch-size", "2", "--max-steps", "1", "--val-every", "0"]
    runner = CliRunner()
    done = runner.invoke(
        app, [*args, "--dataset", "cityscapes:2", "--data-root", str(benchmarks), "--out", str(tmp_path / "a")]
    )
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["datasets"][0]["weight"] == 2.0
    missing = runner.invoke(
        app, [*args, "--dataset", "ade20k", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "b")]
    )
    assert missing.exit_code == 7 and "Traceback" not in missing.output
    assert "ADE20K" in missing.output and "--data-root" in missing.output


def test_the_synthetic_scenes_by_name_are_generated_once_and_train_as_a_folder(tmp_path, one_torch_thread):
    from digseg_cli.data.benchmarks.catalog import get_spec

    root = tmp_path / "data-root"
    settings = TrainSettings(out=tmp_path / "run", datasets=["synth"], data_root=root, max_steps=1, val_every=1, **TINY)
    train(settings)
    folder = get_spec("synth").root(root)
    assert len(list((folder / "images").iterdir())) == 64
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["datasets"][0]["name"] == "synth" and run["datasets"][0]["kind"] == "folder"
    assert [c["name"] for c in run["classes"]] == ["road", "tree", "building", "water", "field"]
    assert "val_miou" in _records(tmp_path / "run")[-1]  # its held-out share validates
