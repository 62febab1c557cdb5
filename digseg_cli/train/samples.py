"""Training samples: the torch ``Dataset`` that turns a run's sources into (image, prompt, binary target,
valid pixels) samples, and the batches the loop feeds the model.

DESIGN §1 step 5: each sample asks about one class. With probability ``absent_prob`` the class is one
that is absent from the (augmented) crop, so the target is empty and the model learns to answer
"nothing here"; otherwise it is a class present in the crop. Either way the class comes from the
sample's own dataset (a class another dataset of a mixture never labels is not "absent" here). The prompt
is the class name or one of its synonyms, put into ``prompt_template``. Words ``unrelated`` to every class
(a vocabulary's, ``data.vocabulary``) form one more absent class of every dataset: asked about, they mark
nothing.

Mixtures: with several sources, sample ``index`` of epoch ``epoch`` picks its dataset with probability
proportional to the dataset's weight and then one of its images uniformly, both from
``np.random.default_rng([seed, epoch, index, MIXTURE_STREAM])``; an epoch has as many samples as the
datasets have images together. One source is read in order (index i is image i), as before.

Determinism: every random choice of sample ``(epoch, index)`` (dataset, image, flips, crop, class,
synonym) comes from the seed, the epoch and the index only, so results do not depend on the number of
loader workers and a resumed run sees exactly the samples the uninterrupted one would.

This module knows pixels, masks and class lists; it knows nothing of the VAE, latents or the training loop
(``to_batch`` only applies the tokenizer it is given). Reading files is the sources' job
(``digseg_cli.train.sources``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from digseg_cli.errors import UsageError
from digseg_cli.models.config import check_prompt_template
from digseg_cli.train.sources import TrainClass

__all__ = ["MIXTURE_STREAM", "SegmentationTrainDataset", "collate", "to_batch", "tokenizer_fn"]

MIXTURE_STREAM = 7  # the 4th seed word of a mixture's dataset-and-image choice (apart from augmentation's)


def tokenizer_fn(tokenizer) -> Callable[[list[str]], torch.Tensor]:
    """Prompts → padded token ids ``[B,L]`` (the tokenizer's full length, as the pipeline pads them)."""

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids  # [B,L]

    return tokenize


def collate(samples: list[dict]) -> dict:
    """Samples of ``SegmentationTrainDataset`` → one CPU batch (in a loader worker): stacked tensors and the
    prompts, still text (the tokenizer stays in the training process)."""
    return {
        "pixel_values": torch.stack([x["pixel_values"] for x in samples]),  # [B,3,R,R]
        "target": torch.stack([x["target"] for x in samples]),  # [B,1,R,R]
        "valid": torch.stack([x["valid"] for x in samples]),  # [B,1,R,R]
        "prompts": [x["prompt"] for x in samples],
    }


def to_batch(collated: dict, tokenize, device) -> dict:
    """A collated batch on ``device`` with its prompts as token ids (what ``train.loss.batch_loss`` reads).
    ``valid`` is None when every pixel is labelled, decided here on the CPU tensor: the loss then takes
    its plain path, and a GPU step never waits on a device-to-host check."""
    batch = {k: collated[k].to(device, non_blocking=True) for k in ("pixel_values", "target")}
    valid = collated["valid"]
    batch["valid"] = None if bool(valid.all()) else valid.to(device, non_blocking=True)
    batch["input_ids"] = tokenize(collated["prompts"]).to(device)  # [B,L]
    return batch


class SegmentationTrainDataset(Dataset):
    """A run's sources (``digseg_cli.train.sources.TrainSource``) → dicts of ``pixel_values`` ``[3,R,R]`` in
    [-1, 1], ``target`` and ``valid`` ``[1,R,R]`` in {0, 1} (``valid`` 0 where the label is the source's ignore
    value), ``prompt`` (str), ``class_id`` (the class's label value; None for an unrelated word) and ``dataset``
    (the source's name).

    Items are ``(epoch, index)`` (or an index of the epoch set by ``set_epoch``). Augmentation
    (``augment=True``): horizontal and vertical flips (p = 0.5 each) and a random square crop whose side is
    ``scale_range`` × the short side, resized to R×R (image: area when shrinking, bilinear when enlarging;
    mask: nearest). Without it: the centre square of the short side, resized to R×R.
    """

    def __init__(
        self,
        sources: Sequence,
        resolution: int,
        *,
        seed: int,
        augment: bool = True,
        absent_prob: float = 0.3,
        prompt_template: str = "{name}",
        scale_range: tuple[float, float] = (0.5, 1.0),
        unrelated: Sequence[str] = (),
    ) -> None:
        if resolution < 8:
            raise UsageError(f"`resolution` must be at least 8, got {resolution}")
        if not 0.0 <= absent_prob <= 1.0:
            raise UsageError(f"`absent_prob` must be in [0, 1], got {absent_prob}")
        if not 0.0 < scale_range[0] <= scale_range[1] <= 1.0:
            raise UsageError(f"`scale_range` must satisfy 0 < low <= high <= 1, got {scale_range}")
        check_prompt_template(prompt_template)
        self.sources = list(sources)
        if not self.sources or not all(len(src) for src in self.sources):
            raise UsageError("the training set is empty")
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.augment = augment
        self.absent_prob = float(absent_prob)
        self.prompt_template = prompt_template
        self.scale_range = scale_range
        # Words unrelated to every class: one more absent class of every dataset, never present.
        self.unrelated = TrainClass("unrelated", tuple(unrelated), ()) if unrelated else None
        self.epoch = 0
        weights = np.array([src.weight for src in self.sources], dtype=np.float64)
        self.probabilities = weights / weights.sum()

    def __len__(self) -> int:
        return sum(len(src) for src in self.sources)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose samples a plain index returns."""
        self.epoch = int(epoch)

    def locate(self, epoch: int, index: int) -> tuple[int, int]:
        """(source, image in it) of sample ``index`` of ``epoch``: see the module docstring."""
        if len(self.sources) == 1:
            return 0, index
        rng = np.random.default_rng([self.seed, epoch, index, MIXTURE_STREAM])
        k = int(rng.choice(len(self.sources), p=self.probabilities))
        return k, int(rng.integers(len(self.sources[k])))

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

    def _choose_class(self, classes, mask: np.ndarray, rng: np.random.Generator):
        """A present class of the source, or with probability ``absent_prob`` an absent one (when both exist)."""
        present_values = set(np.unique(mask).tolist())
        present = [c for c in classes if any(v in present_values for v in c.values)]
        absent = [c for c in classes if not any(v in present_values for v in c.values)]
        absent += [self.unrelated] if self.unrelated is not None else []
        want_absent = rng.random() < self.absent_prob
        pool = absent if (want_absent and absent) or not present else present
        return pool[int(rng.integers(len(pool)))]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        # 1. Which dataset and image; decode it (or take it from the source's cache): [H,W,3] uint8, [H,W] ids.
        k, item = self.locate(int(epoch), int(index))
        source = self.sources[k]
        image, mask = source.read(item)
        # 2. Flip, crop and resize: [R,R,3], [R,R].
        image, mask = self._geometry(image, mask, rng)
        # 3. Pick the class this sample asks about (from its own dataset), then the words that name it.
        chosen = self._choose_class(source.classes, mask, rng)
        words = chosen.prompts
        prompt = self.prompt_template.format(name=words[int(rng.integers(len(words)))])
        # 4. Tensors: pixels [3,R,R] in [-1, 1]; target and valid [1,R,R] in {0, 1}.
        pixel_values = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0  # [3,R,R] in [-1, 1]
        target = torch.from_numpy(np.isin(mask, chosen.values).astype(np.float32))[None]  # [1,R,R]
        ignore = source.ignore_index
        valid_np = np.ones(mask.shape, np.float32) if ignore is None else (mask != ignore).astype(np.float32)
        valid = torch.from_numpy(valid_np)[None]  # [1,R,R]
        return {
            "pixel_values": pixel_values,
            "target": target,
            "valid": valid,
            "prompt": prompt,
            "class_id": chosen.values[0] if chosen.values else None,  # None: an unrelated word
            "dataset": source.name,
        }


def _resize_nearest(mask: np.ndarray, r: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer mask of any width (OpenCV's nearest rejects int64)."""
    h, w = mask.shape
    ys = np.minimum(((np.arange(r) + 0.5) * h / r).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(r) + 0.5) * w / r).astype(np.int64), w - 1)
    return mask[ys[:, None], xs[None, :]]
