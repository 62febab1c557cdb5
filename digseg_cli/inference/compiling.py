"""`--compile`: a pipeline's parts run through `torch.compile`, each part going back to eager if the compiler fails.

One job: `compile_pipeline` checks that torch.compile can run here (`require_compiler`: exit 2 with one line when
it cannot), then wraps the U-Net pass (`DigsegModel.forward`), the VAE's encoder and decoder and, where the
checkpoint has them, the fast decoder and encoder, each compiled with dynamic shapes (tiles, batches and image
sizes vary within a run). A part whose compile (or compiled run) fails with a compiler error runs eagerly from
then on, after one warning: results stay those of the eager model. Making the first calls, the ones that
compile, is `warmup.py`'s; the `compile` record of run.json and eval's report is `compile_record`'s.

The wrappers are instance attributes over the model's methods: the modules, their weights and `state_dict` keys
stay as they are (`save_pretrained` writes the same checkpoint). It knows nothing of files or the command line.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from digseg_cli.errors import UsageError

DigsegPipeline = Any  # `inference.pipeline`'s (not imported: it imports this)
log = logging.getLogger("digseg")

BACKEND = "inductor"  # what `--compile` uses; tests pass dynamo's "eager" backend (traces, compiles nothing)
# Part name → the `DigsegModel` method it compiles, and the module that must exist for it.
PARTS = {
    "unet": ("forward", "unet"),
    "vae_encoder": ("encode_image", "vae"),
    "vae_decoder": ("decode_probs", "vae"),
    "fast_decoder": ("decode_probs_fast", "fast_decoder"),
    "fast_encoder": ("encode_image_fast", "fast_encoder"),
}


def compiler_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the compiler failed", not "the model or its inputs are wrong": dynamo's own
    (inductor's are among them once wrapped) and inductor's C++ / Triton failures raised before wrapping."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc as inductor

    raw = ("CppCompileError", "InvalidCxxCompiler", "TritonMissing", "GPUTooOldForTriton", "CUDACompileError")
    return (TorchDynamoException, *(getattr(inductor, name) for name in raw if hasattr(inductor, name)))


def require_compiler(backend: str, device: torch.device) -> None:
    """A `UsageError` (exit 2) naming what is missing when torch.compile cannot run `backend` on `device`:
    no dynamo for this Python, no C++ compiler for inductor on a CPU, no Triton for inductor on a GPU."""
    try:
        import torch._dynamo
    except ImportError as exc:
        raise UsageError(f"--compile needs torch.compile, which this torch cannot import ({exc})") from None
    if not torch._dynamo.is_dynamo_supported():
        raise UsageError("--compile: torch.compile does not support this Python version; leave --compile out")
    if backend != "inductor":
        return
    if device.type == "cpu":
        from torch._inductor import config
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            compiler = get_cpp_compiler()
        except compiler_errors():
            compiler = None
        if compiler is None or shutil.which(compiler) is None:
            wanted = ", ".join(str(c) for c in config.cpp.cxx if c) or "g++"
            raise UsageError(
                f"--compile on a CPU needs a C++ compiler ({wanted}, or $CXX) and none was found: "
                "install one (e.g. apt install g++) or leave --compile out"
            )
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UsageError("--compile on CUDA needs Triton (pip install triton); or leave --compile out")


def _shapes_apart() -> contextlib.AbstractContextManager:
    """Compile without "duck sizing": equal sizes (a square image's height and width, a batch that equals the
    latent's channels) would otherwise be assumed equal for good, and the next image compile again."""
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # a torch without the switch: duck sizing stays, at worst a recompile per new shape
        return contextlib.nullcontext()
    return fx_config.patch(use_duck_shape=False)


class CompiledPart:
    """One model method run compiled; eager from the first compiler error on (`failed` says why)."""

    def __init__(self, name: str, eager: Callable, backend: str):
        self.name, self.eager = name, eager
        self.compiled = torch.compile(eager, dynamic=True, backend=backend)
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            # A latent broadcast over a batch (one image's for all its prompts: stride 0) and the same latent row
            # by row are one graph when the broadcast is copied (a few KiB); else each compiles for itself.
            args = tuple(a.contiguous() if isinstance(a, torch.Tensor) and 0 in a.stride() else a for a in args)
            try:
                with _shapes_apart():
                    return self.compiled(*args, **kwargs)
            except compiler_errors() as exc:
                self.failed = _first_line(exc)
                log.warning("--compile: compiling the %s failed (%s); it runs eagerly", self.name, self.failed)
        return self.eager(*args, **kwargs)


@dataclass
class CompiledPipeline:
    """What `compile_pipeline` did to a pipeline: its compiled parts and the warm-up's time."""

    backend: str
    parts: dict[str, CompiledPart] = field(default_factory=dict)
    warmup_s: float | None = None  # None until `warm_up` ran

    def record(self) -> dict[str, Any]:
        """The `compile` record of run.json and of eval's report."""
        return {
            "enabled": True,
            "backend": self.backend,
            "warmup_s": None if self.warmup_s is None else round(self.warmup_s, 3),
            "parts": list(self.parts),
            "eager_fallbacks": {name: part.failed for name, part in self.parts.items() if part.failed},
        }


def compile_pipeline(pipe: DigsegPipeline, backend: str | None = None) -> DigsegPipeline:
    """`pipe` with its parts compiled in place (lazily: the first call of each compiles); `pipe.compiled` (a
    `CompiledPipeline`) says which. `backend`: torch.compile's, default `BACKEND`. A `UsageError` when
    torch.compile cannot run it on the pipeline's device (`require_compiler`)."""
    backend = backend or BACKEND
    require_compiler(backend, pipe.device)
    model = pipe.model
    done = CompiledPipeline(backend)
    for name, (method, module) in PARTS.items():
        if getattr(model, module, None) is None:
            continue
        # The class's function bound to the model: an earlier compile's wrapper is replaced, not wrapped again.
        eager = getattr(type(model), method).__get__(model)
        done.parts[name] = CompiledPart(name.replace("_", " "), eager, backend)
        # `nn.Module.__setattr__` keeps a plain callable in the instance's __dict__, ahead of the class's method.
        setattr(model, method, done.parts[name])
    pipe.compiled = done
    return pipe


def compile_record(pipe) -> dict[str, Any]:
    """`{"enabled": false}`, or what was compiled, by which backend, the warm-up's seconds and the parts that went
    back to eager (and why)."""
    compiled = getattr(pipe, "compiled", None)
    return {"enabled": False} if compiled is None else compiled.record()


def _first_line(exc: BaseException) -> str:
    """One line saying why: a failed backend's own error (dynamo's message only names the backend), else the
    error's first line."""
    inner = getattr(exc, "inner_exception", None)  # `BackendCompilerFailed` and inductor's errors carry it
    if inner is not None and inner is not exc:
        return f"{type(inner).__name__}: {_first_line(inner)}"
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."
