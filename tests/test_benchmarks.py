"""`benchmarks/run.py` (issue: Performance): the one-command benchmark runs at tiny size and writes its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_tiny_run_writes_the_table(tmp_path):
    out = tmp_path / "RESULTS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DIGSEG_OFFLINE": "1"}
    t0 = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--size",
            "tiny",
            "--naive-steps",
            "3",
            "--tile-image",
            "96",
            "--demo",
            "tiny",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    text = out.read_text()
    assert text.startswith("# digseg performance results")
    section = text[text.index("## Run: `--size tiny`") :]
    assert section.strip() in done.stdout  # the same table on stdout and in the file
    for needle in (
        "**Machine:**",
        "torch 2",
        "torch threads",
        "usable cores",
        "| # | Measurement | Ours | Baseline | Ratio | Target | Met |",
    ):
        assert needle in text, needle
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    items = {r.split("|")[1].strip() for r in rows}
    assert {"a", "b", "c", "d", "e", "f", "2", "3", "4", "5"} <= items  # 5: bf16 on CPUs with it, else "not measured"
    # fewer naive steps than 50: one measured row and one extrapolated row, clearly labelled
    assert any("measured with 3 steps" in r for r in rows)
    extrapolated = [r for r in rows if "extrapolated" in r]
    assert extrapolated and all("(extrap.)" in r for r in extrapolated)
    for r in rows:  # every row ends with a verdict column
        assert re.search(r"\| (yes|\*\*no\*\*|—|not measured)[^|]*\|$", r), r
    # --append adds a second section to the same file
    again = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--size",
            "tiny",
            "--skip",
            "naive,marigold,floor,startup,folder,tiling,precision",
            "--demo",
            "tiny",
            "--out",
            str(out),
            "--append",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert out.read_text().count("## Run: `--size tiny`") == 2
