#!/usr/bin/env python
"""digseg's training speed and memory in one command: `python benchmarks/train.py` (issue 18, item 7).

Each row is a real training run through `digseg_cli.train.loop.train`, the library under `digseg train`
(its loader workers, loss, AdamW, Accelerate's mixed precision and gradient checkpointing), on synthetic
scenes, read through the step records its progress callback gets (the records `<out>/metrics.jsonl` keeps:
`elapsed_s`, `data_wait_s`). In one run, side by side:

  (1) demo size (compact `small`, 128 px, batch 8): samples/s with 0 and with 2 loader workers, on the same
      data for the same steps, and each run's share of step time spent waiting for its batch (goal ≤ 5 %);
  (2) SD-2 size (random weights, built as `benchmarks/run.py` builds them; 512 px): per batch size, with and
      without gradient checkpointing, the median step time, samples/s, peak memory and the data-wait share.
      On a GPU the rows name the card, and the default batch sizes reach 8.

Step time = the seconds between one step record and the next (`elapsed_s`); the first `--warmup` steps of a
row (the first pays for the loader's workers starting and for allocating every buffer) are not counted.
Samples/s = samples of the counted steps / their seconds. Data wait = Σ `data_wait_s` / Σ step time. Peak
memory = torch's `max_memory_allocated` on a GPU, the training process's peak RSS on a CPU (weights, AdamW
state and activations all live there), both read at the row's last step.

Precision (`--precision auto`): bf16 where the device has it (CUDA with bf16; a CPU with AVX512-BF16 or AMX,
elsewhere torch emulates bf16, many times slower), else fp32; the report says which. `digseg train`'s own
default differs on a CPU (fp32 always). Each row also records the 1-minute load average as it ended: on a
shared machine, other processes' work shows there.

How a row runs, and why:
- A row stops right after its last counted step (the progress callback raises `Measured`), so the run's
  final checkpoint is neither written nor timed: at SD-2 size it is ~12 GB with the AdamW state.
- The SD-2 model is built once (random weights), saved as a digseg checkpoint, and each row starts from it
  with `init=` (as `digseg train --init` does; the text encoder and VAE stay frozen, as from an SD base).
- Each SD-2 row runs in a process of its own: its peak memory is its own, and a row the machine cannot hold
  (killed for memory, or CUDA out of memory) is reported as such instead of ending the benchmark; a failed
  row skips the larger batch sizes of the same setting.
- Demo rows run in this process (the model is 5 M parameters; the loader's workers are its children).

`--quick` (smoke test): compact `tiny` for both parts at its 32 px, 1 warm-up + 3 counted steps, batch 1
for (2). The table goes to stdout and to `--out` (default benchmarks/RESULTS.md; `--append` to add a section).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import common

from digseg_cli.weights.store import human_size

PARTS = ("demo", "sd2")
DEMO_BATCH, DEMO_WORKERS, DEMO_SCENES = 8, (0, 2), 64
DATA_WAIT_GOAL = 0.05
# part → (warm-up steps, counted steps) on a CPU and on a GPU. An SD-2 step takes tens of seconds on a
# 2-core CPU, so two counted steps there; a demo step is ~0.1–0.3 s, so 20 make the share of data wait stable.
STEPS = {"demo": {"cpu": (2, 20), "gpu": (2, 20)}, "sd2": {"cpu": (1, 2), "gpu": (2, 5)}}
BATCH_SIZES = {"cpu": "1,2", "gpu": "1,2,4,8"}
RESULT_MARK = "RESULT "  # the line of a row's process that carries its numbers


class Measured(Exception):  # noqa: N818 - not an error: how a row ends its run after its last counted step
    def __init__(self, peak: float):
        super().__init__(peak)
        self.peak = peak


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="demo,sd2", help="parts to run, comma list of demo, sd2 (default both)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="default auto: bf16 where the device has it, else fp32",
    )
    p.add_argument("--batch-sizes", help="(2)'s batch sizes (default 1,2 on a CPU, 1,2,4,8 on a GPU)")
    p.add_argument("--resolutions", default="512", help="(2)'s training resolutions in px (default 512)")
    p.add_argument("--steps", type=int, help="counted steps per row (default: 20 for demo; sd2 2 on CPU, 5 on GPU)")
    p.add_argument("--warmup", type=int, help="uncounted steps before them (default 1 for sd2 on a CPU, else 2)")
    p.add_argument("--quick", action="store_true", help="compact `tiny` for both parts, 3 steps (smoke test)")
    p.add_argument("--out", type=Path, default=common.HERE / "RESULTS.md", help="markdown file to write")
    p.add_argument("--append", action="store_true", help="add this run as a new section of --out")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one row's spec (JSON): run it, print its numbers
    a = p.parse_args(argv)
    if a.child:
        return a
    from digseg_cli.errors import DigsegError
    from digseg_cli.inference.device import resolve_device

    a.size = [x.strip() for x in a.size.split(",") if x.strip()]
    if not a.size or set(a.size) - set(PARTS):
        p.error(f"--size must name some of {', '.join(PARTS)}")
    try:
        a.device = resolve_device(a.device)
    except DigsegError as exc:
        p.error(str(exc))
    if a.device.type not in ("cpu", "cuda"):
        p.error("training is measured on cpu or cuda")
    kind = "gpu" if a.device.type == "cuda" else "cpu"
    a.precision = chosen_precision(a.device) if a.precision == "auto" else a.precision
    a.batch_sizes = [1] if a.quick else [int(b) for b in (a.batch_sizes or BATCH_SIZES[kind]).split(",")]
    a.resolutions = [int(r) for r in a.resolutions.split(",")]
    a.schedule = {part: (1, 3) if a.quick else STEPS[part][kind] for part in PARTS}
    a.schedule = {part: (a.warmup if a.warmup is not None else w, a.steps or n) for part, (w, n) in a.schedule.items()}
    return a


def chosen_precision(device) -> str:
    """bf16 where `device` computes it natively (CUDA with bf16, a CPU with bf16 instructions), else fp32."""
    import torch

    from digseg_cli.inference.device import cpu_has_bf16

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


# -- one row --------------------------------------------------------------------------------------------
def settings(spec: dict):
    """The row's `TrainSettings`: no validation, no checkpoints on schedule, a record every step."""
    from digseg_cli.train.settings import TrainSettings

    return TrainSettings(
        data=Path(spec["data"]),
        out=Path(spec["out"]),
        **({"init": spec["source"]} if spec["init"] else {"base": spec["source"]}),
        resolution=spec["resolution"],
        batch_size=spec["batch"],
        max_steps=spec["warmup"] + spec["steps"],
        val_split=0.0,
        val_every=0,
        save_every=0,
        log_every=1,
        vae_steps=0,
        workers=spec["workers"],
        gradient_checkpointing=spec["checkpointing"],
        precision=spec["precision"],
        cpu=spec["device"] == "cpu",
    )


