"""What `benchmarks/run.py` (inference) and `benchmarks/train.py` (training) share: the description of the
machine a run measured on, peak memory (RSS on a CPU, torch's allocations on CUDA), the SD-2-size model with
random weights, the number formats of their tables, and how a run's section is written into RESULTS.md.

The scripts run as `python benchmarks/NAME.py`, so this folder is on `sys.path` and they `import common`.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TITLE = (
    "# digseg performance results\n\nWritten by `benchmarks/run.py` (inference), `benchmarks/train.py` "
    "(training) and `benchmarks/geotiff_memory.py` (large GeoTIFFs); see their docstrings for what each row "
    "measures.\n\n"
)


# -- machine and memory ---------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "flags": ""}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
        info["flags"] = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")
    info.update(
        cores=cores,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        ram_gib=ram,
        python=platform.python_version(),
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        omp=os.environ.get("OMP_NUM_THREADS", "unset"),
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        gpu="",
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
            f"CUDA {torch.version.cuda}"
        )
    return info


def machine_line(info: dict, ran_on: str) -> str:
    """The report's one line about the machine (`info` from `machine()`) and what the run ran on."""
    return (
        f"- **Machine:** {info['cpu']} ({info['flags'] or 'no AVX flags read'}), {info['cores']} usable cores, "
        f"{info['ram_gib']:.0f} GiB RAM; Python {info['python']}, torch {info['torch']}, "
        f"{info['threads']} torch threads in this run (OMP_NUM_THREADS={info['omp']})"
        + (f"; GPU: {info['gpu']}" if info["gpu"] else "")
        + f"; ran on **{ran_on}**."
    )


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next phase is measured alone (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> float:
    """Peak resident set size in bytes: VmHWM since the last reset, else getrusage's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device) -> None:
    """Start measuring peak memory here: torch's CUDA peak on a GPU, the process's peak RSS elsewhere."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory(device) -> float:
    """Bytes: the most torch held on the GPU since `reset_peak_memory` (`max_memory_allocated`), or the peak
    RSS on a CPU (the weights, the optimizer state and the activations all live in the process there)."""
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()


# -- models ---------------------------------------------------------------------------------------------
def build_sd2():
    """SD 2 sizes (U-Net, VAE, OpenCLIP-H-size text encoder) with random weights, widened by `assemble`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from digseg_cli.models.checkpoint import assemble
    from digseg_cli.models.compact import SCHEDULER_CONFIG, build_tokenizer
    from digseg_cli.models.config import DigsegConfig

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    unet = UNet2DConditionModel(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        sample_size=768,
        block_out_channels=(128, 256, 512, 512),
        scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    # OpenCLIP-H's 49,408-token embedding table (the compact tokenizer uses the first ~600 ids), so the
    # weights in memory are the real text encoder's size.
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(len(tokenizer), 49408),
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            projection_dim=512,
            hidden_act="gelu",
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    config = DigsegConfig(
        base_model="random weights, SD 2 sizes", prediction_type="v_prediction", default_resolution=512, film_hidden=256
    )
    return assemble(unet, vae, text, tokenizer, dict(SCHEDULER_CONFIG), config)


# -- tables and the results file ------------------------------------------------------------------------
def s(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def yes(ok: bool, extrapolated: bool = False) -> str:
    return ("yes" if ok else "**no**") + (" (extrapolated)" if extrapolated else "")


def markdown_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def publish(out: Path, text: str, append: bool) -> None:
    """Print a run's section and write it to `out`: after what is there with `append` (the by-hand summary on
    top and the earlier runs stay), else as a new file under the title."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    if append and out.is_file():
        out.write_text(out.read_text().rstrip("\n") + "\n\n" + text)
    else:
        out.write_text(TITLE + text)
    print(f"wrote {out}", file=sys.stderr)
