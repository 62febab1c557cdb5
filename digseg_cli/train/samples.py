"""Training samples: the checked and split pairs, the torch ``Dataset`` that turns them into (image, prompt,
binary target) samples, and the batches the loop feeds the model.

DESIGN §1 step 5: each sample asks about one class. With probability ``absent_prob`` the class is one
that is absent from the (augmented) crop, so the target is empty and the model learns to answer
"nothing here"; otherwise it is a class present in the crop. The prompt is the class name or one of its
synonyms, put into ``prompt_template``.

Determinism: sample ``index`` of epoch ``epoch`` draws every random choice (flips, crop, class, synonym)
from ``np.random.default_rng([seed, epoch, index])`` only, so a resumed run (``set_epoch``) sees exactly
the same samples in any number of loader workers.

This module knows pixels, masks and class lists; it knows nothing of the VAE, latents or the training loop
(``collate`` only applies the tokenizer it is given). It reads files only through ``digseg_cli.data.folders``,
and checks them with ``digseg_cli.data.check`` (the same check as ``digseg data check``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from digseg_cli.data import folders
from digseg_cli.data.folders import ClassList, Pair, load_pair
from digseg_cli.errors import DatasetError, UsageError
from digseg_cli.models.config import check_prompt_template

__all__ = ["SegmentationTrainDataset", "collate", "prepare_data", "tokenizer_fn"]


def prepare_data(
    data: Path, val: Path | None, *, class_name: str | None, val_split: float, seed: int
) -> tuple[ClassList, list[Pair], list[Pair]]:
    """(classes, training pairs, validation pairs) of a checked folder; the validation pairs are ``val``'s,
    else a ``val_split`` share of ``data`` chosen by ``seed``. A folder that fails the check raises
    ``DatasetError`` naming its first problems."""
    from digseg_cli.data.check import check_folder

    report = check_folder(data, class_name=class_name)
    if not report.ok:
        more = len(report.problems) - 5
        shown = "; ".join(report.problems[:5]) + (f" (and {more} more)" if more > 0 else "")
        raise DatasetError(f"{data} failed the data check: {shown}. Run `digseg data check {data}` for the full report")
    classes = folders.read_classes(data, class_name=class_name)
    pairs = folders.find_pairs(data)
    if val:
        val_report = check_folder(val, class_name=class_name)
        if not val_report.ok:
            raise DatasetError(f"{val} failed the data check: {val_report.problems[0]}")
        return classes, pairs, folders.find_pairs(val)
    train_pairs, val_pairs = folders.split_pairs(pairs, val_split, seed)
    return classes, train_pairs, val_pairs


def tokenizer_fn(tokenizer) -> Callable[[list[str]], torch.Tensor]:
    """Prompts → padded token ids ``[B,L]`` (the tokenizer's full length, as the pipeline pads them)."""

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids  # [B,L]

    return tokenize


def collate(samples: list[dict], tokenize, device) -> dict:
    """Samples of ``SegmentationTrainDataset`` → one batch on ``device`` (what ``train.loss.batch_loss`` reads)."""
    return {
        "pixel_values": torch.stack([x["pixel_values"] for x in samples]).to(device),  # [B,3,R,R]
        "target": torch.stack([x["target"] for x in samples]).to(device),  # [B,1,R,R]
        "input_ids": tokenize([x["prompt"] for x in samples]).to(device),  # [B,L]
    }


class SegmentationTrainDataset(Dataset):
    """``pairs`` + ``classes`` → dicts of ``pixel_values`` ``[3,R,R]`` in [-1, 1], ``target`` and ``valid``
    ``[1,R,R]`` in {0, 1}, ``prompt`` (str) and ``class_id`` (int).

    Augmentation (``augment=True``): horizontal and vertical flips (p = 0.5 each) and a random square crop
    whose side is ``scale_range`` × the short side, resized to R×R (image: area when shrinking, bilinear
    when enlarging; mask: nearest). Without it: the centre square of the short side, resized to R×R.
    ``cache=True`` keeps decoded pairs in memory (per loader worker).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        classes: ClassList,
        resolution: int,
        *,
        seed: int,
        augment: bool = True,
        absent_prob: float = 0.3,
        prompt_template: str = "{name}",
        cache: bool = True,
        scale_range: tuple[float, float] = (0.5, 1.0),
    ) -> None:
        if resolution < 8:
            raise UsageError(f"`resolution` must be at least 8, got {resolution}")
        if not 0.0 <= absent_prob <= 1.0:
            raise UsageError(f"`absent_prob` must be in [0, 1], got {absent_prob}")
        if not 0.0 < scale_range[0] <= scale_range[1] <= 1.0:
            raise UsageError(f"`scale_range` must satisfy 0 < low <= high <= 1, got {scale_range}")
        check_prompt_template(prompt_template)
        if not pairs:
            raise UsageError("the training set is empty")
        self.pairs = list(pairs)
        self.classes = classes
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.augment = augment
        self.absent_prob = float(absent_prob)
        self.prompt_template = prompt_template
        self.cache = cache
        self.scale_range = scale_range
        self.epoch = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose samples ``__getitem__`` returns (call before each epoch and on resume)."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        image, mask = load_pair(self.pairs[index], self.classes)
        if self.cache:
            self._cache[index] = (image, mask)
        return image, mask

    def _geometry(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Flip and crop a square, then resize to R×R → (``[R,R,3]`` uint8, ``[R,R]`` ids)."""
        h, w = mask.shape
        short = min(h, w)
        if self.augment:
            if rng.random() < 0.5:
                image, mask = image[:, ::-1], mask[:, ::-1]
            if rng.random() < 0.5:
                image, mask = image[::-1], mask[::-1]
            side = max(1, int(round(short * rng.uniform(*self.scale_range))))
            y0 = int(rng.integers(0, h - side + 1))
            x0 = int(rng.integers(0, w - side + 1))
        else:
            side = short
            y0, x0 = (h - side) // 2, (w - side) // 2
        image = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
        mask = np.ascontiguousarray(mask[y0 : y0 + side, x0 : x0 + side])
        r = self.resolution
        if side != r:
            interp = cv2.INTER_AREA if side > r else cv2.INTER_LINEAR
            image = cv2.resize(image, (r, r), interpolation=interp)
            mask = _resize_nearest(mask, r)
        return image, mask

    def _choose_class(self, mask: np.ndarray, rng: np.random.Generator) -> int:
        """A present class, or with probability ``absent_prob`` an absent one (when both kinds exist)."""
        present_values = set(np.unique(mask).tolist())
        ids = list(self.classes.ids)
        present = [c for c in ids if c in present_values]
        absent = [c for c in ids if c not in present_values]
        want_absent = rng.random() < self.absent_prob
        pool = absent if (want_absent and absent) or not present else present
        return int(pool[int(rng.integers(len(pool)))])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.pairs):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        # 1. Decode (or take from the cache): [H,W,3] uint8, [H,W] class ids.
        image, mask = self._load(index)
        # 2. Flip, crop and resize: [R,R,3], [R,R].
        image, mask = self._geometry(image, mask, rng)
        # 3. Pick the class this sample asks about, then the words that name it.
        class_id = self._choose_class(mask, rng)
        words = self.classes.by_id(class_id).prompts
        prompt = self.prompt_template.format(name=words[int(rng.integers(len(words)))])
        # 4. Tensors: pixels [3,R,R] in [-1, 1]; target and valid [1,R,R] in {0, 1}.
        pixel_values = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0  # [3,R,R] in [-1, 1]
        target = torch.from_numpy((mask == class_id).astype(np.float32))[None]  # [1,R,R]
        ignore = self.classes.ignore_index
        valid_np = np.ones(mask.shape, np.float32) if ignore is None else (mask != ignore).astype(np.float32)
        valid = torch.from_numpy(valid_np)[None]  # [1,R,R]
        return {"pixel_values": pixel_values, "target": target, "valid": valid, "prompt": prompt, "class_id": class_id}


def _resize_nearest(mask: np.ndarray, r: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer mask of any width (OpenCV's nearest rejects int64)."""
    h, w = mask.shape
    ys = np.minimum(((np.arange(r) + 0.5) * h / r).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(r) + 0.5) * w / r).astype(np.int64), w - 1)
    return mask[ys[:, None], xs[None, :]]
