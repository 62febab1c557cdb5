"""Distil a checkpoint's VAE mask decoder or image encoder into a small network, check its accuracy, save a copy.

`distil` runs the steps both distillations share; what differs comes in a `Part` (`distill_decoder.DECODER`,
`distill_encoder.ENCODER`). Steps: (1) load the checkpoint; (2) the part's pool on synthetic scenes (never the
validation seed): its inputs and the VAE teacher's outputs for them (the teacher, never the ground truth);
(3) fit the small network to them with the part's loss; (4) score mIoU on the `synth` validation split with
the VAE's part and with the fast one, everything else the same (the other part as `auto` picks it, recorded),
and time both; (5) write a copy of the checkpoint with `fast_<part>/` and the result in its config's
`evaluation["fast_<part>"]` (`passed` when mIoU changes by at most `tolerance` points, which is what
`<part>="auto"` reads, `inference.fast_parts`). It knows nothing of the command line.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from digseg_cli.core import transforms
from digseg_cli.errors import UsageError
from digseg_cli.train.distill_parts import PartAbout
from digseg_cli.train.settings import refuse_broken

log = logging.getLogger("digseg")
POOL_SEED = 2_000_029  # synthetic scenes for distillation: neither the training data nor the synth val split
Progress = Callable[[dict], None]


@dataclass(frozen=True)
class DistillSettings:
    """`digseg decoder train` and `digseg encoder train` options, one to one."""

    weights: str
    out: Path
    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    width: int | None = None  # channels at latent resolution (default: the part's, `Part.width`)
    blocks: int = 2
    pool: int = 192  # synthetic scenes in the distillation pool
    resolution: int | None = None  # scene size (default: the model's processing resolution)
    val_limit: int | None = None  # synth validation images to score (default: all)
    tolerance: float = 0.5  # mIoU points
    seed: int = 0
    overwrite: bool = False


@dataclass
class DistillResult:
    out: Path
    steps: int
    loss: float
    params: int
    evaluation: dict


@dataclass(frozen=True)
class Part:
    """What one distillation knows that the other does not (fields in this order: the parts are declared
    positionally, one line each); what is said of it is in `distill_parts.PARTS`."""

    about: PartAbout  # its name, what its pool holds, the student's default width, the loss's name
    pool: Callable  # (pipe, settings, resolution, emit) → (inputs `[N,...]`, teacher's outputs `[N,...]`)
    student: type  # the small network: built as (latent channels, VAE factor, width=, blocks=)
    loss: Callable  # (student, inputs `[b,...]`, targets `[b,...]`) → scalar loss
    timed: tuple[str, str]  # the `DigsegModel` methods timed: the VAE's, then the fast one's


def check_inputs(s: DistillSettings) -> None:
    """Refuse, before any work, settings no distillation could use: a `UsageError` (exit 2) naming the option
    as `digseg decoder train` and `digseg encoder train` spell it. Pure; `distil` calls it."""
    rules = [
        (s.steps >= 1, "--steps", "at least 1", s.steps),
        (s.batch_size >= 1, "--batch-size", "at least 1", s.batch_size),
        (s.pool >= 1, "--pool", "at least 1", s.pool),
        (s.lr > 0, "--lr", "a positive number", s.lr),
        (s.width is None or s.width >= 1, "--width", "at least 1", s.width),
        (s.blocks >= 0, "--blocks", "0 or more", s.blocks),
        (s.resolution is None or s.resolution >= 1, "--resolution", "a positive number of pixels", s.resolution),
        (s.val_limit is None or s.val_limit >= 1, "--val-limit", "at least 1", s.val_limit),
        (s.tolerance >= 0, "--tolerance", "0 or more (mIoU points)", s.tolerance),
    ]
    refuse_broken(rules)


def distil(s: DistillSettings, part: Part, progress: Progress | None = None) -> DistillResult:
    from digseg_cli.inference.pipeline import load_pipeline

    emit = progress or (lambda event: None)
    check_inputs(s)
    if Path(s.out).exists() and not s.overwrite:
        raise UsageError(f"{s.out} already exists: pass --overwrite or choose another --out")
    # 1. Load the teacher (CPU, fp32).
    pipe = load_pipeline(s.weights)
    resolution = s.resolution or pipe.config.default_resolution
    # 2. The part's pool: its inputs and the VAE's outputs for them.
    inputs, targets = part.pool(pipe, s, resolution, emit)
    # 3. Fit the small network.
    torch.manual_seed(s.seed)
    model, about = pipe.model, part.about
    student = part.student(model.latent_channels, model.vae_scale_factor, width=s.width or about.width, blocks=s.blocks)
    loss = _fit(student, inputs, targets, part.loss, s, emit)
    setattr(model, f"fast_{about.name}", student.requires_grad_(False).eval())
    pipe.memory_format = pipe.memory_format  # the new part in the layout the others run in, timed as users run it
    # 4. Accuracy (mIoU on the synth validation split, each choice of the part) and speed.
    params = sum(p.numel() for p in student.parameters())
    distillation = {"steps": s.steps, f"pool_{about.inputs}": len(inputs), "resolution": resolution}
    evaluation = {
        "teacher": f"vae {about.name}",
        "params": params,
        "distillation": {**distillation, f"final_{about.loss}": loss},
    }
    evaluation.update(_compare(pipe, about.name, s.val_limit, s.tolerance, emit))
    evaluation.update(_time_parts(model, part.timed, inputs[: min(8, len(inputs))], about.verb))
    # 5. A copy of the checkpoint with fast_<part>/ and the result in its config. The U-Net and VAE are
    # unchanged, so the checkpoint's other scores stay true, except those measured with a fast <part>: that
    # was another one.
    key = f"fast_{about.name}"
    kept = {
        k: v
        for k, v in pipe.config.evaluation.items()
        if k != key and not (isinstance(v, dict) and v.get(about.name) == "fast")
    }
    pipe.config.evaluation = {**kept, key: evaluation}
    pipe.save_pretrained(s.out, overwrite=s.overwrite)
    return DistillResult(Path(s.out), s.steps, loss, params, evaluation)


def synth_scenes(pipe, s: DistillSettings, resolution: int, emit: Progress) -> Iterator[tuple]:
    """The pool's `s.pool` synthetic scenes, each as (its generator, `[S,S,3]` uint8 image, `[S,S]` class mask,
    pixels `[1,3,S',S']` in [-1,1] padded to the model's multiple); a "pool" progress event after each."""
    from digseg_cli.data.synth import generate_scene

    for i in range(s.pool):
        rng = np.random.default_rng([POOL_SEED, s.seed, i])
        image, mask = generate_scene(rng, size=max(16, resolution))
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1  # [1,3,S,S] in [-1,1]
        x, _ = transforms.pad_to_multiple(x, pipe.model.size_multiple)  # [1,3,S',S']
        yield rng, image, mask, x
        emit({"event": "pool", "done": i + 1, "total": s.pool})


