"""Every package of both venvs is pinned, and the set-up installs with those pins.

On 2026-12-07 CI failed on a fresh machine: ``pip install label-studio==1.23.2`` took sentry-sdk 3.0.0, released
after the last green run, and Label Studio then exited at start ("TypeError: Unknown option
'send_default_pii'"), so every Label Studio test errored. A venv the lock files do not describe is a set-up
that nobody has tested.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from tests.fixtures_ls import LS_BIN

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock_deps", ROOT / "scripts" / "lock_deps.py")
lock_deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_deps)


def _differences(installed: dict[str, str], pinned: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {name: (installed.get(name), pinned.get(name)) for name in sorted(set(installed) | set(pinned))
            if installed.get(name) != pinned.get(name)}


def test_the_project_venv_is_what_requirements_and_constraints_pin() -> None:
    """``.venv`` (this interpreter's) holds exactly the packages requirements.txt and constraints.txt pin, at
    those versions; ``scripts/lock_deps.py`` rewrites constraints.txt after a deliberate change."""
    named, constrained = lock_deps.pins(ROOT / "requirements.txt"), lock_deps.pins(ROOT / "constraints.txt")
    assert not set(named) & set(constrained)
    assert _differences(lock_deps.installed(Path(sys.executable)), named | constrained) == {}


def test_the_label_studio_venv_is_what_its_lock_pins() -> None:
    """``.venv-ls`` holds exactly the packages requirements-label-studio.txt pins (installed, version)."""
    python = LS_BIN.parent / "python"
    if not python.exists():
        pytest.skip(f"{python} is absent (scripts/setup.sh makes it)")
    pinned = lock_deps.pins(ROOT / "requirements-label-studio.txt")
    assert pinned["label-studio"] == "1.23.2"
    assert int(pinned["sentry-sdk"].split(".")[0]) < 3  # 3.0.0 stops Label Studio 1.23.2 at start
    assert _differences(lock_deps.installed(python), pinned) == {}


def test_the_set_up_and_the_image_install_with_the_pins() -> None:
    """scripts/setup.sh installs .venv with ``-c constraints.txt`` and .venv-ls from its lock, and sets a venv
    up again when its lock changes; the Dockerfile installs with the same constraints."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r"\.venv/bin/pip install [^\n]*-r requirements\.txt -c constraints\.txt", setup)
    assert re.search(r"\.venv-ls/bin/pip install -q -r requirements-label-studio\.txt", setup)
    assert "label-studio==" not in setup  # no unpinned resolve of Label Studio's dependencies
    stamp = setup[setup.index("STAMP="):setup.index('if ! [ -f "$STAMP" ]')]
    assert "constraints.txt" in stamp, stamp
    assert re.search(r"LS_STAMP=\.venv-ls/\.requirements-\$\(sha256sum requirements-label-studio\.txt", setup)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install [^\n]*-r requirements\.txt -c constraints\.txt", dockerfile)
    assert re.search(r"^COPY requirements\.txt constraints\.txt \./$", dockerfile, re.M)
