"""The trainer state: safetensors + JSON, read back exactly; an older digseg's pickle is refused unread."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.errors import DigsegError
from digseg_cli.train.state import STATE_JSON, STATE_TENSORS, load_state, rng_state, save_state


def _real_state() -> dict:
    """What `save_run_checkpoint` saves, from a real AdamW, diffusers schedule and EMA after a few steps."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    ema = EMAModel(net.parameters(), decay=0.9)
    for _ in range(3):
        net(torch.randn(5, 3)).square().mean().backward()
        opt.step(), sched.step(), ema.step(net.parameters()), opt.zero_grad()
    return {
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "step": 3,
        "epoch": 0,
        "batch_in_epoch": 3,
        "best_miou": None,
        "elapsed_s": 1.25,
        "rng": rng_state(),
        "ema": ema.state_dict(),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_the_state_comes_back_bit_for_bit_and_holds_no_pickle(tmp_path: Path) -> None:
    state = _real_state()
    save_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_TENSORS]
    assert _same(state, load_state(tmp_path))
    record = json.loads((tmp_path / STATE_JSON).read_text())
    assert record["state"]["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.99]}
    assert {"optimizer.state.0.exp_avg", "ema.shadow_params.1", "rng.torch"} <= set(load_file(tmp_path / STATE_TENSORS))


def _old_pickle(folder: Path) -> None:
    (folder / "trainer_state.pt").write_bytes(pickle.dumps({"step": 1}))


def _nothing(folder: Path) -> None:
    """A checkpoint folder without any trainer state (`best/`)."""


def _edited_json(folder: Path) -> None:
    save_state(folder, {"step": 1, "w": torch.ones(2)})
    (folder / STATE_JSON).write_text('{"schema": "digseg.trainer-state/1", "state": {"w": {"__tensor__": "gone"}}}')


def _truncated_tensors(folder: Path) -> None:
    save_state(folder, {"step": 1, "w": torch.ones(2)})
    (folder / STATE_TENSORS).write_bytes((folder / STATE_TENSORS).read_bytes()[:20])


UNREADABLE = [
    # (what the folder holds, exit code, message fragment)
    (_old_pickle, 5, "was written by an older digseg (a pickle, which digseg no longer reads): start a new run"),
    (_nothing, 2, "nothing to resume"),
    (_edited_json, 5, "cannot read the trainer state"),
    (_truncated_tensors, 5, "cannot read the trainer state"),
]


@pytest.mark.parametrize(("setup", "code", "fragment"), UNREADABLE, ids=lambda v: getattr(v, "__name__", None))
def test_a_state_that_cannot_be_read_is_one_line(tmp_path: Path, setup, code, fragment) -> None:
    setup(tmp_path)
    with pytest.raises(DigsegError) as info:
        load_state(tmp_path)
    assert info.value.exit_code == code and fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("setup", "code", "fragment"), UNREADABLE[:2], ids=lambda v: getattr(v, "__name__", None))
def test_train_resume_refuses_before_reading_data(tmp_path: Path, setup, code, fragment) -> None:
    (tmp_path / "last").mkdir()
    setup(tmp_path / "last")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path), "--resume"])
    assert result.exit_code == code, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert code == 2 or f"--init {tmp_path / 'last'}" in result.stderr