def measure(spec: dict) -> dict:
    """Train the row's run up to its last counted step: its step records and the peak memory then."""
    import torch

    from digseg_cli.train.loop import train

    device, total = torch.device(spec["device"]), spec["warmup"] + spec["steps"]
    records: list[dict] = []

    def progress(event: dict) -> None:
        if event.get("event") != "step":
            return
        records.append({"elapsed_s": event["elapsed_s"], "data_wait_s": event["data_wait_s"]})
        took = records[-1]["elapsed_s"] - (records[-2]["elapsed_s"] if len(records) > 1 else 0.0)
        print(
            f"[{time.strftime('%H:%M:%S')}] {spec['name']}: step {event['step']}/{total} took {common.s(took)} "
            f"(waited {event['data_wait_s'] * 1000:.1f} ms for data)",
            file=sys.stderr,
            flush=True,
        )
        if event["step"] >= total:
            raise Measured(common.peak_memory(device))

    common.reset_peak_memory(device)
    try:
        train(settings(spec), progress)
    except Measured as done:
        # The load average says whether other processes shared the CPU while the row ran: on the shared 2-core
        # machine, the SD-2 row run beside other jobs read 2.35× the step time of the next one, checkpointing
        # (≤ 1.3× expected) aside.
        return {"records": records, "peak": done.peak, "load": os.getloadavg()[0]}
    raise RuntimeError(f"{spec['name']}: the run ended before step {total}")


def measure_alone(spec: dict) -> dict:
    """`measure` in a process of its own (see the module docstring); {"failed": why} when it could not."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,  # stderr passes through: the row's progress
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if lines:
        return json.loads(lines[-1][len(RESULT_MARK) :])
    why = "killed (SIGKILL: out of memory?)" if done.returncode in (-9, 137) else f"exit status {done.returncode}"
    return {"failed": why}


def die_with_parent() -> None:
    """On Linux, have the kernel kill this row's process when the benchmark's process dies: a stopped benchmark
    would otherwise leave an SD-2 row training for minutes, and a SIGTERM sent to the row would make `train`
    end it with its final checkpoint (12 GB at SD-2 size)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the row outlives a killed benchmark
        pass


