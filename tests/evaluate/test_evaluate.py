"""evaluate / score_predictions: label rules, resize-before-argmax, seeds, sharding, headline metrics, reports."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from digseg_cli.core import metrics as M
from digseg_cli.core.labels import labels_from_probs
from digseg_cli.errors import DatasetError, UsageError
from digseg_cli.evaluate.predictions import pipeline_predictor, score_predictions
from digseg_cli.evaluate.scoring import evaluate
from digseg_cli.inference.seeds import image_seed


@dataclass
class S:
    stem: str
    image: np.ndarray
    label: np.ndarray


def make_samples(n=5, c=3, size=8, ignore=255, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = rng.integers(0, c, (size, size)).astype(np.int64)
        label[0, 0] = ignore
        out.append(S(f"im{i}", rng.integers(0, 255, (size, size, 3), dtype=np.uint8), label))
    return out


def noisy_oracle(c, flip=0.3, seed=0):
    """One-hot of the ground truth, with some pixels moved to another class (deterministic per image)."""

    def predict(image, prompts, name):
        label = ORACLE[image.tobytes()]
        g = torch.Generator().manual_seed(seed + int(image[0, 0, 0]))
        lab = torch.from_numpy(np.where(label >= c, 0, label))
        wrong = torch.rand(lab.shape, generator=g) < flip
        lab = torch.where(wrong, (lab + 1) % c, lab)
        return F.one_hot(lab, c).permute(2, 0, 1).float()  # [K,H,W]

    return predict


ORACLE: dict[bytes, np.ndarray] = {}


@pytest.fixture()
def samples():
    s = make_samples()
    ORACLE.update({x.image.tobytes(): x.label for x in s})
    return s


def test_labels_from_probs_modes():
    probs = torch.tensor([[[0.9, 0.2, 0.6]], [[0.1, 0.4, 0.7]]])  # [K=2,1,3]
    assert labels_from_probs(probs, "argmax").tolist() == [[0, 1, 1]]
    assert labels_from_probs(probs, "background", 0.5).tolist() == [[1, 0, 2]]
    assert labels_from_probs(probs, "nested", 0.5).tolist() == [[1, 0, 2]]  # inner (cup) wins where both on
    # one threshold per prompt: prompt 2's 0.7 misses its 0.8, so the last pixel is background / outer only
    assert labels_from_probs(probs, "background", [0.5, 0.8]).tolist() == [[1, 0, 0]]
    assert labels_from_probs(probs, "nested", [0.5, 0.8]).tolist() == [[1, 0, 1]]
    with pytest.raises(ValueError):
        labels_from_probs(probs, "vote")
    with pytest.raises(UsageError):  # evaluate says it the user's way, before any image is read
        evaluate([], ["a"], lambda im, p, name: probs, ignore_index=None, label_mode="vote")


def test_segment_and_eval_share_the_label_rule():
    from digseg_cli.inference.pipeline import probs_to_labels

    probs = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0))  # [K,H,W]
    thresholds = [0.3, 0.5, 0.7, 0.9]
    labels, masks = probs_to_labels(probs, thresholds)
    best, idx = probs.max(0)
    expected = torch.where(best >= torch.tensor(thresholds)[idx], idx + 1, 0)  # the rule, written out
    assert torch.equal(labels, expected) and torch.equal(labels, labels_from_probs(probs, "background", thresholds))
    assert 0 < int((labels == 0).sum()) < labels.numel()  # some pixels miss their prompt's threshold
    assert torch.equal(masks, probs >= torch.tensor(thresholds)[:, None, None])


def test_probabilities_are_resized_before_argmax():
    label = np.zeros((8, 8), dtype=np.int64)
    low = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(3))  # [K,3,3], not the label size
    expected = F.interpolate(low[None], size=(8, 8), mode="bilinear", align_corners=False)[0].argmax(0)
    res = evaluate(
        [S("a", np.zeros((8, 8, 3), np.uint8), label)],
        ["a", "b", "c"],
        lambda im, p, name: low,
        ignore_index=None,
        worst_k=0,
    )
    cm = M.confusion_matrix(expected, torch.from_numpy(label), 3)
    assert torch.equal(res.confusion, cm)


def test_two_shards_sum_to_one_pass(samples):
    kw = dict(ignore_index=255, worst_k=2)
    whole = evaluate(samples, ["a", "b", "c"], noisy_oracle(3), **kw)
    parts = [evaluate(samples, ["a", "b", "c"], noisy_oracle(3), rank=r, world_size=2, **kw) for r in (0, 1)]
    assert torch.equal(parts[0].confusion + parts[1].confusion, whole.confusion)
    assert [len(p.per_image) for p in parts] == [3, 2]
    assert whole.metrics["metrics"]["miou"] == pytest.approx(M.miou(parts[0].confusion + parts[1].confusion))
    assert int(whole.confusion.sum()) == 5 * 63  # the ignored pixel of every image is not counted


class NoisyPipe:
    """Stands in for DigsegPipeline like a multi-step model: its probabilities are noise drawn from `seed`."""

    def __init__(self):
        self.seeds = {}

    def __call__(self, image, prompts, *, seed, **_):
        self.seeds[image.tobytes()] = seed
        g = torch.Generator().manual_seed(seed)

        class Out:
            probs = torch.rand(len(prompts), *image.shape[:2], generator=g)  # [K,H,W]

        return Out()


def test_each_image_is_seeded_by_its_name_so_order_and_shards_do_not_matter(samples):
    kw = {"ignore_index": 255, "worst_k": 0}
    pipe = NoisyPipe()
    whole = evaluate(samples, ["a", "b", "c"], pipeline_predictor(pipe, seed=5), **kw)
    assert pipe.seeds == {s.image.tobytes(): image_seed(5, s.stem) for s in samples}  # segment's policy
    backwards = evaluate(samples[::-1], ["a", "b", "c"], pipeline_predictor(NoisyPipe(), seed=5), **kw)
    parts = [
        evaluate(samples, ["a", "b", "c"], pipeline_predictor(NoisyPipe(), seed=5), rank=r, world_size=2, **kw)
        for r in (0, 1)
    ]
    assert torch.equal(backwards.confusion, whole.confusion)
    assert torch.equal(parts[0].confusion + parts[1].confusion, whole.confusion)
    other = evaluate(samples, ["a", "b", "c"], pipeline_predictor(NoisyPipe(), seed=6), **kw)
    assert not torch.equal(other.confusion, whole.confusion)  # the noise really comes from the seed


def test_reports_are_written(samples, tmp_path):
    res = evaluate(
        samples,
        ["a", "b", "c"],
        noisy_oracle(3),
        ignore_index=255,
        out_dir=tmp_path,
        dataset="toy",
        split="val",
        settings={"steps": 1},
        limit=4,
        worst_k=2,
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "metrics.json",
        "per_class.csv",
        "per_image.csv",
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "report.md",
        "worst",
    } <= names
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_images"] == 4 and m["absent_rule"] == "detectron2" and m["settings"] == {"steps": 1}
    assert m["prompts_per_image"] == 3 and m["seconds_per_image"] > 0  # the model's cost per image
    assert m["metrics"]["miou"] == pytest.approx(res.metrics["metrics"]["miou"])
    rows = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert float(rows[1]["iou"]) == pytest.approx(m["per_class"][1]["iou"])
    cm_rows = list(csv.reader((tmp_path / "confusion_matrix.csv").open()))[1:]
    assert np.array([[int(v) for v in r[1:]] for r in cm_rows]).tolist() == res.confusion.tolist()
    assert len(list(csv.DictReader((tmp_path / "per_image.csv").open()))) == 4
    worst = sorted((tmp_path / "worst").iterdir())
    assert len(worst) == 2 and Image.open(worst[0]).size == (8 * 3 + 8, 8)
    report = (tmp_path / "report.md").read_text()
    assert "worst/01_" in report and "mIoU (detectron2 rule)" in report
    assert Image.open(tmp_path / "confusion_matrix.png").mode == "RGB"


def test_absent_rule_is_switchable(samples):
    # class 2 never in GT but predicted: the two rules differ
    for s in samples:
        s.label[s.label == 2] = 1
    d2 = evaluate(samples, ["a", "b", "c"], noisy_oracle(3), ignore_index=255, worst_k=0)
    mm = evaluate(samples, ["a", "b", "c"], noisy_oracle(3), ignore_index=255, absent_rule="mmseg", worst_k=0)
    assert d2.metrics["metrics"]["miou"] > mm.metrics["metrics"]["miou"]
    assert mm.metrics["absent_rule"] == "mmseg" and mm.metrics["per_class"][2]["counted"]
    with pytest.raises(UsageError):
        evaluate(samples, ["a", "b", "c"], noisy_oracle(3), ignore_index=255, absent_rule="voc")


def test_refuge_headline_is_mean_per_image_dice():
    gt = np.zeros((8, 8), dtype=np.int64)
    gt[2:6, 2:6] = 1
    gt[3:5, 3:5] = 2  # cup inside the disc
    disc = torch.zeros(8, 8)
    disc[2:6, 2:7] = 1  # disc over-segmented by one column
    cup = torch.zeros(8, 8)
    cup[3:5, 3:5] = 1
    res = evaluate(
        [S("r", np.zeros((8, 8, 3), np.uint8), gt)],
        ["optic disc", "optic cup"],
        lambda im, p, name: torch.stack([disc, cup]),
        ignore_index=None,
        label_mode="nested",
        headline="refuge_dice",
        label_names=["background", "rim", "cup"],
        worst_k=0,
    )
    m = res.metrics["metrics"]
    assert m["dice_disc"] == pytest.approx(2 * 16 / (16 + 20))  # disc = disc ∪ cup
    assert m["dice_cup"] == pytest.approx(1.0)
    assert res.metrics["headline"]["value"] == [m["dice_disc"], m["dice_cup"]]
    assert m["vcdr_mae"] == pytest.approx(0.0)


def test_deepglobe_headline_is_road_iou():
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:, 1] = 1
    road = torch.zeros(1, 4, 4)
    road[0, :, 1:3] = 0.9  # 4 TP, 4 FP
    res = evaluate(
        [S("t", np.zeros((4, 4, 3), np.uint8), gt)],
        ["road"],
        lambda im, p, name: road,
        ignore_index=None,
        label_mode="background",
        headline="road_iou",
        worst_k=0,
    )
    m = res.metrics["metrics"]
    assert m["road_iou"] == pytest.approx(0.5) and res.metrics["headline"]["value"] == pytest.approx(0.5)
    assert m["miou_2class"] > m["road_iou"]


def test_score_predictions_reads_label_maps(samples, tmp_path):
    preds = tmp_path / "preds"
    preds.mkdir()
    for s in samples:
        Image.fromarray(np.where(s.label == 255, 0, s.label).astype(np.uint8)).save(preds / f"{s.stem}.png")
    res = score_predictions(samples, preds, label_names=["a", "b", "c"], ignore_index=255, out_dir=tmp_path / "r")
    assert res.metrics["metrics"]["miou"] == pytest.approx(1.0)
    assert (tmp_path / "r/metrics.json").is_file() and res.metrics["source"].startswith("predictions")
    assert "seconds_per_image" not in res.metrics  # no model ran
    (preds / "im3.png").unlink()
    with pytest.raises(DatasetError, match="im3"):
        score_predictions(samples, preds, label_names=["a", "b", "c"], ignore_index=255)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(preds / "im3.png")
    with pytest.raises(DatasetError, match="predicted values"):
        score_predictions(samples, preds, label_names=["a", "b", "c"], ignore_index=255)


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    from digseg_cli.inference.device import join_processes, leave_process_group

    # What torchrun / accelerate launch set for each process; Accelerate joins the group from them.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    processes = join_processes("cpu")
    try:
        samples = make_samples()
        ORACLE.update({x.image.tobytes(): x.label for x in samples})
        res = evaluate(
            samples,
            ["a", "b", "c"],
            noisy_oracle(3),
            ignore_index=255,
            out_dir=f"{out}/r{rank}",
            worst_k=2,
            processes=processes,
        )
        torch.save(
            {
                "cm": res.confusion,
                "n": len(res.per_image),
                "shard": res.metrics["shard"],
                "worst": [w[1] for w in res.worst],
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        leave_process_group()


def test_confusion_matrix_is_summed_across_processes_through_accelerate(samples, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    whole = evaluate(samples, ["a", "b", "c"], noisy_oracle(3), ignore_index=255, worst_k=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["cm"].dtype == torch.int64 and torch.equal(got["cm"], whole.confusion)  # summed, exactly
        assert got["n"] == 5 and got["shard"] == {"rank": rank, "world_size": 2, "all_reduced": True}
        assert got["worst"] == [w[1] for w in whole.worst]  # the worst images of all shards, in order
    assert (tmp_path / "r0/metrics.json").is_file() and not (tmp_path / "r1").exists()  # only rank 0 writes


def test_a_record_in_the_report_reads_as_its_pairs():
    from digseg_cli.evaluate.report import fmt

    record = {"enabled": True, "backend": "inductor", "warmup_s": 139.04, "eager_fallbacks": {}}
    assert fmt(record) == "enabled: True; backend: inductor; warmup_s: 139.0400; eager_fallbacks: —"
