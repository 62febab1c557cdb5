#!/usr/bin/env python
"""The fast image encoder (issue 21, item 3): the VAE encoder against the distilled one, in speed and accuracy.

In one run on this machine, in the pipeline's layout (channels_last) and precision:

- **encode**: one image at the model's processing resolution (192 px for the demo, 512 px at SD-2 size, or
  `--image`) through `DigsegModel.encode_image` (the VAE encoder) and `encode_image_fast`, median of
  `--repeats` timed calls after an untimed one, with each encoder's parameters and FLOPs (torch's counter);
- **ours**: `DigsegPipeline.__call__` with K = 2 prompts (cached), the fast decoder, untiled, once with each
  encoder: what the encoder's speed-up is worth to a whole call;
- **mIoU**: the change `digseg encoder train` recorded in the checkpoint (synth validation split, the VAE
  encoder against the fast one, everything else the same), where it has a trained fast encoder.

`--size demo` (the built-in demo, or the checkpoint `--weights` names; its own fast encoder when it has one,
else a randomly initialised one: timing only) or `sd2` (SD 2 sizes, random weights, and a random fast encoder:
slow on a CPU). The section goes to stdout and, unless `--no-write`, is appended to `--out` (default
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import HERE, machine, markdown_table, print_or_publish, s, section_end, section_head, yes
from run import load, timed

PROMPTS = ["road", "tree"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("demo", "sd2", "tiny"), default="demo")
    p.add_argument("--weights", default=None, help="with --size demo: this checkpoint instead (e.g. a distilled copy)")
    p.add_argument("--image", type=int, default=None, help="image side in px (default: the processing resolution)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def with_fast_encoder(pipe) -> bool:
    """Attach a randomly initialised fast encoder (timing only) where the weights have none; True when they had
    a trained one."""
    from digseg_cli.core.fast_encoder import FastImageEncoder

    m = pipe.model
    if m.fast_encoder is not None:
        return True
    m.fast_encoder = FastImageEncoder(m.latent_channels, m.vae_scale_factor).to(pipe.device, pipe.dtype)
    pipe.memory_format = pipe.memory_format  # in the layout the rest runs in
    return False


def gflop(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def accuracy_row(pipe, trained: bool, label: str) -> tuple[str, ...]:
    ev = pipe.config.evaluation.get("fast_encoder") if trained else None
    if not ev:
        return ("synth mIoU, VAE encoder → fast encoder", "—", "—", f"not measured ({label}: no trained one)", "—")
    return (
        f"synth mIoU ({ev['images']} images, decoder {ev.get('decoder', 'vae')}), recorded by `digseg encoder train`",
        f"{ev['miou_vae']:.2f}",
        f"{ev['miou_fast']:.2f}",
        f"{ev['miou_change_points']:+.2f} points (\\|Δ\\| ≤ {ev['tolerance_points']} points: {yes(ev['passed'])})",
        f"{ev['params']:,} parameters, {ev['distillation']['steps']} steps",
    )


def run(a: argparse.Namespace) -> str:
    import numpy as np
    import torch

    from digseg_cli.data.synth import generate_scene
    from digseg_cli.inference.device import resolve_device, resolve_dtype

    device = resolve_device(a.device)
    dtype = resolve_dtype(a.precision, device)
    info = machine()
    pipe, label, _ = load(a.weights if a.weights and a.size == "demo" else a.size, device, dtype)
    trained = with_fast_encoder(pipe)
    side = a.image or pipe.config.default_resolution or 512
    m, t_start = pipe.model, time.perf_counter()
    image = generate_scene(np.random.default_rng(0), side)[0]  # [S,S,3] uint8
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device, torch.float32) / 127.5 - 1  # [1,3,S,S]
    parts = {"vae": (m.encode_image, m.vae.encoder), "fast": (m.encode_image_fast, m.fast_encoder)}
    cells, secs = {}, {}
    with torch.no_grad():
        for name, (fn, module) in parts.items():
            secs[name] = timed(lambda fn=fn: fn(x), a.repeats, warmup=1)
            size = sum(p.numel() for p in module.parameters()) / 1e6
            cells[name] = f"{s(secs[name])} ({size:.2f} M parameters, {gflop(lambda fn=fn: fn(x)):.1f} GFLOP)"
    note = "" if trained else "random fast encoder: timing only"
    rows = [
        (
            f"encode one {side}×{side} image",
            cells["vae"],
            cells["fast"],
            f"{secs['vae'] / secs['fast']:.0f}× faster",
            note,
        )
    ]
    pipe.encode_prompts(PROMPTS)  # cached, as for every image after the first of a run

    def ours(encoder: str) -> float:
        return timed(lambda: pipe(image, PROMPTS, tile=None, decoder="fast", encoder=encoder), a.repeats, warmup=1)

    call = {encoder: ours(encoder) for encoder in ("vae", "fast")}
    what = (
        f"ours, K={len(PROMPTS)} (prompts cached), fast decoder, untiled at {pipe.config.default_resolution or side} px"
    )
    rows.append((what, s(call["vae"]), s(call["fast"]), f"{call['vae'] / call['fast']:.2f}× faster", ""))
    rows.append(accuracy_row(pipe, trained, label))
    ran_on = f"{device}, {str(dtype).removeprefix('torch.')}"
    head = ("What", "VAE encoder", "Fast encoder", "Fast against VAE", "Note")
    return "\n".join(
        [
            *section_head(f"fast encoder, `--size {a.size}` on {ran_on}", info, ran_on),
            f"- **Model timed:** {label}; {'its trained' if trained else 'a randomly initialised'} fast encoder; "
            f"one {side}×{side} synthetic scene; the pipeline's layout ({pipe.memory_format}); median of "
            f"{a.repeats} timed calls after an untimed one.",
            *section_end(markdown_table(head, rows), time.perf_counter() - t_start),
        ]
    )


def main(argv=None) -> int:
    a = parse(argv)
    return print_or_publish(a, run(a))


if __name__ == "__main__":
    sys.exit(main())
