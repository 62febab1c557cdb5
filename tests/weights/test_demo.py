"""The built-in demo model (issue: weights): bundled, small, offline, documented, and the default of
`digseg segment`, whose README command runs on the example image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.models.compact import compact_name

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "weights" / "demo"


def test_demo_is_a_small_documented_checkpoint():
    config = json.loads((DEMO / "digseg_config.json").read_text())
    assert [c["name"] for c in config["classes"]] == ["road", "tree", "building", "water", "field"]
    assert "synthetic" in config["description"]
    # The recorded recipe is the shipped one, and the whole build a script in weights/ that anyone can run; no
    # machine paths in the shipped record.
    # Three stages, each from the one before's best checkpoint: `--recipe demo` (recorded under first_stage),
    # `--recipe demo-192` (second_stage), then `--recipe demo-256`.
    stages = "digseg train --recipe demo, then digseg train --recipe demo-192 --init <its best checkpoint>, then "
    assert config["training"]["recipe"] == stages + "digseg train --recipe demo-256 --init <its best checkpoint>"
    assert config["training"]["settings"]["recipe"] == "demo-256"
    assert config["training"]["second_stage"]["settings"]["recipe"] == "demo-192"
    assert config["training"]["first_stage"]["settings"]["recipe"] == "demo"
    assert config["training"]["build"] == "bash weights/make_demo.sh"
    script = (REPO / "weights" / "make_demo.sh").read_text()
    assert "digseg train --recipe demo --out" in script and "digseg decoder train" in script
    assert 'digseg train --recipe demo-192 --init "$work/run/best"' in script
    assert 'digseg train --recipe demo-256 --init "$work/run192/best"' in script
    # It records its whole training vocabulary and the text encoder it needs, not a copy of the encoder.
    assert config["unrelated_words"] and all(c["synonyms"] for c in config["classes"])
    encoder = json.loads((DEMO / "text_encoder" / "config.json").read_text())
    assert encoder["weights"] == "minilm-l6-v2" and set(encoder["sha256"]) >= {"model.safetensors"}
    assert not (DEMO / "text_encoder" / "model.safetensors").exists()
    assert "/work/" not in json.dumps(config) and "/home/" not in json.dumps(config)
    # The recipe names the base bare (`small-minilm`); the checkpoint records the same config as `compact:NAME`.
    assert compact_name(config["training"]["settings"]["base"]) == compact_name(config["base_model"])
    assert config["evaluation"]["synth"]["miou"] >= 0.85  # issue 19's bar, on a split not used in training
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"demo model is {size / 2**20:.1f} MiB"


def test_demo_loads_offline_and_verifies(monkeypatch):
    from digseg_cli import load_pipeline
    from digseg_cli.weights.cache import verify_weights

    monkeypatch.setenv("DIGSEG_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline("demo")
    tuning = pipe.config.evaluation["default_resolution_tuning"]  # the best of the tuning split's resolutions
    assert pipe.config.default_resolution == tuning["chosen"] == int(max(tuning["miou"], key=tuning["miou"].get))
    statuses = verify_weights("demo", offline=True)
    assert statuses and all(s["status"] == "ok" for s in statuses), statuses


def test_installed_package_carries_the_demo(tmp_path):
    """Run from outside the checkout: a non-editable install must find the demo inside the package."""
    code = (
        "import json, digseg_cli, pathlib\n"
        "from digseg_cli.weights.store import bundled_dir\n"
        "print(json.dumps({'package': str(pathlib.Path(digseg_cli.__file__).parent), 'demo': "
        "str(bundled_dir('demo'))}))\n"
    )
    env = {**os.environ, "DIGSEG_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    package, demo = Path(found["package"]), Path(found["demo"])
    if package == REPO / "digseg_cli":
        # An editable install imports the checkout itself; the demo then comes from weights/.
        assert demo == DEMO
    else:
        assert demo == package / "bundled" / "demo" and (demo / "digseg_config.json").is_file()


def test_readme_command_segments_the_example_with_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGSEG_OFFLINE", "1")
    result = CliRunner().invoke(
        app,
        [
            "segment",
            str(REPO / "examples" / "aerial-1.png"),
            "--prompt",
            "road, tree, building, water, field",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "demo model" in result.output
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "run.json" in written and any(n.endswith(".mask.png") for n in written)
    assert any(n.endswith(".overlay.jpg") for n in written)
