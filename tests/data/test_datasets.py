"""Dataset adapters: a tiny fixture tree in each official layout (8×8 images) read by each loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from layouts import WRITERS, H, W, img, mask, rgb_mask, write_pascal_context

from digseg_cli.data.benchmarks import catalog as D
from digseg_cli.data.benchmarks import classnames
from digseg_cli.errors import DatasetError, UsageError


def first_label(name: str, root: Path, split: str | None = None) -> np.ndarray:
    ds = D.open_dataset(D.get_spec(name), split=split, data_root=root)
    sample = ds[0]
    assert sample.image.shape == (H, W, 3) and sample.image.dtype == np.uint8
    assert sample.label.dtype == np.int64 and sample.label.shape == (H, W)
    return sample.label.reshape(-1)


def test_registry_names_and_class_lists():
    expected = {
        "ade20k": 150,
        "ade20k-full": 847,
        "pascal-context-59": 59,
        "pascal-context-459": 459,
        "coco-stuff": 171,
        "cityscapes": 19,
        "phenobench": 3,
        "deepglobe": 2,
        "refuge2": 3,
    }
    for name, n in expected.items():
        assert D.DATASETS[name].num_classes == n, name
    assert classnames.ADE150[7] == "bed" and classnames.PC459[-1] == "wool"
    assert D.get_spec("a847").prompts[1] == ["building", "edifice"]  # WordNet synonym strings split
    assert D.get_spec("coco") is D.DATASETS["coco-stuff"]
    with pytest.raises(UsageError, match="unknown dataset"):
        D.get_spec("imagenet")


def test_ade20k_reduce_zero_label(tmp_path):
    base = tmp_path / "ade20k/ADEChallengeData2016"
    img(base / "images/validation/ADE_val_00000001.jpg")
    mask(base / "annotations/validation/ADE_val_00000001.png", [0, 1, 150, 7])
    img(base / "images/validation/ADE_val_00000002.jpg")  # no annotation: skipped, reported by check
    assert first_label("ade20k", tmp_path)[:4].tolist() == [255, 0, 149, 6]
    report = D.check_layout(D.DATASETS["ade20k"], data_root=tmp_path)
    assert report.images == 2 and report.labels == 1 and not report.ok
    assert any("ADE_val_00000002" in m for m in report.missing)


def test_ade20k_full_uint16_tif(tmp_path):
    base = tmp_path / "ade20k-full/ADE20K_2021_17_01"
    img(base / "images_detectron2/validation/ADE_val_00000001.jpg")
    mask(base / "annotations_detectron2/validation/ADE_val_00000001.tif", [0, 846, 65535], mode="I;16")
    assert first_label("ade20k-full", tmp_path)[:3].tolist() == [0, 846, 65535]


def test_ade20k_full_raw_release_says_to_convert(tmp_path):
    img(tmp_path / "ade20k-full/ADE20K_2021_17_01/images/ADE/validation/x/ADE_val_00000001.jpg")
    with pytest.raises(DatasetError, match="prepare_ade20k_full.py"):
        D.open_dataset(D.DATASETS["ade20k-full"], data_root=tmp_path)


def test_pascal_context_59_detectron2_and_mmseg(tmp_path):
    voc = tmp_path / "pascal-context/VOCdevkit/VOC2010"
    img(voc / "JPEGImages/2008_000002.jpg")
    img(voc / "JPEGImages/2008_000003.jpg")  # a train image: no PC-59 val label, not part of the split
    mask(voc / "annotations_detectron2/pc59_val/2008_000002.png", [0, 58, 255])
    assert first_label("pascal-context-59", tmp_path)[:3].tolist() == [0, 58, 255]
    assert len(D.open_dataset(D.DATASETS["pascal-context-59"], data_root=tmp_path)) == 1
    root2 = tmp_path / "mm"
    voc2 = root2 / "pascal-context/VOCdevkit/VOC2010"
    img(voc2 / "JPEGImages/2008_000002.jpg")
    mask(voc2 / "SegmentationClassContext/2008_000002.png", [0, 1, 59])
    assert first_label("pascal-context-59", root2)[:3].tolist() == [255, 0, 58]


def test_pascal_context_459_tif(tmp_path):
    voc = tmp_path / "pascal-context/VOCdevkit/VOC2010"
    img(voc / "JPEGImages/2008_000002.jpg")
    mask(voc / "annotations_detectron2/pc459_val/2008_000002.tif", [0, 458, 12], mode="I;16")
    assert first_label("pascal-context-459", tmp_path)[:3].tolist() == [0, 458, 12]


def test_coco_stuff_palette_png_and_171_lut(tmp_path):
    base = tmp_path / "coco-stuff"
    img(base / "images/val2017/000000000139.jpg")
    # stored value = COCO-Stuff id − 1: person 0, (unused 11), stop sign 12, banner 91, wood 181, unlabelled 255
    mask(base / "annotations/val2017/000000000139.png", [0, 11, 12, 91, 181, 255], palette=True)
    assert first_label("coco-stuff", tmp_path)[:6].tolist() == [0, 255, 11, 80, 170, 255]


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    base = tmp_path / "cityscapes"
    img(base / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    mask(base / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", [7, 8, 33, 0, 1, 26])
    assert first_label("cityscapes", tmp_path)[:6].tolist() == [0, 1, 18, 255, 255, 13]
    mask(base / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png", [5, 255])  # preferred
    assert first_label("cityscapes", tmp_path)[:2].tolist() == [5, 255]


def test_deepglobe_road_binarised_and_split_file(tmp_path):
    base = tmp_path / "deepglobe-road/train"
    for i in (1, 2):
        img(base / f"{i}_sat.jpg")
        mask(base / f"{i}_mask.png", [0, 127, 128, 250])
    assert first_label("deepglobe", tmp_path)[:4].tolist() == [0, 0, 1, 1]
    assert len(D.open_dataset(D.DATASETS["deepglobe"], data_root=tmp_path)) == 2  # no test.txt: all tiles
    (tmp_path / "deepglobe-road/test.txt").write_text("2_sat.jpg\n")
    ds = D.open_dataset(D.DATASETS["deepglobe"], data_root=tmp_path)
    assert [it.stem for it in ds.items] == ["2"]


def test_deepglobe_landcover_colours(tmp_path):
    base = tmp_path / "deepglobe-landcover/train"
    img(base / "10_sat.jpg")
    colours = [
        (0, 255, 255),
        (255, 255, 0),
        (255, 0, 255),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 255),
        (0, 0, 0),
        (250, 3, 252),
    ]
    rgb_mask(base / "10_mask.png", colours)
    assert first_label("deepglobe-landcover", tmp_path)[:8].tolist() == [0, 1, 2, 3, 4, 5, 255, 2]


def test_refuge_official_bmp_disc_includes_cup(tmp_path):
    base = tmp_path / "refuge2"
    img(base / "REFUGE-Test400/Test400/T0001.jpg")
    mask(base / "REFUGE-Test-GT/Disc_Cup_Masks/T0001.bmp", [255, 128, 0, 255])
    img(base / "REFUGE-Training400/Training400/Glaucoma/g0001.jpg")
    mask(base / "Annotation-Training400/Disc_Cup_Masks/Glaucoma/g0001.bmp", [0])
    assert first_label("refuge2", tmp_path)[:4].tolist() == [0, 1, 2, 0]
    assert [it.stem for it in D.open_dataset(D.DATASETS["refuge2"], data_root=tmp_path).items] == ["T0001"]
    assert [it.stem for it in D.open_dataset(D.DATASETS["refuge2"], split="train", data_root=tmp_path).items] == [
        "g0001"
    ]


def test_refuge_multirater_majority_vote(tmp_path):
    case = tmp_path / "refuge2/Test-400/T0002"
    img(case / "T0002.jpg")
    for r in range(1, 8):
        mask(case / f"T0002_seg_disc_{r}.png", [255, 255, 255 if r <= 4 else 0, 0])
        mask(case / f"T0002_seg_cup_{r}.png", [255 if r <= 3 else 0, 0, 0, 0])
    assert first_label("refuge2", tmp_path)[:4].tolist() == [1, 1, 1, 0]


def test_phenobench_partials_merged(tmp_path):
    base = tmp_path / "phenobench/PhenoBench/val"
    img(base / "images/05-15_00028_P0030852.png")
    mask(base / "semantics/05-15_00028_P0030852.png", [0, 1, 2, 3, 4])
    assert first_label("phenobench", tmp_path)[:5].tolist() == [0, 1, 2, 1, 2]


def test_user_folder_contiguous_labels(tmp_path):
    folder = tmp_path / "mine"
    img(folder / "images/a.png")
    mask(folder / "masks/a.png", [0, 1, 3, 255])
    (folder / "classes.txt").write_text("1 road\n3 tree | forest\n")
    spec = D.get_spec(str(folder))
    assert spec.label_names == ("background", "road", "tree") and spec.prompts[1] == ["tree", "forest"]
    sample = D.open_dataset(spec)[0]
    assert sample.label.reshape(-1)[:4].tolist() == [0, 1, 2, 255]
    mask(folder / "masks/a.png", [0, 2])
    with pytest.raises(DatasetError, match="neither the background"):
        D.open_dataset(spec)[0]


def test_synth_is_generated_once_into_the_data_root(tmp_path, monkeypatch):
    from digseg_cli.data.benchmarks import local as folders

    assert D.get_spec("synth").name == "synth" and D.get_spec("synth").label_names[0] == "background"
    monkeypatch.setattr(folders, "SYNTH_COUNT", 3)
    spec = folders.synth_spec()
    ds = D.open_dataset(spec, data_root=tmp_path)
    assert len(ds) == 3 and ds.root.name == f"seed{folders.SYNTH_SEED}-n3-s128"
    assert ds.root.is_relative_to(tmp_path) and ds[0].label.max() <= 5


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGSEG_DATA_ROOT", str(tmp_path / "env-root"))
    assert D.default_data_root() == tmp_path / "env-root"
    with pytest.raises(DatasetError) as err:
        D.open_dataset(D.DATASETS["cityscapes"])
    msg = str(err.value)
    assert err.value.exit_code == 7
    assert "cityscapes-dataset.com" in msg and str(tmp_path / "env-root" / "cityscapes") in msg
    with pytest.raises(DatasetError, match="--download"):
        D.open_dataset(D.DATASETS["ade20k"], data_root=tmp_path)
    with pytest.raises(DatasetError, match="grand-challenge"):
        D.download_dataset(D.DATASETS["refuge2"], data_root=tmp_path)
    with pytest.raises(UsageError, match="split"):
        D.open_dataset(D.DATASETS["cityscapes"], split="nope", data_root=tmp_path)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_shared_layout_writers_are_read_back_by_the_catalog(tmp_path, name):
    """tests/layouts.py: what each writer says it wrote is what the catalog reads, split by split."""
    layout = WRITERS[name](tmp_path, n=3, size=(6, 10), seed=1)
    spec = D.get_spec(name)
    assert layout.dataset == spec.name and layout.ignore_index == spec.ignore_index
    for split in spec.splits:
        ds = D.open_dataset(spec, split=split, data_root=layout.data_root)
        assert [s.stem for s in ds.items] == layout.stems(split)
        for sample in ds:
            assert sample.image.shape == (6, 10, 3)
            np.testing.assert_array_equal(sample.label, layout.labels[split][sample.stem])
        labels = np.stack(list(layout.labels[split].values()))
        assert (labels == spec.ignore_index).any() and len(np.unique(labels)) > 2  # not all ignore, not one class
    assert sorted(layout.labels) == ["train", "val"]  # the train split is written even where eval reads only val


def test_pascal_context_writer_serves_both_benchmarks_from_one_release(tmp_path):
    both = write_pascal_context(tmp_path, n=2, seed=3)
    pc59, pc459 = both["pascal-context-59"].labels["val"], both["pascal-context-459"].labels["val"]
    assert pc59.keys() == pc459.keys() and all((pc59[s] != 255).any() for s in pc59)
    assert (tmp_path / "pascal-context/VOCdevkit/VOC2010/ImageSets/Main/train.txt").read_text().split() == [
        "2009_000001",
        "2009_000002",
    ]
