"""The real peers the test guest is built from and booted with.

A *peer* is a Debian root that provides QEMU, ``qemu-img``, ``qemu-ga``, busybox and the guest
kernel:

* ``"host"`` (the default): the machine's own root, ``/``, with its Debian packages
  (``qemu-system-x86 qemu-utils qemu-guest-agent busybox-static linux-image-amd64``);
* ``"debian13"``: a Debian 13 (trixie) root that qmpagent provisions itself with ``debootstrap``
  into its cache directory (about a minute and 650 MB the first time; as root), giving QEMU 10.0 and
  qemu-ga 10.0 on a Debian 12 host too.

A peer root's programs run on the host through that root's own dynamic loader and libraries
(``ROOT/lib64/ld-linux-x86-64.so.2 --library-path ROOT/lib/x86_64-linux-gnu:... ROOT/usr/bin/X``),
with no chroot, so every path means the same on both sides. Its firmware is found with
``-L ROOT/usr/share/qemu -L ROOT/usr/share/seabios`` and its QEMU modules through
``QEMU_MODULE_DIR``.

Choose the peer with ``boot_guest(peer=...)``, ``build_guest_image(peer=...)``, ``qmpagent
build-guest --peer NAME`` or the environment variable ``QMPAGENT_PEER``.

Nothing here runs ``qemu-ga`` on the host.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import QMPAgentError, UsageError
from . import _host

__all__ = [
    "DEBIAN13_PACKAGES",
    "PEERS",
    "Peer",
    "PeerError",
    "default_peer_name",
    "get_peer",
    "provision_debian13",
]

#: The peers :func:`get_peer` knows.
PEERS = ("host", "debian13")

#: Debian packages of the host peer (what ``scripts/setup.sh`` installs; the list is
#: ``qmpagent/testing/host-packages.txt``).
HOST_PACKAGES = _host.HOST_PACKAGES

#: What the Debian 13 root holds besides its minimal base.
DEBIAN13_PACKAGES = (
    "qemu-system-x86",
    "qemu-utils",
    "qemu-guest-agent",
    "busybox-static",
    "linux-image-amd64",
)

#: The Debian 13 root's suite; bump ``_DEBIAN13_RECIPE`` to re-provision existing roots.
_DEBIAN13_SUITE = "trixie"
_DEBIAN13_RECIPE = "1"

_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64")
_LOADER = "lib64/ld-linux-x86-64.so.2"


class PeerError(QMPAgentError):
    """A peer cannot be used: unknown name, or its root cannot be provisioned or is incomplete."""


def default_peer_name() -> str:
    """The peer named by ``$QMPAGENT_PEER``, else ``"host"``."""
    return os.environ.get("QMPAGENT_PEER") or "host"


def _check_name(name: str) -> str:
    if name not in PEERS:
        raise UsageError(f"unknown peer {name!r}; known peers: {', '.join(PEERS)}")
    return name


@dataclass(frozen=True)
class Peer:
    """A Debian root whose QEMU, ``qemu-img``, ``qemu-ga``, busybox and kernel are used.

    Attributes:
        name: ``"host"`` or ``"debian13"``.
        root: the root directory (``/`` for the host).
    """

    name: str
    root: Path

    @property
    def is_host(self) -> bool:
        """Whether this peer is the machine's own root (programs run directly)."""
        return self.root == Path("/")

    def path(self, path: str) -> Path:
        """``path`` (absolute, as seen inside the root) as a host path."""
        return self.root / path.lstrip("/")

    def guest_path(self, host_path: str | Path) -> str:
        """The inverse of :meth:`path`: a host path inside the root as the root sees it."""
        p = str(host_path)
        if self.is_host:
            return p
        root = str(self.root)
        if p != root and not p.startswith(root + "/"):
            raise PeerError(f"{p} is not inside the {self.name} root {root}")
        return "/" + p[len(root):].lstrip("/")

    def find(self, name: str) -> Path:
        """The root's program ``name`` (searched in its sbin and bin directories).

        Raises:
            PeerError: it is not there (naming the package to install for the host peer).
        """
        found = _host.find_in_root(self.root, name)
        if found is not None:
            return found
        if self.is_host:
            on_path = shutil.which(name)
            if on_path:
                return Path(on_path)
            raise PeerError(f"{name} not found; install it with: {_host.INSTALL_HINT}")
        raise PeerError(f"{name} not found in the {self.name} root {self.root}; remove it to re-provision")

    @property
    def library_path(self) -> str:
        """The root's library directories, for its loader's ``--library-path``."""
        return ":".join(str(self.root / d) for d in _LIB_DIRS)

    def command(self, name: str) -> list[str]:
        """The argv prefix that runs the root's program ``name`` on this host."""
        program = self.find(name)
        if self.is_host:
            return [str(program)]
        return [*self.command_loader(), str(program)]

    def qemu_command(self) -> list[str]:
        """``qemu-system-x86_64`` with the root's firmware directories."""
        argv = self.command("qemu-system-x86_64")
        if not self.is_host:
            for d in ("usr/share/qemu", "usr/share/seabios"):
                argv += ["-L", str(self.root / d)]
        return argv

    def environment(self) -> dict[str, str]:
        """Extra environment for the root's QEMU (its loadable modules)."""
        if self.is_host:
            return {}
        return {"QEMU_MODULE_DIR": str(self.root / "usr/lib/x86_64-linux-gnu/qemu")}

    def shared_libraries(self, binary: Path) -> list[Path]:
        """The libraries ``binary`` (a host path inside the root) loads, loader included, as
        host paths."""
        loader = ["ldd"] if self.is_host else [*self.command_loader(), "--list"]
        argv = [*loader, str(binary)]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        except FileNotFoundError as exc:  # pragma: no cover - ldd is part of libc-bin
            raise PeerError(f"{argv[0]} not found") from exc
        libs = []
        for line in out.splitlines():
            m = re.search(r"(/\S+)\s+\(0x", line)
            if m:
                libs.append(Path(m.group(1)))
        return libs

    def command_loader(self) -> list[str]:
        """The root's dynamic loader with its library path (peer roots only).

        Raises:
            PeerError: the root has no loader (a broken or partial root).
        """
        loader = self.root / _LOADER
        if not loader.exists():
            raise PeerError(f"the {self.name} root {self.root} has no {_LOADER}")
        return [str(loader), "--library-path", self.library_path]