def child(spec_json: str) -> int:
    die_with_parent()
    import torch

    spec = json.loads(spec_json)
    try:
        result = measure(spec)
    except torch.OutOfMemoryError:
        result = {"failed": "CUDA out of memory"}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


def summarize(spec: dict, result: dict) -> dict:
    """The row's numbers from its step records, the warm-up left out."""
    if "failed" in result:
        return {**spec, **result}
    elapsed = [0.0] + [r["elapsed_s"] for r in result["records"]]
    times = [b - a for a, b in pairwise(elapsed)][spec["warmup"] :]
    waits = [r["data_wait_s"] for r in result["records"]][spec["warmup"] :]
    return {
        **spec,
        "step_s": statistics.median(times),
        "samples_per_s": spec["batch"] * len(times) / sum(times),
        "wait": sum(waits) / sum(times),
        "peak": result["peak"],
        "load": result["load"],
    }


# -- the parts ------------------------------------------------------------------------------------------
def row_spec(a, tmp: Path, part: str, model: dict, **row) -> dict:
    """One row (JSON-able: it crosses to the row's process): `model` (its label, `source`, whether that is an
    `init` checkpoint, the `data` folder), the row's `resolution`, `batch`, `workers` and `checkpointing`, and
    this run's precision, device and steps."""
    warmup, steps = a.schedule[part]
    name = f"{part} {row['resolution']} px, batch {row['batch']}, {row['workers']} workers, checkpointing " + (
        "on" if row["checkpointing"] else "off"
    )
    return dict(
        part="1" if part == "demo" else "2",
        name=name,
        out=str(tmp / name.replace(" ", "-").replace(",", "")),
        precision=a.precision,
        device=str(a.device),
        warmup=warmup,
        steps=steps,
        **model,
        **row,
    )


def write_scenes(folder: Path, n: int, size: int) -> Path:
    from digseg_cli.data.synth import write_synth_dataset

    write_synth_dataset(folder, n, seed=0, size=size)
    return folder


def parameters(loaded) -> str:
    m = loaded.model
    unet = sum(p.numel() for p in m.unet.parameters()) / 1e6
    total = sum(p.numel() for p in m.parameters()) / 1e6
    return f"U-Net {unet:.1f} M, {total:.1f} M parameters in all"


def demo_rows(a, tmp: Path) -> tuple[list[dict], str]:
    """(1): the demo model (the tiny one with --quick) with each worker count, in this process."""
    from digseg_cli.models.checkpoint import build_compact

    name = "tiny" if a.quick else "small"
    size = 32 if a.quick else 128
    data = write_scenes(tmp / "demo-data", 16 if a.quick else DEMO_SCENES, size)
    model = dict(model=f"compact `{name}`", source=name, init=False, data=str(data))
    rows = []
    for workers in DEMO_WORKERS:
        spec = row_spec(a, tmp, "demo", model, resolution=size, batch=DEMO_BATCH, workers=workers, checkpointing=False)
        rows.append(summarize(spec, measure(spec)))
    return rows, f"compact `{name}`: {parameters(build_compact(name))}"


