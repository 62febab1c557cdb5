"""Device and precision helpers: the CPU bf16 check that decides whether bf16 on a CPU gets its note."""

from __future__ import annotations

import pytest
import torch

from digseg_cli.inference import device

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
X86_AMX = "flags\t\t: fpu avx2 amx_tile amx_bf16\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (X86_BF16, True),
        (X86_AMX, True),
        (X86_AVX2, False),
        (ARM_BF16, True),
        (ARM_OLD, False),
        ("model name\t: ?\n", None),
    ],
)
def test_cpuinfo_flags_tell_whether_the_cpu_has_bf16_instructions(cpuinfo, expected):
    assert device._cpuinfo_has_bf16(cpuinfo) is expected


def test_bf16_notes_name_emulation_only_where_the_cpu_lacks_the_instructions(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert "emulates bf16" in device.precision_note(torch.bfloat16, cpu)
    assert device.emulated_bf16_note(cuda) is None and "fp16 or fp32" in device.precision_note(torch.bfloat16, cuda)
    for unknown_or_native in (None, True):
        monkeypatch.setattr(device, "cpu_has_bf16", lambda v=unknown_or_native: v)
        assert device.emulated_bf16_note(cpu) is None
        assert "bf16 keeps fewer digits" in device.precision_note(torch.bfloat16, cpu)
    assert device.precision_note(torch.float32, cpu) is None and device.precision_note(torch.float16, cuda) is None


def test_this_machine_answers_the_bf16_question_without_error():
    assert device.cpu_has_bf16() in (True, False, None)
