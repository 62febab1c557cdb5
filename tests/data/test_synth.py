"""digseg_cli.data.synth: determinism, class variety, the folder it writes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from digseg_cli.data.synth import SYNTH_CLASSES, generate_scene, make_scene_image, scene_rng, write_synth_dataset
from digseg_cli.errors import UsageError
from digseg_cli.inference.images import read_image, read_mask


def _digest(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = _digest(write_synth_dataset(tmp_path / "a", 4, seed=3).out_dir)
    b = _digest(write_synth_dataset(tmp_path / "b", 4, seed=3).out_dir)
    c = _digest(write_synth_dataset(tmp_path / "c", 4, seed=4).out_dir)
    assert a == b
    assert a["images/00000.png"] != c["images/00000.png"]
    assert sorted(a) == ["classes.json"] + [f"images/0000{i}.png" for i in range(4)] + [
        f"masks/0000{i}.png" for i in range(4)
    ]


def test_scene_shapes_and_labels():
    image, mask = generate_scene(scene_rng(0, 0), size=96)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 4, 5}
    assert np.array_equal(make_scene_image(0, 96), image)
    with pytest.raises(UsageError):
        generate_scene(scene_rng(0, 0), size=8)


def test_class_presence_varies():
    present = np.zeros((60, 6), bool)
    for i in range(60):
        _, mask = generate_scene(scene_rng(7, i), size=64)
        present[i, np.unique(mask)] = True
    freq = present[:, 1:].mean(axis=0)
    assert (freq > 0.2).all() and (freq < 0.95).all(), freq  # every class present in some, absent in others
    assert len({tuple(r) for r in present}) > 8  # many different class subsets
    assert present[:, 0].mean() > 0.9  # background nearly always visible


def test_classes_distinguishable_by_colour():
    """Mean colours per class differ (a tiny model has something to learn)."""
    sums = {k: np.zeros(3) for k in range(6)}
    counts = dict.fromkeys(range(6), 0)
    for i in range(30):
        image, mask = generate_scene(scene_rng(1, i), size=64)
        for k in range(6):
            sel = mask == k
            sums[k] += image[sel].sum(axis=0)
            counts[k] += int(sel.sum())
    means = {k: sums[k] / max(counts[k], 1) for k in range(6)}
    assert means[4][2] > means[4][0]  # water is bluish
    assert means[2][1] > means[2][0] and means[2][1] > means[2][2]  # trees are green
    for a in range(6):
        for b in range(a + 1, 6):
            assert np.abs(means[a] - means[b]).max() > 12, (a, b, means[a], means[b])


def test_written_folder_is_readable(tmp_path):
    summary = write_synth_dataset(tmp_path / "d", 3, seed=0, size=64)
    assert summary.n == 3 and set(summary.images_with_class) == {"road", "tree", "building", "water", "field"}
    assert json.loads((tmp_path / "d" / "classes.json").read_text()) == SYNTH_CLASSES
    image = read_image(tmp_path / "d" / "images" / "00001.png")
    mask = read_mask(tmp_path / "d" / "masks" / "00001.png")
    ref_image, ref_mask = generate_scene(scene_rng(0, 1), size=64)
    assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)


def test_refuses_non_empty_folder_and_overwrite_removes_stale(tmp_path):
    out = tmp_path / "d"
    write_synth_dataset(out, 3, seed=0, size=32)
    with pytest.raises(UsageError, match="--overwrite"):
        write_synth_dataset(out, 2, seed=0, size=32)
    (out / "notes.md").write_text("mine")
    write_synth_dataset(out, 2, seed=1, size=32, overwrite=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "notes.md").read_text() == "mine"


def test_progress_callback(tmp_path):
    calls = []
    write_synth_dataset(tmp_path / "d", 3, seed=0, size=32, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_zoom_draws_objects_larger():
    """`zoom=2` doubles object sizes: building footprints grow about 4x in area."""
    import cv2

    def median_building_area(zoom: float) -> float:
        areas = []
        for i in range(40):
            _, mask = generate_scene(scene_rng(5, i), size=64, zoom=zoom)
            n, _, stats, _ = cv2.connectedComponentsWithStats((mask == 3).astype(np.uint8))
            areas += list(stats[1:n, cv2.CC_STAT_AREA])
        return float(np.median(areas))

    assert median_building_area(2.0) > 2.5 * median_building_area(1.0)
    with pytest.raises(UsageError, match="zoom"):
        generate_scene(scene_rng(0, 0), size=64, zoom=10)