def get_peer(
    name: str | None = None,
    *,
    provision: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Peer:
    """The peer called ``name`` (default :func:`default_peer_name`).

    Args:
        name: ``"host"`` or ``"debian13"``.
        provision: for ``"debian13"``, provision its root if it is not there yet (needs root
            and ``debootstrap``; about a minute); if False, a missing root is an error.
        cache_dir: where peer roots live (default: ``peers/`` beside the guest cache).

    Raises:
        UsageError: unknown name.
        PeerError: the root is missing (``provision=False``) or cannot be provisioned.
    """
    name = _check_name(name or default_peer_name())
    if name == "host":
        return Peer("host", Path("/"))
    base = Path(cache_dir) if cache_dir is not None else _default_peers_dir()
    root = base / name / "root"
    if not (base / name / "complete").exists() or (base / name / "complete").read_text().strip() != (
        _DEBIAN13_RECIPE
    ):
        if not provision:
            raise PeerError(f"the {name} root is not provisioned (qmpagent build-guest --peer {name})")
        provision_debian13(base / name)
    return Peer(name, root)


def _default_peers_dir() -> Path:
    env = os.environ.get("QMPAGENT_PEER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qmpagent" / "peers"


def _debian_mirror() -> str:
    """The Debian archive the host's apt uses (``$QMPAGENT_DEBIAN_MIRROR`` overrides)."""
    env = os.environ.get("QMPAGENT_DEBIAN_MIRROR")
    if env:
        return env
    uris: list[str] = []
    # apt reads only *.list and *.sources there (not, e.g., *.disabled files).
    listdir = Path("/etc/apt/sources.list.d")
    sources = [Path("/etc/apt/sources.list"), *sorted(listdir.glob("*.list")),
               *sorted(listdir.glob("*.sources"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("URIs:"):
                uris += line.split()[1:]
            elif line.startswith("deb "):
                parts = [p for p in line.split()[1:] if not p.startswith("[")]
                if parts:
                    uris.append(parts[0])
    for uri in uris:
        if "security" not in uri and re.match(r"https?://", uri):
            return uri.rstrip("/")
    raise PeerError(
        "cannot tell which Debian archive to debootstrap from (no http(s) URI in /etc/apt/sources.list*); "
        "set QMPAGENT_DEBIAN_MIRROR"
    )


def provision_debian13(directory: str | os.PathLike[str]) -> Path:
    """Provision the Debian 13 root in ``directory`` (``directory/root``), if not done yet.

    Runs ``debootstrap --variant=minbase --include=<DEBIAN13_PACKAGES> trixie`` into a
    temporary directory beside it and renames it into place when complete, under a lock, so
    parallel callers share one provisioning and an interrupted one leaves nothing half-made.
    ``debootstrap`` is installed with ``apt-get`` if it is missing.

    Raises:
        PeerError: not root, or debootstrap failed (its output tail is in the message).
    """
    target = Path(directory)
    stamp = target / "complete"
    if stamp.exists() and stamp.read_text().strip() == _DEBIAN13_RECIPE:
        return target / "root"
    if os.geteuid() != 0:
        raise PeerError("provisioning the debian13 peer needs root (debootstrap); run it as root once")
    target.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == _DEBIAN13_RECIPE:
            return target / "root"
        debootstrap = shutil.which("debootstrap") or (
            "/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None
        )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", INITRD="No")

        def run(argv: list[str], what: str) -> None:
            # debootstrap and apt-get say why they failed on stdout too, at length.
            _host.run(argv, PeerError, what=what, env=env, with_stdout=True)

        if debootstrap is None:
            run(["apt-get", "update", "-qq"], "apt-get update")
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"],
                "apt-get install debootstrap")
            debootstrap = "/usr/sbin/debootstrap"
        tmp = Path(tempfile.mkdtemp(prefix=".root-", dir=target))
        try:
            run(
                [debootstrap, "--variant=minbase", "--include=" + ",".join(DEBIAN13_PACKAGES),
                 _DEBIAN13_SUITE, str(tmp), _debian_mirror()],
                "debootstrap of Debian 13",
            )
            # The kernel is only booted as the test guest: no initramfs of its own is needed.
            old = target / "root"
            if old.exists():
                shutil.rmtree(old)
            tmp.rename(old)
            stamp.write_text(_DEBIAN13_RECIPE + "\n")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target / "root"
