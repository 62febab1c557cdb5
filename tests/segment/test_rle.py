"""COCO RLE, detectron2's `sem_seg_predictions.json`: `segment --rle` writes it, `eval --predictions FILE.json`
scores it exactly as the label maps it encodes; resumed runs keep every record; no pycocotools is one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from layouts import write_cityscapes, write_coco_stuff, write_predictions
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.errors import DatasetError, UsageError
from digseg_cli.inference import coco_rle, prompts
from digseg_cli.inference.images import read_mask
from digseg_cli.segment import run as seg
from digseg_cli.segment import settings as seg_settings

SIZE = (24, 32)  # (H, W)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    from digseg_cli.inference.pipeline import load_pipeline

    return load_pipeline("tiny")


def _settings(**kw) -> seg_settings.SegmentSettings:
    classes, _ = prompts.parse_prompts(kw.pop("prompt", "road, tree"))
    return seg_settings.SegmentSettings(classes=tuple(classes), threshold=0.0, overlay=False, **kw)


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*SIZE, 3), np.uint8)).save(path)
    return path


def _records(out: Path) -> list[dict]:
    return json.loads((out / "sem_seg_predictions.json").read_text())


def _label_maps(records: list[dict]) -> dict[str, np.ndarray]:
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["file_name"], []).append(r)
    return {name: coco_rle.decode_records(recs, name) for name, recs in by_name.items()}


# ------------------------------------------------------------------------------------------------ the codec
def test_records_are_detectron2s_and_decode_back():
    labels = np.zeros((5, 7), np.uint8)
    labels[1:3, 2:6], labels[4, :] = 2, 5  # background, 2 and 5 present; 1 absent
    records = coco_rle.encode_label_map(labels, "city/a.png")
    assert [r["category_id"] for r in records] == [0, 2, 5]  # every label present, background included
    for r in records:
        assert set(r) == {"file_name", "category_id", "segmentation"} and r["file_name"] == "city/a.png"
        # detectron2's own call: np.array(mask[:, :, None], order="F") through pycocotools, counts as UTF-8 text
        mask = (labels == r["category_id"]).astype(np.uint8)
        expected = mask_util.encode(np.array(mask[:, :, None], order="F"))[0]
        assert r["segmentation"] == {"size": [5, 7], "counts": expected["counts"].decode("utf-8")}
    np.testing.assert_array_equal(coco_rle.decode_records(records, "a"), labels)
    assert coco_rle.encode_label_map(labels, "a", category_ids=[10, 11, 12, 13, 14, 15])[1]["category_id"] == 12
    mapped = coco_rle.decode_records(records, "a", {0: 1, 2: 0, 5: 2})  # category id → label id
    np.testing.assert_array_equal(mapped, np.select([labels == 0, labels == 2], [1, 0], 2))
    with pytest.raises(DatasetError, match="28 of 35 pixels are in no record"):
        coco_rle.decode_records(records[2:], "a")
    with pytest.raises(DatasetError, match="overlap"):
        coco_rle.decode_records([*records, records[1]], "a")
    with pytest.raises(DatasetError, match="category_id 5 is not one of"):
        coco_rle.decode_records(records, "a", {0: 0, 2: 1})
    broken = {**records[0], "segmentation": {"size": [5, 7], "counts": "zzzz"}}
    with pytest.raises(DatasetError, match="counts of category_id 0 do not decode"):
        coco_rle.decode_records([broken, *records[1:]], "a")


def test_a_malformed_file_is_one_line_naming_the_record(tmp_path):
    path = tmp_path / "p.json"
    for content, message in [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "must hold a JSON list"),
        ('[{"file_name": "a.png", "category_id": 1}]', "record 0 has no segmentation"),
        ('[{"file_name": "a.png", "category_id": "x", "segmentation": {}}]', "category_id must be an integer"),
        ('[{"file_name": "a.png", "category_id": 1, "segmentation": [[0, 0, 1, 1]]}]', "must be COCO RLE"),
    ]:
        path.write_text(content)
        with pytest.raises(UsageError, match=message):
            coco_rle.read_records(path)


# ------------------------------------------------------------------------------------------ segment --rle
def test_segment_rle_writes_every_label_map_and_resumes_without_losing_records(tmp_path, pipe):
    for i, name in enumerate(("a.png", "sub/b.png")):
        _image(tmp_path / "in" / name, i)
    out, results = tmp_path / "out", []
    summary = seg.run_segment(
        [str(tmp_path / "in")], out, pipe, _settings(rle=True, recursive=True), on_result=results.append
    )
    assert summary.processed == 2 and all(r.outputs["rle"] == str(out / "sem_seg_predictions.json") for r in results)
    first = (out / "sem_seg_predictions.json").read_text()
    maps = _label_maps(_records(out))
    assert list(maps) == ["a.png", "sub/b.png"]  # file_name: the input's relative path, in input order
    for name, key in (("a.png", "a"), ("sub/b.png", "sub/b")):
        np.testing.assert_array_equal(maps[name], read_mask(out / f"{key}.mask.png"))
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["rle"] is True and "sem_seg_predictions.json" in manifest["outputs"]["rle"]

    # A killed run leaves no file: --skip-existing encodes the skipped images' records from their label maps.
    (out / "sem_seg_predictions.json").unlink()
    resumed = seg.run_segment(
        [str(tmp_path / "in")], out, pipe, _settings(rle=True, recursive=True, skip_existing=True)
    )
    assert resumed.skipped == 2 and (out / "sem_seg_predictions.json").read_text() == first

    # A new image joins the earlier ones, which keep their records (from the file) and their place.
    _image(tmp_path / "in/c.png", 7)
    seg.run_segment([str(tmp_path / "in")], out, pipe, _settings(rle=True, recursive=True, skip_existing=True))
    assert list(_label_maps(_records(out))) == ["a.png", "sub/b.png", "c.png"]
    # Another input set into the same folder: images it does not touch keep their records.
    seg.run_segment([str(tmp_path / "in/c.png")], out, pipe, _settings(rle=True, skip_existing=True))
    assert len(_label_maps(_records(out))) == 3
    # --overwrite starts the file afresh: this run's images only.
    seg.run_segment([str(tmp_path / "in/c.png")], out, pipe, _settings(rle=True, overwrite=True))
    assert list(_label_maps(_records(out))) == ["c.png"]


def test_segment_rle_refusals(tmp_path, pipe):
    _image(tmp_path / "in/a.png", 0)
    out = tmp_path / "out"
    seg.run_segment([str(tmp_path / "in")], out, pipe, _settings(rle=True))
    # A run without --rle would leave the file behind its outputs: it is another run (as for --save-probs).
    with pytest.raises(UsageError, match="settings.rle true there, false now"):
        seg.run_segment([str(tmp_path / "in")], out, pipe, _settings(skip_existing=True))
    (out / "sem_seg_predictions.json").write_text("[{")
    with pytest.raises(UsageError, match="sem_seg_predictions.json is not valid JSON.*--overwrite"):
        seg.run_segment([str(tmp_path / "in")], out, pipe, _settings(rle=True, skip_existing=True))


def test_without_pycocotools_rle_is_one_line_exit_2(tmp_path, monkeypatch):
    from digseg_cli.cli.app import app

    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(UsageError, match=r'`--rle` needs pycocotools \(COCO RLE\): pip install "digseg\[coco\]"'):
        _settings(rle=True)
    _image(tmp_path / "a.png", 0)
    runner = CliRunner()
    result = runner.invoke(app, ["segment", str(tmp_path / "a.png"), "-p", "road", "--rle", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and 'pip install "digseg[coco]"' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    (tmp_path / "p.json").write_text("[]")
    result = runner.invoke(app, ["eval", "-d", str(tmp_path), "--predictions", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and 'pip install "digseg[coco]"' in result.stderr and "Traceback" not in result.output


# ----------------------------------------------------------------------------- eval --predictions FILE.json
def _user_folder(root: Path, n: int = 3) -> Path:
    """A training-layout folder (a benchmark by path): label 0 background, 1 road, 2 tree."""
    rng = np.random.default_rng(3)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        _image(root / f"images/im{i}.png", 10 + i)
        Image.fromarray(rng.integers(0, 3, SIZE).astype(np.uint8)).save(root / f"masks/im{i}.png")
    (root / "classes.txt").write_text("road\ntree\n")
    return root


def _scores(dataset: str, predictions: Path, out: Path, data_root: Path | None = None) -> str:
    """metrics.json's numbers and the per-image rows (as JSON text: NaN IoUs of absent classes compare equal)."""
    from digseg_cli.evaluate.run import EvalSettings, run_eval

    settings = EvalSettings(dataset=dataset, data_root=data_root, predictions=predictions, out=out)
    result = run_eval(settings).result
    numbers = {k: v for k, v in result.metrics.items() if k not in ("source", "settings", "label_mode")}
    return json.dumps([numbers, result.per_image, result.confusion.tolist()], sort_keys=True, default=str)


