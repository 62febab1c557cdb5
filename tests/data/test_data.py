"""digseg_cli.data.folders and digseg_cli.train.samples: class files, pairing, the folder check, split, Dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from digseg_cli.data.check import check_folder
from digseg_cli.data.folders import (
    ClassList,
    Pair,
    find_pairs,
    load_eval_pairs,
    parse_classes_txt,
    read_classes,
    scan_folder,
    split_pairs,
)
from digseg_cli.data.synth import write_synth_dataset
from digseg_cli.errors import DatasetError, UsageError
from digseg_cli.inference.images import write_image, write_label_png


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    return write_synth_dataset(tmp_path_factory.mktemp("synth") / "d", 8, seed=5, size=48).out_dir


def _write_pair(root, stem, labels, image_size=None, image_suffix=".png"):
    h, w = labels.shape
    ih, iw = image_size or (h, w)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    write_image(root / "images" / f"{stem}{image_suffix}", np.full((ih, iw, 3), 120, np.uint8))
    write_label_png(root / "masks" / f"{stem}.png", labels)


# --- class files -----------------------------------------------------------------------------------


def test_classes_json_full_and_plain(tmp_path):
    (tmp_path / "classes.json").write_text(
        json.dumps(
            {
                "classes": [
                    {"id": 1, "name": "road", "synonyms": ["street"], "color": "#ff0000"},
                    {"id": 2, "name": "tree"},
                ],
                "background": 0,
                "ignore_index": None,
            }
        )
    )
    cl = read_classes(tmp_path)
    assert cl.ids == (1, 2) and cl.names == ("road", "tree") and cl.ignore_index is None
    assert cl.by_id(1).prompts == ("road", "street") and cl.by_id(1).color == (255, 0, 0)
    (tmp_path / "classes.json").write_text(json.dumps({"0": "background", "1": "road", "7": "tree"}))
    cl = read_classes(tmp_path)
    assert cl.ids == (1, 7) and cl.ignore_index == 255
    (tmp_path / "classes.json").write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        read_classes(tmp_path)


def test_classes_txt_forms():
    assert parse_classes_txt("road\ntree | forest\n").ids == (1, 2)
    assert parse_classes_txt("background\nroad\ntree\n").ids == (1, 2)
    cl = parse_classes_txt("# comment\n0 background\n1: road | street | highway\n3 tree\n")
    assert cl.ids == (1, 3) and cl.by_id(1).synonyms == ("street", "highway")
    with pytest.raises(DatasetError, match="mixes"):
        parse_classes_txt("1 road\ntree\n")
    with pytest.raises(DatasetError, match="duplicate"):
        parse_classes_txt("1 road\n2 road\n")


def test_missing_class_file_and_binary(tmp_path):
    with pytest.raises(DatasetError, match="--class-name"):
        read_classes(tmp_path)
    cl = read_classes(tmp_path, class_name="road")
    assert cl.binary and cl.ids == (1,)
    assert cl.map_mask(np.array([[0, 255], [130, 20]], np.uint8)).tolist() == [[0, 1], [1, 0]]
    assert cl.map_mask(np.array([[0, 1]], np.uint8)).tolist() == [[0, 1]]


# --- pairing and split -----------------------------------------------------------------------------


def test_pairs_by_stem_and_suffix(tmp_path):
    labels = np.zeros((4, 4), np.uint8)
    _write_pair(tmp_path, "a", labels, image_suffix=".jpg")
    _write_pair(tmp_path, "sub/b", labels)
    write_image(tmp_path / "images" / "c_sat.png", np.zeros((4, 4, 3), np.uint8))
    write_label_png(tmp_path / "masks" / "c_mask.png", labels)
    (tmp_path / "images" / "README.txt").write_text("ignored side-car")
    pairs = find_pairs(tmp_path)
    assert [p.stem for p in pairs] == ["a", "c", "sub/b"]
    assert pairs[0].image.name == "a.jpg" and pairs[1].mask.name == "c_mask.png"


def test_split_is_deterministic():
    pairs = [Pair(f"{i:03d}", None, None) for i in range(20)]  # type: ignore[arg-type]
    train, val = split_pairs(list(reversed(pairs)), 0.25, seed=1)
    train2, val2 = split_pairs(pairs, 0.25, seed=1)
    assert train == train2 and val == val2 and len(val) == 5 and len(train) == 15
    assert {p.stem for p in train} | {p.stem for p in val} == {p.stem for p in pairs}
    assert split_pairs(pairs, 0.25, seed=2)[1] != val
    assert split_pairs(pairs, 0.0, seed=1) == (pairs, [])
    assert len(split_pairs(pairs[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(UsageError):
        split_pairs(pairs, 1.0, seed=0)


# --- check -----------------------------------------------------------------------------------------


def test_check_clean_synth_folder(synth_dir):
    report = check_folder(synth_dir)
    assert report.ok, report.problems
    assert report.n_pairs == 8 and report.min_size == [48, 48]
    assert [b.name for b in report.balance] == ["background", "road", "tree", "building", "water", "field"]
    assert abs(sum(b.pixel_fraction for b in report.balance) - 1.0) < 1e-9
    json.dumps(report.to_dict())


def test_check_names_every_bad_file(tmp_path):
    (tmp_path / "classes.txt").write_text("1 road\n2 tree\n")
    good = np.zeros((8, 8), np.uint8)
    good[2:4] = 1
    _write_pair(tmp_path, "good", good)
    _write_pair(tmp_path, "nomask", good)
    (tmp_path / "masks" / "nomask.png").unlink()
    write_label_png(tmp_path / "masks" / "orphan.png", good)
    _write_pair(tmp_path, "corrupt", good)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG garbage")
    _write_pair(tmp_path, "small", good, image_size=(6, 8))
    bad = good.copy()
    bad[0, 0] = 9
    _write_pair(tmp_path, "badlabel", bad)
    report = check_folder(tmp_path, workers=2)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "image without mask: images/nomask.png" in text
    assert "mask without image: masks/orphan.png" in text
    assert "unreadable: images/corrupt.png" in text
    assert "size mismatch: small: image 8x6, mask 8x8" in text
    assert "unknown label values in masks/badlabel.png: 9" in text
    assert "good" not in text
    assert len(report.problems) == 5


def test_check_binary_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "images" / "x.jpg", np.zeros((5, 5, 3), np.uint8))
    Image.fromarray(np.array([[0, 255, 250, 3, 0]] * 5, np.uint8)).save(tmp_path / "masks" / "x.jpg", quality=95)
    report = check_folder(tmp_path, class_name="crack")
    assert report.ok, report.problems
    assert report.balance[1].name == "crack" and report.balance[1].images == 1
    with pytest.raises(DatasetError):
        check_folder(tmp_path)  # no class file and no --class-name
    with pytest.raises(DatasetError, match="images/ and masks/"):
        check_folder(tmp_path / "images", class_name="crack")


# --- torch dataset ---------------------------------------------------------------------------------


def test_dataset_deterministic_and_absent_prompts(synth_dir):
    torch = pytest.importorskip("torch")
    from digseg_cli.train.samples import SegmentationTrainDataset
    from digseg_cli.train.sources import pairs_source

    classes = read_classes(synth_dir)
    pairs = find_pairs(synth_dir)
    ds = SegmentationTrainDataset(
        [pairs_source(pairs, classes)], 32, seed=3, absent_prob=0.5, prompt_template="a photo of {name}"
    )
    ds2 = SegmentationTrainDataset(
        [pairs_source(pairs, classes, cache=False)], 32, seed=3, absent_prob=0.5, prompt_template="a photo of {name}"
    )
    a, b = ds[2], ds2[2]
    assert a["pixel_values"].shape == (3, 32, 32) and a["target"].shape == (1, 32, 32) == a["valid"].shape
    assert a["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(a["pixel_values"].min()) and float(a["pixel_values"].max()) <= 1.0
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["target"], b["target"])
    assert a["prompt"] == b["prompt"] and a["class_id"] == b["class_id"]
    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(len(ds))]
    ds.set_epoch(0)
    assert torch.equal(ds[2]["pixel_values"], a["pixel_values"])
    assert any(not torch.equal(e["pixel_values"], ds[i]["pixel_values"]) for i, e in enumerate(epoch1))

    absent = present = 0
    prompts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            prompts.add(s["prompt"])
            assert s["prompt"].startswith("a photo of ")
            assert set(s["target"].unique().tolist()) <= {0.0, 1.0}
            if s["target"].sum() == 0:
                absent += 1
            else:
                present += 1
    assert absent > 5 and present > 5
    assert any(p.split("of ")[1] not in classes.names for p in prompts)  # synonyms are used


def test_dataset_absent_only_gives_empty_targets_and_eval_loader(synth_dir):
    pytest.importorskip("torch")
    from digseg_cli.train.samples import SegmentationTrainDataset
    from digseg_cli.train.sources import pairs_source

    classes = read_classes(synth_dir)
    pairs = find_pairs(synth_dir)
    ds = SegmentationTrainDataset([pairs_source(pairs, classes)], 48, seed=0, augment=False, absent_prob=1.0)
    for i, sample in enumerate(load_eval_pairs(pairs, classes)):
        s = ds[i]
        assert float(s["valid"].min()) == 1.0
        all_present = set(classes.ids) <= set(np.unique(sample.label).tolist())
        assert float(s["target"].sum()) == 0.0 or all_present  # absent whenever some class is absent
    with pytest.raises(UsageError):
        SegmentationTrainDataset([pairs_source(pairs, classes)], 24, seed=0, prompt_template="no field")
    samples = list(load_eval_pairs(pairs[:2], classes))
    assert [s.stem for s in samples] == [p.stem for p in pairs[:2]]
    assert samples[0].image.shape == (48, 48, 3) and samples[0].label.shape == (48, 48)


def test_scan_reports_duplicates(tmp_path):
    labels = np.zeros((4, 4), np.uint8)
    _write_pair(tmp_path, "a", labels)
    write_image(tmp_path / "images" / "a.jpg", np.zeros((4, 4, 3), np.uint8))
    assert scan_folder(tmp_path).duplicates == ["images/a.jpg", "images/a.png"]
    assert not check_folder(tmp_path, class_name="x").ok


def test_classlist_validation():
    from digseg_cli.data.folders import ClassSpec

    with pytest.raises(DatasetError, match="background"):
        ClassList((ClassSpec(0, "road"),))
    with pytest.raises(DatasetError, match="ignore"):
        ClassList((ClassSpec(255, "road"),))
