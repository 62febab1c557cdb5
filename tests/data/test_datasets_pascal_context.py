"""PASCAL-Context from the official release: tiny ``trainval/<id>.mat`` fixtures (written with scipy, as MATLAB
would) are converted on first use into the PC-459 TIFFs and PC-59 PNGs, then read back with each protocol's
ignore values."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from layouts import H, W, img, write_label_map

from digseg_cli.data.benchmarks import catalog as D
from digseg_cli.data.benchmarks import classnames
from digseg_cli.data.benchmarks.pascal_context import PC59_IDS, convert_labels
from digseg_cli.errors import DatasetError

# One official LabelMap row: unlabelled 0, aeroplane 2, accordion 1, table 397, wood 458, wool 459, person 284
LABEL_MAP = [0, 2, 1, 397, 458, 459, 284]
PC459_EXPECTED = [65535, 1, 0, 396, 457, 458, 283]
PC59_EXPECTED = [255, 0, 255, PC59_IDS.index(397), 58, 255, PC59_IDS.index(284)]


def write_mat(path: Path, values) -> Path:
    label = np.full((H, W), 284, dtype=np.uint16)
    label.reshape(-1)[: len(values)] = values
    return write_label_map(path, label)


def official_tree(root: Path, val_ids=("2008_000002",), train_ids=("2008_000003",)) -> Path:
    voc = root / "pascal-context/VOCdevkit/VOC2010"
    for stem in (*val_ids, *train_ids):
        img(voc / f"JPEGImages/{stem}.jpg")
        write_mat(voc / f"trainval/{stem}.mat", LABEL_MAP)
    (voc / "ImageSets/Main").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets/Main/val.txt").write_text("\n".join([*val_ids, "2008_000099"]) + "\n")  # 099: no .mat
    return voc


def test_pc59_ids_are_the_459_names_of_the_59_classes():
    assert len(PC59_IDS) == len(set(PC59_IDS)) == 59 and list(PC59_IDS) == sorted(PC59_IDS)
    for pc_id, name in zip(PC59_IDS, classnames.PC59, strict=True):
        assert classnames.PC459[pc_id - 1] == ("table" if name == "diningtable" else name)


def test_official_mat_converted_on_first_use_and_read_with_ignore(tmp_path, caplog):
    voc = official_tree(tmp_path)
    with caplog.at_level(logging.INFO, logger="digseg"):
        ds459 = D.open_dataset(D.DATASETS["pascal-context-459"], data_root=tmp_path)
    assert "1/1 converted" in caplog.text
    conv = voc / "annotations_detectron2"
    assert sorted(p.name for p in conv.iterdir()) == ["pc459_val", "pc59_val"]  # no partial folders left
    assert [p.name for p in (conv / "pc459_val").iterdir()] == ["2008_000002.tif"]  # val only
    assert len(ds459) == 1 and ds459.spec.ignore_index == 65535
    assert ds459[0].label.reshape(-1)[:7].tolist() == PC459_EXPECTED
    ds59 = D.open_dataset(D.DATASETS["pascal-context-59"], data_root=tmp_path)
    assert ds59.spec.ignore_index == 255 and ds59[0].label.reshape(-1)[:7].tolist() == PC59_EXPECTED
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="digseg"):
        assert D.check_layout(D.DATASETS["pascal-context-59"], data_root=tmp_path).ok
    assert "converting" not in caplog.text  # done once


def test_cat_seg_val_list_wins_and_existing_conversions_are_kept(tmp_path):
    voc = official_tree(tmp_path, val_ids=("2008_000002", "2008_000004"))
    (voc / "pascalcontext_val.txt").write_text("2008_000004\n")
    (voc / "annotations_detectron2/pc59_val").mkdir(parents=True)  # e.g. from CAT-Seg: left as it is
    convert_labels(tmp_path / "pascal-context")
    assert [p.name for p in (voc / "annotations_detectron2/pc459_val").iterdir()] == ["2008_000004.tif"]
    assert list((voc / "annotations_detectron2/pc59_val").iterdir()) == []


def test_missing_pieces_say_what_to_do(tmp_path):
    voc = official_tree(tmp_path)
    (voc / "ImageSets/Main/val.txt").unlink()
    with pytest.raises(DatasetError, match="no validation list"):
        D.open_dataset(D.DATASETS["pascal-context-459"], data_root=tmp_path)
    img(tmp_path / "images-only/pascal-context/VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg")
    with pytest.raises(DatasetError, match=r"pc59_val \(PC-59 labels\).*--download.*trainval"):
        D.open_dataset(D.DATASETS["pascal-context-59"], data_root=tmp_path / "images-only")


def test_bad_label_map_names_the_file_and_leaves_no_partial_output(tmp_path):
    voc = official_tree(tmp_path)
    write_mat(voc / "trainval/2008_000002.mat", [460])
    with pytest.raises(DatasetError, match="2008_000002.mat"):
        D.open_dataset(D.DATASETS["pascal-context-59"], data_root=tmp_path)
    assert list((voc / "annotations_detectron2").iterdir()) == []


def test_unreadable_mat_file_is_one_clear_error(tmp_path):
    voc = tmp_path / "pascal-context" / "VOCdevkit" / "VOC2010"
    (voc / "trainval").mkdir(parents=True)
    bad = voc / "trainval" / "x.mat"
    bad.write_bytes(b"not a mat file")
    from digseg_cli.data.benchmarks.pascal_context import _read_label_map

    with pytest.raises(DatasetError, match="cannot read LabelMap from .*x.mat"):
        _read_label_map(bad)
    sio.savemat(voc / "trainval" / "y.mat", {"other": np.ones((2, 2))})
    with pytest.raises(DatasetError, match="cannot read LabelMap"):
        _read_label_map(voc / "trainval" / "y.mat")