def _miou(scores: str) -> float:
    return json.loads(scores)[0]["metrics"]["miou"]


def test_label_maps_and_their_records_score_identically(tmp_path, pipe):
    data = _user_folder(tmp_path / "data")
    out = tmp_path / "seg"
    seg.run_segment([str(data / "images")], out, pipe, _settings(rle=True))
    folder = tmp_path / "maps"
    folder.mkdir()
    for i in range(3):  # the label maps as a folder of <stem>.png
        shutil.copy(out / f"im{i}.mask.png", folder / f"im{i}.png")
    from_maps = _scores(str(data), folder, tmp_path / "r1")
    from_records = _scores(str(data), out / "sem_seg_predictions.json", tmp_path / "r2")
    assert from_maps == from_records and 0 < _miou(from_maps) < 1  # not vacuous
    assert json.loads((tmp_path / "r2/metrics.json").read_text())["label_mode"] == "COCO RLE records"
    # A missing image is the folder case's error; so is a record set that matches an image twice.
    records = _records(out)
    path = tmp_path / "some.json"
    path.write_text(json.dumps([r for r in records if r["file_name"] != "im1.png"]))
    with pytest.raises(DatasetError, match="1 of 3 images have no prediction in .*some.json.* im1"):
        _scores(str(data), path, tmp_path / "r3")
    path.write_text(
        json.dumps(records + [{**r, "file_name": "other/im1.jpg"} for r in records if r["file_name"] == "im1.png"])
    )
    with pytest.raises(UsageError, match="im1.png and other/im1.jpg both match image im1"):
        _scores(str(data), path, tmp_path / "r3")


