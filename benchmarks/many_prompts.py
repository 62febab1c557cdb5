#!/usr/bin/env python
"""Many prompts per image (issue 21, item 2): one 512 px image with K = 2, 150 and 847 prompts (the ADE-150 and
ADE-847 class names), ours against its own floor, and the memory it takes.

For each K, in one run on this machine:

- **ours**: `DigsegPipeline.__call__` at default settings with the fast decoder, untiled (the image resized to
  the model's processing resolution: 192 px for the demo, 512 px at SD-2 size), the prompts' embeddings already
  cached (as every image after the first of a run: `digseg eval` encodes a benchmark's prompts once), median of
  `--repeats` timed calls (one for K > 150) after an untimed one;
- **floor**: one image encode + K U-Net passes + K decodes, each timed alone; the U-Net and the decoder at the
  batch (of `--batches`) that is fastest per pair, so the floor is the model's cost at its best batch;
- **ours** twice: the labels alone (`output="labels"`, prompts in chunks, what `digseg eval` runs) and the
  default call that keeps every probability map;
- **peak memory** of each, above what was in use before it (the model, the cached embeddings): on CUDA torch's
  peak allocation, on a CPU the process's peak RSS (reset before each call through /proc/self/clear_refs).

`--size demo` (the built-in demo) or `sd2` (SD 2 sizes, random weights: slow on a CPU, 847 U-Net passes of
about 3 s each at 512 px). The section goes to stdout and, with `--out`, is
appended to that file (default benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import (
    HERE,
    machine,
    markdown_table,
    memory_in_use,
    peak_memory,
    print_or_publish,
    reset_peak_memory,
    s,
    section_end,
    section_head,
)
from run import load, sync, timed

TARGET = 1.10  # ours ÷ floor


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("demo", "sd2", "tiny"), default="demo")
    p.add_argument("--prompts", default="2,150,847", help="comma-separated K values")
    p.add_argument("--image", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed calls for K ≤ 150 (K above: 1)")
    p.add_argument("--batches", default="4,16,64", help="U-Net/decoder batches tried for the floor")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def prompt_names(k: int) -> list[str]:
    from digseg_cli.data.benchmarks.classnames import ADE150, ADE847

    names = list(ADE150 if k <= 150 else ADE847)
    return (names * (k // len(names) + 1))[:k] if k > len(names) else names[:k]


def best_per_pair(fn, k: int, batches: list[int], repeats: int) -> tuple[float, int]:
    """(seconds per pair, batch) of `fn(b)` (b pairs in one call) at its fastest batch, the batch at most K."""
    best = None
    for b in sorted({min(b, k) for b in batches}):
        per = timed(lambda b=b: fn(b), repeats, warmup=1) / b
        best = (per, b) if best is None or per < best[0] else best
    return best


def floor(pipe, image, texts, batches, repeats) -> dict:
    """Encode once; K U-Net passes and K fast decodes at their best batch, each timed alone."""
    import torch

    from digseg_cli.core import diffusion, transforms

    m, k = pipe.model, len(texts)
    res = pipe.config.default_resolution or image.shape[0]  # as ours runs here
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].to(pipe.device, torch.float32) / 127.5 - 1
        x = transforms.resize(x, transforms.processing_size(*image.shape[:2], res)).to(pipe.dtype)  # [1,3,h,w]
        emb, pooled = pipe.encode_prompts(texts)  # cached: [K,L,D], [K,D]
        z = m.encode_image(x)  # [1,4,h/f,w/f]
        t_max = pipe.scheduler.config.num_train_timesteps - 1

        def unet(b):
            zb = z.expand(b, -1, -1, -1)  # [b,4,h,w]
            t = torch.full((b,), t_max, device=pipe.device)
            return m(zb, torch.zeros_like(zb), t, emb[:b], pooled[:b])

        pred = unet(min(k, max(batches)))
        clean = diffusion.predicted_clean_latent(
            pred, torch.zeros_like(pred), torch.full((len(pred),), t_max), pipe.scheduler
        )

        def decode(b):
            return m.decode_probs_fast(clean[:1].expand(b, -1, -1, -1))

        encode_s = timed(lambda: m.encode_image(x), repeats, warmup=1)
        unet_pair, unet_b = best_per_pair(unet, k, batches, repeats)
        decode_pair, decode_b = best_per_pair(decode, k, batches, repeats)
    return {
        "encode": encode_s,
        "unet": k * unet_pair,
        "decode": k * decode_pair,
        "batches": (unet_b, decode_b),
        "total": encode_s + k * (unet_pair + decode_pair),
    }


def run(a: argparse.Namespace) -> str:
    import numpy as np

    from digseg_cli.data.synth import generate_scene
    from digseg_cli.inference.device import resolve_device, resolve_dtype

    device = resolve_device(a.device)
    dtype = resolve_dtype(a.precision, device)
    info = machine()
    pipe, label, _ = load("demo" if a.size == "demo" else a.size, device, dtype)
    image = generate_scene(np.random.default_rng(0), a.image)[0]
    batches = [int(b) for b in a.batches.split(",")]
    rows, t_start = [], time.perf_counter()
    for k in (int(v) for v in a.prompts.split(",")):
        texts = prompt_names(k)
        pipe.encode_prompts(texts)  # once per run, kept on the device
        # Untiled: the whole image at the model's processing resolution. Labels alone (what `eval` runs: bounded
        # memory) first, then every probability map (the API's default: memory grows with K); each its own peak.
        repeats = a.repeats if k <= 150 else 1  # K=847 takes minutes a call on a CPU
        reset_peak_memory(device)  # each call's own peak, above what is in use before it
        base = memory_in_use(device)
        labels_s = timed(
            lambda texts=texts: pipe(image, texts, decoder="fast", tile=None, output="labels"), repeats, warmup=1
        )
        sync()
        labels_peak = peak_memory(device) - base
        reset_peak_memory(device)  # each call's own peak, above what is in use before it
        base = memory_in_use(device)
        ours_s = timed(lambda texts=texts: pipe(image, texts, decoder="fast", tile=None), repeats, warmup=1)
        sync()
        peak = peak_memory(device) - base
        f = floor(pipe, image, texts, batches, repeats)
        ratio, labels_ratio = ours_s / f["total"], labels_s / f["total"]
        parts = (
            f"encode {s(f['encode'])} + U-Net×{k} {s(f['unet'])} (batch {f['batches'][0]}) + fast decode×{k} "
            f"{s(f['decode'])} (batch {f['batches'][1]})"
        )
        rows.append(
            (
                f"K={k}",
                f"{s(labels_s)} / {s(ours_s)}",
                f"{s(f['total'])} ({parts})",
                f"{labels_ratio:.2f}× / {ratio:.2f}×",
                f"≤ {TARGET:.2f}× (medians, side by side)",
                " / ".join("yes" if r <= TARGET else "**no**" for r in (labels_ratio, ratio)),
                f"{labels_peak / 2**30:.2f} / {peak / 2**30:.2f} GiB",
                f"{labels_s / k * 1000:.1f} ms",
            )
        )
        print(f"K={k}: labels {labels_s:.2f} s, probs {ours_s:.2f} s, floor {f['total']:.2f} s", file=sys.stderr)
    processing = pipe.config.default_resolution or a.image
    ran_on = f"{device}, {str(dtype).removeprefix('torch.')}"
    head = (
        "K",
        "Ours: labels / probs",
        "Floor",
        "Ours ÷ floor: labels / probs",
        "Target",
        "Met",
        "Peak above the loaded model: labels / probs",
        "Labels per prompt",
    )
    peak_kind = (
        "torch's peak allocation" if device.type == "cuda" else "the process's peak RSS (reset before each call)"
    )
    peak_kind += " less what was in use before the call (the model, the cached embeddings)"
    return "\n".join(
        [
            *section_head(f"many prompts, `--size {a.size}` on {ran_on}", info, ran_on),
            f"- **Model timed:** {label}; one {a.image}×{a.image} synthetic scene; the ADE-150 / ADE-847 class names "
            f"as prompts, their embeddings cached; fast decoder; untiled, the image resized to the model's "
            f"{processing} px; median of {a.repeats} timed call(s) (K > 150: 1) after an untimed one. "
            f'*labels*: `output="labels"` (the label map alone, prompts in chunks: what `digseg eval` runs); '
            f"*probs*: the default call, every probability map kept. Peak memory: {peak_kind}.",
            *section_end(markdown_table(head, rows), time.perf_counter() - t_start),
        ]
    )


def main(argv=None) -> int:
    a = parse(argv)
    return print_or_publish(a, run(a))


if __name__ == "__main__":
    sys.exit(main())
