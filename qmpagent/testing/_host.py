"""What the test rig needs of the machine it runs on: the Debian packages of the host peer (read
from ``host-packages.txt``, which ``scripts/setup.sh`` installs), finding a program in a root's
bin directories, and running a program whose failure is an error of the caller's kind."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["BIN_DIRS", "HOST_PACKAGES", "INSTALL_HINT", "find_in_root", "run"]


def _read_packages(path: Path) -> tuple[str, ...]:
    words = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return tuple(word for word in words if word)


#: The host peer's Debian packages, from the one list both the shell and Python read. Beside
#: this module (package data), so an installed package, editable or not, has it too.
HOST_PACKAGES: Final = _read_packages(Path(__file__).with_name("host-packages.txt"))

#: The command line that installs them, for "not found" errors.
INSTALL_HINT: Final = "apt-get install -y --no-install-recommends " + " ".join(HOST_PACKAGES)

#: Where a Debian root keeps programs, in the order they are searched.
BIN_DIRS: Final = ("usr/sbin", "sbin", "usr/bin", "bin")


def find_in_root(root: Path, name: str) -> Path | None:
    """The program ``name`` in ``root``'s :data:`BIN_DIRS` (a host path), or None."""
    for d in BIN_DIRS:
        candidate = root / d / name
        if candidate.exists():
            return candidate
    return None


def run(
    argv: list[str],
    error: Callable[[str], Exception],
    *,
    what: str | None = None,
    env: dict[str, str] | None = None,
    with_stdout: bool = False,
) -> None:
    """Run ``argv``; if it fails, raise ``error("<what> failed (<status>): <output>")``.

    Args:
        what: names the step in the message (default: the command line).
        env: the program's environment (default: ours).
        with_stdout: the output is the last 2,000 characters of its stdout and stderr (for a
            program that reports on stdout at length, like debootstrap), else its stderr.
    """
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()[-2000:] if with_stdout else proc.stderr.strip()
        raise error(f"{what or ' '.join(argv)} failed ({proc.returncode}): {output}")
