"""Rewrite the two lock files from the venvs the test command passed with.

    .venv/bin/python scripts/lock_deps.py     # then run the test command before committing

``constraints.txt`` pins, for ``.venv``, every package that ``requirements.txt`` does not name (what those
pull in); ``requirements-label-studio.txt`` pins every package of ``.venv-ls``. ``scripts/setup.sh`` installs
with both, so a new release of a dependency nobody named cannot change a fresh set-up (sentry-sdk 3.0.0 stopped
Label Studio 1.23.2 from starting, 2026-12-07).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNPINNED = {"freeal-backend", "pip", "setuptools", "wheel"}
CONSTRAINTS_HEAD = """\
# Transitive pins for .venv: requirements.txt names what freeal asks for; this pins what those pull in, as in the
# venv the test command passed with. scripts/setup.sh and the Dockerfile install with `-c constraints.txt`, so a
# new release of a package nobody named cannot change a fresh set-up. Written by scripts/lock_deps.py.
"""
LABEL_STUDIO_HEAD = """\
# .venv-ls: Label Studio 1.23.2 for the tests and the no-Docker walk-through (docker-compose.yml uses its
# official image), every package pinned as in the venv the test command passed with. label-studio leaves most
# of its dependencies open, and sentry-sdk 3.0.0 stops 1.23.2 from starting ("TypeError: Unknown option
# 'send_default_pii'", seen 2026-12-07). psycopg: Label Studio on PostgreSQL (benchmarks/ls_push.py
# --postgres). scripts/setup.sh installs this file. Written by scripts/lock_deps.py.
"""


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: Path) -> dict[str, str]:
    """name -> version of every distribution in the venv of ``python`` (local version labels dropped)."""
    code = "import importlib.metadata as m; [print(d.metadata['Name'], d.version) for d in m.distributions()]"
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout
    pairs = (line.split() for line in out.splitlines() if line.strip())
    return {normalise(name): version.split("+")[0] for name, version in pairs if normalise(name) not in UNPINNED}


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name[extras]==version`` line of a requirements file."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line.split("#")[0].strip())
        if match:
            found[normalise(match.group(1))] = match.group(3)
    return found


def write(path: Path, head: str, versions: dict[str, str]) -> None:
    path.write_text(head + "".join(f"{name}=={version}\n" for name, version in sorted(versions.items())))
    print(f"{path.name}: {len(versions)} pins")


def main() -> None:
    named = pins(ROOT / "requirements.txt")
    rest = {name: v for name, v in installed(ROOT / ".venv" / "bin" / "python").items() if name not in named}
    write(ROOT / "constraints.txt", CONSTRAINTS_HEAD, rest)
    ls_python = ROOT / ".venv-ls" / "bin" / "python"
    if not ls_python.exists():
        sys.exit(f"{ls_python} is absent: run scripts/setup.sh first")
    write(ROOT / "requirements-label-studio.txt", LABEL_STUDIO_HEAD, installed(ls_python))


if __name__ == "__main__":
    main()