def _fit(student: torch.nn.Module, inputs, targets, loss_fn: Callable, s: DistillSettings, emit: Progress) -> float:
    """AdamW with a cosine decay to 0 over `steps` (diffusers' `get_scheduler`, no warm-up) on random batches of
    the pool; the running mean of the last 50 losses."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, weight_decay=1e-4)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=s.steps)
    g = torch.Generator().manual_seed(s.seed)
    student.train()
    recent: list[float] = []
    for step in range(1, s.steps + 1):
        idx = torch.randint(0, len(inputs), (min(s.batch_size, len(inputs)),), generator=g)
        loss = loss_fn(student, inputs[idx], targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        emit({"event": "step", "step": step, "max_steps": s.steps, "loss": statistics.fmean(recent)})
    student.eval()
    return statistics.fmean(recent)


def _compare(pipe, part: str, limit: int | None, tolerance: float, emit: Progress) -> dict:
    """mIoU (points, 0–100) on the synth validation split with the VAE's `part` and with the fast one; the
    other part as "auto" picks it, the same for both."""
    from digseg_cli.data.benchmarks import catalog as D
    from digseg_cli.evaluate.scoring import evaluate, protocol_kwargs
    from digseg_cli.inference.fast_parts import PARTS, resolve_part

    other = next(p for p in PARTS if p != part)
    fixed = {other: resolve_part(pipe.model, pipe.config, other, "auto")}
    spec = D.get_spec("synth")
    data = D.open_dataset(spec)
    scores = {}
    for choice in ("vae", "fast"):
        predict = _predictor(pipe, {part: choice, **fixed})

        def tick(done, total, stem, choice=choice):
            emit({"event": "eval", "part": part, "choice": choice, "done": done, "total": total})

        result = evaluate(
            data, spec.class_names or (), predict, limit=limit, progress=tick, worst_k=0, **protocol_kwargs(spec)
        )
        scores[choice] = 100 * float(result.metrics["metrics"]["miou"])
        images = result.metrics["num_images"]
    change = scores["fast"] - scores["vae"]
    return {
        "dataset": "synth",
        "split": data.split,
        "images": images,
        **fixed,
        "miou_vae": round(scores["vae"], 2),
        "miou_fast": round(scores["fast"], 2),
        "miou_change_points": round(change, 2),
        "tolerance_points": tolerance,
        "passed": bool(abs(change) <= tolerance),
    }


def _predictor(pipe, parts: dict[str, str]):
    """`evaluate`'s predictor: the pipeline with these `encoder`/`decoder` choices and eval's per-image seed
    (paired noise for both choices)."""
    from digseg_cli.inference.seeds import image_seed

    def predict(image, prompts, name):
        return pipe(image, prompts, seed=image_seed(0, name), **parts).probs  # [K,H,W]

    return predict


@torch.no_grad()
def _time_parts(model, methods: tuple[str, str], inputs: torch.Tensor, verb: str, repeats: int = 3) -> dict:
    """Seconds for the VAE's and the fast part's `methods` on `inputs` (median of `repeats`, after a warm-up),
    recorded as `<verb>_seconds_vae` etc. (the part's verb, "decode" or "encode")."""
    times = {}
    for name, method in zip(("vae", "fast"), methods, strict=True):
        fn = getattr(model, method)
        fn(inputs)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(inputs)
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    return {
        f"{verb}_batch": len(inputs),
        f"{verb}_seconds_vae": round(times["vae"], 5),
        f"{verb}_seconds_fast": round(times["fast"], 5),
        f"{verb}_speedup": round(times["vae"] / times["fast"], 1),
    }