def sd2_model(a, tmp: Path) -> tuple[Path, str]:
    """The SD-2-size model with random weights (compact `tiny` with --quick), saved for the rows to start from."""
    from digseg_cli.models.checkpoint import build_compact, save_checkpoint

    t0 = time.perf_counter()
    loaded = build_compact("tiny") if a.quick else common.build_sd2()
    label = "compact `tiny` (--quick stand-in)" if a.quick else "SD 2 sizes, random weights"
    label += f": {parameters(loaded)}"
    folder = save_checkpoint(tmp / "sd2-base", loaded)
    del loaded
    gc.collect()  # the rows' processes need the memory
    print(f"[{time.strftime('%H:%M:%S')}] built and saved {label} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return folder, label


def sd2_rows(a, tmp: Path) -> tuple[list[dict], str]:
    """(2): per resolution, batch size and gradient checkpointing on/off, each row in its own process."""
    from digseg_cli.train.loader import default_workers

    base, label = sd2_model(a, tmp)
    resolutions = [32] if a.quick else a.resolutions
    data = write_scenes(tmp / "sd2-data", max(a.batch_sizes) * 2, max(resolutions))
    model = dict(model="compact `tiny`" if a.quick else "SD 2 sizes", source=str(base), init=True, data=str(data))
    workers = default_workers(a.device.type, 1)  # what `digseg train` uses here
    rows, failed = [], set()
    for res in resolutions:
        for batch in a.batch_sizes:
            for checkpointing in (True, False):  # the smaller one first: it tells whether the batch fits at all
                spec = row_spec(
                    a, tmp, "sd2", model, resolution=res, batch=batch, workers=workers, checkpointing=checkpointing
                )
                if (res, checkpointing) in failed:
                    rows.append({**spec, "failed": "not run: a smaller batch failed"})
                    continue
                rows.append(summarize(spec, measure_alone(spec)))
                if "failed" in rows[-1]:
                    failed.add((res, checkpointing))
    return rows, label


# -- the report -----------------------------------------------------------------------------------------
def table_row(r: dict, card: str) -> tuple[str, ...]:
    where = f"{r['model']}, {r['resolution']} px, {r['precision']}, on {card}"
    setting = (str(r["batch"]), "on" if r["checkpointing"] else "off", str(r["workers"]))
    if "failed" in r:
        return (r["part"], where, *setting, r["failed"], "—", "—", "—", "—", "—")
    return (
        r["part"],
        where,
        *setting,
        common.s(r["step_s"]),
        f"{r['samples_per_s']:.3g}",
        human_size(r["peak"]),
        f"{r['wait']:.1%}",
        common.yes(r["wait"] <= DATA_WAIT_GOAL),
        f"{r['load']:.1f}",
    )


def ratios(rows: list[dict]) -> list[str]:
    """The side-by-side ratios of this run: 2 workers against 0, checkpointing on against off."""
    ok = [r for r in rows if "failed" not in r]
    notes = []
    demo = {r["workers"]: r for r in ok if r["part"] == "1"}
    if len(demo) == 2:
        w0, w2 = demo[DEMO_WORKERS[0]], demo[DEMO_WORKERS[1]]
        notes.append(
            f"(1) {w2['workers']} workers / {w0['workers']} workers: {w2['samples_per_s'] / w0['samples_per_s']:.2f}× "
            f"the samples/s (same data, same steps)."
        )
    by = {(r["resolution"], r["batch"], r["checkpointing"]): r for r in ok if r["part"] == "2"}
    for (res, batch, on), r in by.items():
        if on and (off := by.get((res, batch, False))):
            notes.append(
                f"(2) {res} px, batch {batch}: gradient checkpointing on / off: {r['step_s'] / off['step_s']:.2f}× "
                f"the step time, {r['peak'] / off['peak']:.2f}× the peak memory."
            )
    return notes


def report(a, info: dict, rows: list[dict], labels: list[str], t_total: float) -> str:
    card = info["gpu"].split(" (")[0] if a.device.type == "cuda" else f"{info['cpu']} ({info['cores']} cores)"
    head = ("#", "Model, resolution, precision, device", "Batch", "Grad. checkpointing", "Workers")
    head += ("Step time (median)", "Samples/s", "Peak memory", "Data wait", "≤ 5 %", "Load")
    memory = "torch's max_memory_allocated" if a.device.type == "cuda" else "peak RSS of the training process"
    return "\n".join(
        [
            *common.section_head(
                f"training, `--size {','.join(a.size)}` on {a.device}, {a.precision}",
                info,
                f"{a.device}, {a.precision}",
            ),
            f"- **Models:** {'; '.join(labels)}.",
            "- **Rows:** `train()` on synthetic scenes, one-step objective; per row "
            + ", ".join(f"{p}: {a.schedule[p][0]} warm-up + {a.schedule[p][1]} counted step(s)" for p in a.size)
            + f". Peak memory = {memory}. Data wait = Σ data_wait_s / Σ step time of the counted steps "
            f"(goal ≤ {DATA_WAIT_GOAL:.0%}). Load = the 1-minute load average as the row ended (the row's own "
            f"threads and workers count in it; well above {info['cores']} cores, other processes shared the CPU).",
            "",
            common.markdown_table(head, [table_row(r, card) for r in rows]),
            "",
            *[f"- {n}" for n in ratios(rows)],
            f"- Total benchmark time {t_total:.0f} s. Load average (1 min) at the start {info['load']:.2f}, at the "
            f"end {os.getloadavg()[0]:.2f} (other processes on the machine skew timings).",
            "",
        ]
    )


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        return child(a.child)
    t0, info = time.perf_counter(), common.machine()
    rows, labels = [], []
    with tempfile.TemporaryDirectory(prefix="digseg-train-bench-") as tmp:
        for part, run_part in (("demo", demo_rows), ("sd2", sd2_rows)):
            if part in a.size:
                part_rows, label = run_part(a, Path(tmp))
                rows += part_rows
                labels.append(label)
    common.publish(a.out, report(a, info, rows, labels, time.perf_counter() - t0), a.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
