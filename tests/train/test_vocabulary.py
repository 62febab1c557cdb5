"""Training vocabularies: more words per class, unrelated words trained as "nothing here", held-out words kept
out of training, and what a checkpoint records of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.data.vocabulary import load_vocabulary
from digseg_cli.errors import UsageError

runner = CliRunner()


@pytest.fixture(scope="module")
def synth32(tmp_path_factory) -> Path:
    from digseg_cli.data.synth import write_synth_dataset

    folder = tmp_path_factory.mktemp("synth") / "scenes"
    write_synth_dataset(folder, 16, seed=5, size=32)
    return folder


def test_the_shipped_vocabulary_holds_out_what_it_tests(tmp_path):
    vocabulary = load_vocabulary("synth")
    trained = vocabulary.training_words()
    held = [w for ws in vocabulary.held_out.values() for w in ws]
    assert len(held) >= 20 and len(vocabulary.held_out_unrelated) >= 10 and len(vocabulary.unrelated) >= 10
    assert not {w.lower() for w in [*held, *vocabulary.held_out_unrelated]} & trained
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text("classes: {road: [street, lane]}\nheld_out: {road: [Lane]}\n")
    with pytest.raises(UsageError, match="held-out words are also training words: Lane"):
        load_vocabulary(str(leaky))
    typo = tmp_path / "typo.yaml"
    typo.write_text("clases: {road: [street]}\n")
    with pytest.raises(UsageError, match="did you mean 'classes'"):
        load_vocabulary(str(typo))


def test_unrelated_words_are_asked_about_with_an_empty_target_and_synonyms_join_the_prompts(synth32):
    from digseg_cli.train.samples import SegmentationTrainDataset
    from digseg_cli.train.sources import pairs_source, prepare_data, with_synonyms

    vocabulary = load_vocabulary("synth")
    classes, pairs, _ = prepare_data(synth32, None, class_name=None, val_split=0.0, seed=0)
    (source,) = with_synonyms([pairs_source(pairs, classes)], vocabulary)
    road = next(c for c in source.classes if c.name == "road")
    assert road.prompts[:3] == ("road", "street", "highway") and "dirt road" in road.prompts
    dataset = SegmentationTrainDataset([source], 32, seed=0, absent_prob=1.0, unrelated=vocabulary.unrelated)
    samples = [dataset[(0, i % len(dataset))] for i in range(200)]
    unrelated = [s for s in samples if s["class_id"] is None]
    assert unrelated and all(s["prompt"] in vocabulary.unrelated and not s["target"].any() for s in unrelated)
    assert all(s["prompt"] not in vocabulary.unrelated for s in samples if s["class_id"] is not None)


def test_a_run_with_a_vocabulary_records_it_in_the_checkpoint(synth32, tmp_path, one_torch_thread):
    out = tmp_path / "run"
    args = ["train", "--data", str(synth32), "--out", str(out), "--base", "tiny-minilm", "--vocabulary", "synth"]
    args += ["--max-steps", "3", "--batch-size", "4", "--val-every", "3", "--save-every", "3", "--val-limit", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "last" / "digseg_config.json").read_text())
    vocabulary = load_vocabulary("synth")
    assert config["unrelated_words"] == list(vocabulary.unrelated)
    road = next(c for c in config["classes"] if c["name"] == "road")
    assert set(vocabulary.synonyms["road"]) <= set(road["synonyms"])
    assert "vocabulary: synth" in (out / "recipe.yaml").read_text()
    assert json.loads((out / "last" / "text_encoder" / "config.json").read_text())["weights"] == "minilm-l6-v2"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and np.isfinite(losses).all()


def test_an_unknown_vocabulary_is_one_clear_line(synth32, tmp_path):
    args = f"train --data {synth32} --out {tmp_path / 'r'} --base tiny --vocabulary nope --max-steps 1".split()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "not a shipped vocabulary (synth)" in result.output


def test_the_shipped_vocabularies_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from digseg_cli.data.vocabulary import VOCABULARIES_DIR

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in patterns["digseg_cli.data"] for p in (root / "digseg_cli" / "data").glob(pattern)}
    assert shipped == set(VOCABULARIES_DIR.glob("*.yaml")) and shipped
