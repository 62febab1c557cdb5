"""Device and precision resolution, done once at the edge (code-style rule 10).

`auto` picks CUDA, then MPS, then CPU; an explicit device that is not there is an error with its own exit
code, never a silent fallback. Precision `auto` means bf16 on CUDA where supported (else fp16) and fp32
on CPU and MPS; bf16 asked for on a CPU without bf16 instructions gets a note (it is emulated there, and
slow). `join_processes` joins the processes of a multi-process launch and `leave_process_group` ends
their group cleanly. This module never mutates environment variables and knows nothing of models.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from digseg_cli.errors import DeviceUnavailableError, UsageError

if TYPE_CHECKING:
    from accelerate import PartialState

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}  # torch.bfloat16 → "bf16"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto|cpu|cuda|cuda:N|mps` → a torch.device that exists on this machine."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise DeviceUnavailableError(
                "device `mps` is not available on this machine: use --device cpu or --device auto"
            )
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?|(\d+)", name)
    if not match:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    index = int(match.group(1) or match.group(2) or 0)
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device `{name}` is not available (no CUDA GPU found): use --device cpu or --device auto"
        )
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device `cuda:{index}` does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def resolve_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """`auto|fp32|fp16|bf16` → dtype; `auto` is bf16/fp16 on CUDA and fp32 elsewhere."""
    precision = (precision or "auto").lower()
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    if device.type == "cpu" and precision == "fp16":
        raise UsageError(
            "fp16 is not supported on the CPU: use --precision fp32 (or bf16 on CPUs with AVX512-BF16/AMX)"
        )
    return PRECISIONS[precision]


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16); None where it cannot
    tell. Without them torch emulates bf16, many times slower than fp32 (performance.md, "bf16 on CPU")."""
    system = platform.system()
    if system == "Linux":
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
        return _cpuinfo_has_bf16(text)
    if system == "Darwin":  # Apple silicon from M2 on
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() == "1" if out.returncode == 0 else None
    return None


def _cpuinfo_has_bf16(cpuinfo: str) -> bool | None:
    """`/proc/cpuinfo` text → whether its flag lines (x86 `flags`, Arm `Features`) name a bf16 extension."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def emulated_bf16_note(device: torch.device) -> str | None:
    """A one-line note when bf16 work on `device` would be emulated (a CPU without bf16 instructions), else None."""
    if device.type != "cpu" or cpu_has_bf16() is not False:
        return None
    return (
        "note: this CPU has no bf16 instructions (AVX512-BF16, AMX or Arm BF16), so torch emulates bf16, "
        "which can be many times slower than fp32: use --precision fp32 (the CPU default)"
    )


def precision_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """A one-line note for inference precisions known to change results or to be slow on `device`, else None
    (cli-features: warn when reduced precision is known to change results)."""
    if dtype != torch.bfloat16:
        return None
    # Measured on an H200 with the demo (benchmarks/RESULTS.md, row 5): fp16 stays within 8.8e-3 of fp32,
    # bf16 moves probabilities by up to 8e-2 on class boundaries and changes 0.1 % of the labels.
    # fp16 is refused on the CPU, so there the only closer choice is the default.
    closer = (
        "the CPU default, --precision fp32, does not"
        if device.type == "cpu"
        else "--precision fp16 or fp32 matches fp32 more closely"
    )
    return emulated_bf16_note(device) or (
        "note: bf16 keeps fewer digits than fp16: on class boundaries probabilities can differ from fp32 by up to "
        f"about 0.1 (about 0.1 % of pixels change label); {closer}"
    )


def join_processes(device: str) -> PartialState | None:
    """Under ``accelerate launch``/``torchrun`` (WORLD_SIZE > 1): this process's place in the group, which
    Accelerate joins (NCCL and one GPU per process when CUDA is used, gloo otherwise); None for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not (torch.cuda.is_available() and device not in ("cpu", "mps")))


def is_main(processes: PartialState | None) -> bool:
    """Whether this process reports for the group `join_processes` joined (always, for one process)."""
    return processes is None or processes.is_main_process


def leave_process_group() -> None:
    """Meet the other processes, then close the process group of a multi-process run (no-op otherwise).

    Left open, its threads are torn down at interpreter exit in no fixed order, and now and then a rank
    aborts there ("terminate called without an active exception") after a run that finished well. The
    barrier first: a rank that destroys the group while another is still in a collective can hang it."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """One line for the banner: device name, memory and dtype."""
    precision = PRECISION_NAMES[dtype]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB), {precision}"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads), {precision}"
    return f"{device}, {precision}"
