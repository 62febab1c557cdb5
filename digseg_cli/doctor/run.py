"""`run_doctor`: every check of `digseg doctor`, in the order its table shows them.

It only calls the checks (`checks.py`, `machine.py`) and tells `on_section` which one is next, so a caller can
show progress; the exit code the rows add up to is `checks.exit_code`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from digseg_cli.doctor import checks, machine
from digseg_cli.doctor.checks import Check
from digseg_cli.files import DEFAULT_OUT


def run_doctor(
    *,
    weights: str = "demo",
    device: str = "auto",
    precision: str = "auto",
    out: Path = DEFAULT_OUT,
    cache_dir: Path | None = None,
    offline: bool = False,
    on_section: Callable[[str], None] | None = None,
) -> list[Check]:
    """The rows of every check; nothing is downloaded, created or changed."""
    steps: list[tuple[str, Callable[[], list[Check] | Check]]] = [
        ("versions", checks.check_versions),
        ("devices", lambda: machine.check_devices(device, precision)),
        ("caches", lambda: checks.check_caches(cache_dir)),
        ("network", lambda: checks.check_network(offline)),
        ("text encoders", machine.check_text_encoders),
        ("model", lambda: machine.check_model(weights, device, precision, cache_dir=cache_dir, offline=offline)),
        ("output", lambda: checks.check_output(out)),
        ("extras", checks.check_extras),
    ]
    rows: list[Check] = []
    for section, check in steps:
        if on_section is not None:
            on_section(section)
        found = check()
        rows.extend(found if isinstance(found, list) else [found])
    return rows