def test_benchmark_ids_and_image_names_as_detectron2_writes_them(tmp_path):
    """COCO-Stuff records name classes by COCO-Stuff id (detectron2's stuff_dataset_id_to_contiguous_id);
    Cityscapes records name the image file, `<stem>_leftImg8bit.png`, under its folders."""
    from digseg_cli.data.benchmarks.catalog import get_spec

    for dataset, writer, image_name in [
        ("coco-stuff", write_coco_stuff, "datasets/coco/val2017/{stem}.jpg"),
        ("cityscapes", write_cityscapes, "leftImg8bit/val/{stem}_leftImg8bit.png"),
    ]:
        layout = writer(tmp_path / dataset, n=3)
        maps = write_predictions(layout, tmp_path / f"{dataset}-maps", wrong=0.3)
        ids = get_spec(dataset).category_ids
        records = [
            r
            for stem in layout.stems()
            for r in coco_rle.encode_label_map(read_mask(maps / f"{stem}.png"), image_name.format(stem=stem), ids)
        ]
        path = tmp_path / f"{dataset}.json"
        coco_rle.write_records(path, records)
        if dataset == "coco-stuff":  # train id 11 is COCO-Stuff id 13 (12 has no masks)
            assert ids[:13] == (*range(1, 12), 13, 14) and len(ids) == 171
        from_maps = _scores(dataset, maps, tmp_path / f"{dataset}-r1", tmp_path / dataset)
        from_records = _scores(dataset, path, tmp_path / f"{dataset}-r2", tmp_path / dataset)
        assert from_maps == from_records and 0 < _miou(from_maps) < 1


def test_the_cli_writes_records_and_scores_them(tmp_path):
    from digseg_cli.cli.app import app

    data = _user_folder(tmp_path / "data", n=2)
    runner, out = CliRunner(), tmp_path / "seg"
    args = ["segment", str(data / "images"), "-p", "road, tree", "-w", "tiny", "--threshold", "0", "--no-overlay"]
    result = runner.invoke(app, [*args, "--rle", "--save-confidence", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["outputs"]["rle"] == str(out / "sem_seg_predictions.json") and "margin" in lines[0]["outputs"]
    scored = runner.invoke(
        app,
        [
            "eval",
            "-d",
            str(data),
            "--predictions",
            str(out / "sem_seg_predictions.json"),
            "--json",
            "-o",
            str(tmp_path / "r"),
        ],
    )
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["num_images"] == 2


class _StopSecond:
    """The pipeline, with Ctrl-C on its second call (the first image is done, the second not)."""

    def __init__(self, pipe):
        self._pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self._pipe(*args, **kw)


def test_records_are_written_after_ctrl_c_and_a_full_disk_is_one_line(tmp_path, pipe, monkeypatch):
    import errno

    from digseg_cli.errors import InterruptedRunError, OutputUnwritableError

    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / "in" / name, len(name))
    out = tmp_path / "out"
    with pytest.raises(InterruptedRunError):
        seg.run_segment([str(tmp_path / "in")], out, _StopSecond(pipe), _settings(rle=True))
    assert list(_label_maps(_records(out))) == ["a.png"]  # what was done is in the file

    # The disk refuses the file at the end: one line (exit 2), the manifest still written.
    def full(path, records):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(coco_rle, "write_records", full)
    with pytest.raises(OutputUnwritableError, match=r"cannot write .*sem_seg_predictions.json: No space left"):
        seg.run_segment([str(tmp_path / "in")], out, pipe, _settings(rle=True, skip_existing=True))
    assert json.loads((out / "run.json").read_text())["counts"]["processed"] == 2
