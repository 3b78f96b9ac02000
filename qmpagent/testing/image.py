"""Build the minimal test guest from a peer's Debian packages (the host's by default).

The guest is a kernel, an initramfs and two small ext4 data disks, all taken from one *peer*
(:mod:`qmpagent.testing.peer`): the host's own root, or a provisioned Debian 13 root:

* the kernel is the peer's ``/boot/vmlinuz-*`` (package ``linux-image-amd64``); its payload (xz on
  Debian 12, zstd on Debian 13), decompressed, is an ELF ``vmlinux`` with a PVH entry note that
  QEMU's ``-kernel`` boots directly, which saves about half the boot time under TCG;
* the initramfs holds busybox-static, the peer's real ``/usr/sbin/qemu-ga`` with the libraries it
  links against, the virtio and ext4 modules (plain, ``.ko.xz`` or ``.ko.zst``; those built into
  the kernel are left out), and an ``/init`` script (:data:`INIT_SCRIPT`) that
  loads them, mounts the data disks, starts ``qemu-ga`` (restarting it when it exits), an optional
  timestamp writer, and a small command channel for tests on a second virtio-serial port;
* the data disks are ext4 images converted to qcow2; every boot gets fresh overlays on them.

Everything is cached in one directory, keyed by a digest of the inputs (paths, sizes and
modification times of every file taken from the peer, plus the builder's own recipe): a second
build with the same inputs returns at once. Builds are serialised with a lock file, so parallel
test processes share one build.

Nothing here runs ``qemu-ga`` on the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import QMPAgentError
from . import _host
from .peer import HOST_PACKAGES, Peer, PeerError, get_peer

__all__ = [
    "APT_PACKAGES",
    "GuestBuildError",
    "GuestImage",
    "build_guest_image",
    "default_cache_dir",
]

#: Debian packages the guest is built from and booted with.
APT_PACKAGES = HOST_PACKAGES

log = logging.getLogger(__name__)

_APT_HINT = _host.INSTALL_HINT

#: Kernel modules the guest needs, in an order where each one's dependencies come first.
#: ``modules.dep`` is consulted too, so a kernel that needs more gets them.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "crc32c_generic",
    "jbd2",
    "mbcache",
    "crc16",
    "ext4",
)

DATA_DISK_SIZE = 64 * 1024 * 1024

#: Where the guest agent binary is taken from (package ``qemu-guest-agent``).
QEMU_GA_PATH = "/usr/sbin/qemu-ga"

#: The guest's PID 1. Kernel command line switches (all optional):
#: ``qmpagent.writer=0`` disables the timestamp writer; ``qmpagent.disks=data,data2`` names the
#: disk serials to wait for and mount at ``/mnt/<serial>``.
INIT_SCRIPT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /dev/virtio-ports
mount -t tmpfs tmpfs /run && mkdir -p /run/qga
mount -t tmpfs tmpfs /tmp
log() { echo "qmpagent-init: $*" > /dev/console; }

for m in $(cat /etc/qmpagent/modules); do
    insmod "/lib/modules/$m.ko" || log "insmod $m failed"
done

WRITER=1
DISKS=data
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        qmpagent.writer=*) WRITER="${arg#qmpagent.writer=}" ;;
        qmpagent.disks=*) DISKS="${arg#qmpagent.disks=}" ;;
    esac
done

# udev is absent: make /dev/virtio-ports/<name> links ourselves. Ports appear asynchronously
# after virtio_console binds, so poll (bounded) until the ones QEMU announced are there.
link_ports() {
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        name=$(cat "$p/name")
        [ -n "$name" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$name"
    done
}
i=0
while [ $i -lt 500 ]; do
    link_ports
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && \
        [ -e /dev/virtio-ports/org.qmpagent.control ] && break
    i=$((i + 1)); usleep 20000
done

# Mount the data disks by serial (vda/vdb order is not guaranteed).
for want in $(echo "$DISKS" | tr ',' ' '); do
    i=0
    while [ $i -lt 500 ]; do
        found=
        for b in /sys/block/vd*; do
            [ -r "$b/serial" ] || continue
            if [ "$(cat "$b/serial")" = "$want" ]; then found=${b##*/}; break; fi
        done
        [ -n "$found" ] && break
        i=$((i + 1)); usleep 20000
    done
    if [ -n "$found" ]; then
        mkdir -p "/mnt/$want"
        mount -t ext4 "/dev/$found" "/mnt/$want" || log "mount $want failed"
    else
        log "disk $want not found"
    fi
done

# The timestamp writer: one line "<seq> <uptime>" every 10 ms. A freeze blocks its append, so
# the freeze shows up as a gap between two consecutive uptimes.
if [ "$WRITER" = 1 ]; then
    (
        n=0
        while :; do
            read -r up idle < /proc/uptime
            echo "$n $up" >> /mnt/data/writer.log
            n=$((n + 1))
            usleep 10000
        done
    ) > /dev/null 2>&1 &
fi

# The guest agent, restarted whenever it exits, unless /run/qga.hold exists.
(
    while :; do
        if [ -e /run/qga.hold ]; then usleep 100000; continue; fi
        qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
            -t /run/qga
        usleep 200000
    done
) < /dev/null > /dev/console 2>&1 &

# The test command channel: one shell command per line in, its output and a status line out.
# Reads see end-of-file while no host is connected: reopen and retry.
(
    while :; do
        exec 3<> /dev/virtio-ports/org.qmpagent.control
        while read -r cmd <&3; do
            out=$(eval "$cmd" 2>&1 < /dev/null)
            rc=$?
            printf '%s\n__QMPAGENT_RC__ %s\n' "$out" "$rc" >&3
        done
        exec 3<&-
        usleep 200000
    done
) &

log "ready"
while :; do sleep 3600; done
"""

#: ``guest-shutdown`` runs ``/sbin/shutdown``, which busybox lacks.
SHUTDOWN_SCRIPT = """#!/bin/sh
sync
poweroff -f
"""

# Bump when the recipe changes in a way the digest of INIT_SCRIPT does not capture.
_RECIPE_VERSION = "4"


class GuestBuildError(QMPAgentError):
    """The test guest cannot be built: a host package is missing or a build step failed."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest, ready to boot. All paths are inside the cache directory.

    Attributes:
        directory: the cache entry holding the files below.
        kernel: the kernel to pass to ``-kernel``.
        initrd: the gzip-compressed initramfs.
        data_disk: the qcow2 image of the first data disk (ext4, mounted at ``/mnt/data``).
        data2_disk: the qcow2 image of the second data disk (ext4, mounted at ``/mnt/data2``).
        kernel_version: the kernel release the modules came from.
        peer: the peer it was built from (``"host"`` or ``"debian13"``).
    """

    directory: Path
    kernel: Path
    initrd: Path
    data_disk: Path
    data2_disk: Path
    kernel_version: str
    peer: str = "host"


def default_cache_dir() -> Path:
    """Where built guests are cached: ``$QMPAGENT_GUEST_CACHE``, else
    ``$XDG_CACHE_HOME/qmpagent/guest`` (``~/.cache/qmpagent/guest``)."""
    env = os.environ.get("QMPAGENT_GUEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qmpagent" / "guest"


def _need(path: str | None, what: str) -> str:
    if path is None or not os.path.exists(path):
        raise GuestBuildError(f"{what} not found; install it with: {_APT_HINT}")
    return path


def find_tool(name: str) -> str:
    """Return the path of host tool ``name`` or raise :class:`GuestBuildError` naming the
    ``apt-get install`` line."""
    # PATH first, then the bin directories: the order this always had (Peer.find, which also
    # serves peer roots that are not on PATH, searches the directories first).
    found = shutil.which(name) or _host.find_in_root(Path("/"), name)
    return _need(None if found is None else str(found), name)


def _kernel_release(peer: Peer) -> tuple[str, Path]:
    """The newest ``/boot/vmlinuz-*`` that has a matching ``/lib/modules/<release>``."""
    candidates = []
    for vmlinuz in peer.path("/boot").glob("vmlinuz-*"):
        release = vmlinuz.name[len("vmlinuz-") :]
        if (peer.path("/lib/modules") / release / "modules.dep").exists():
            candidates.append((vmlinuz.stat().st_mtime, release, vmlinuz))
    if not candidates:
        raise GuestBuildError(f"no kernel with modules under /boot; install it with: {_APT_HINT}")
    _, release, vmlinuz = max(candidates)
    return release, vmlinuz


def _module_paths(release: str, peer: Peer) -> list[tuple[str, Path]]:
    """The guest's modules with their dependencies, dependencies first, built-ins left out."""
    moddir = peer.path("/lib/modules") / release
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = _module_name(target)
        deps[name] = (target, [_module_name(d) for d in rest.split()])
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {_module_name(line) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered or name in builtin:
            return
        if name not in deps:
            raise GuestBuildError(f"kernel {release} has no module {name}")
        for dep in deps[name][1]:
            visit(dep)
        ordered.append(name)

    for name in GUEST_MODULES:
        visit(name)
    return [(name, moddir / deps[name][0]) for name in ordered]


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        elf = zstd_decompress(data)
        if elf is None:
            raise GuestBuildError(f"cannot decompress {path}: {_ZSTD_HINT}")
        return elf
    return data


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_HINT = "no zstd decoder (pip install zstandard, or apt-get install zstd)"


def zstd_decompress(data: bytes, max_output: int = 512 * 1024 * 1024) -> bytes | None:
    """Decompress the first zstd frame of ``data`` (trailing bytes ignored), or None when no
    decoder is available. Tries Python's own ``compression.zstd`` (3.14+), then the
    ``zstandard`` package, then the ``zstd`` program.

    Raises:
        GuestBuildError: the data is not a valid zstd frame.
    """
    try:
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]

        try:
            return bytes(zstd.ZstdDecompressor().decompress(data, max_length=max_output))
        except zstd.ZstdError as exc:
            raise GuestBuildError(f"bad zstd data: {exc}") from exc
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        try:
            dobj = zstandard.ZstdDecompressor(max_window_size=2**31).decompressobj()
            return bytes(dobj.decompress(data))
        except zstandard.ZstdError as exc:
            raise GuestBuildError(f"bad zstd data: {exc}") from exc
    tool = shutil.which("zstd")
    if tool is None:
        return None
    # The program refuses trailing garbage after the frame; a bzImage has some: -q and the
    # output up to the error are what we want, so the exit status is not trusted, the ELF is.
    proc = subprocess.run(
        [tool, "-d", "-q", "-c", "--long=31"], input=data, capture_output=True, check=False
    )
    if not proc.stdout:
        raise GuestBuildError(f"bad zstd data: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _extract_vmlinux(vmlinuz: Path) -> bytes | None:
    """The ELF kernel inside a bzImage if its payload is xz or zstd and has a PVH note, else
    None (then the bzImage itself is booted, about twice as slowly)."""
    data = vmlinuz.read_bytes()
    candidates = []
    for magic, kind in ((b"\xfd7zXZ\x00", "xz"), (_ZSTD_MAGIC, "zstd")):
        start = data.find(magic)
        if start >= 0:
            candidates.append((start, kind))
    for start, kind in sorted(candidates):
        elf: bytes | None
        try:
            if kind == "xz":
                elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
            else:
                elf = zstd_decompress(data[start:])
        except (lzma.LZMAError, GuestBuildError):
            continue
        if elf is None:
            log.warning("kernel %s: zstd payload and %s: booting the slower bzImage", vmlinuz, _ZSTD_HINT)
            continue
        if elf.startswith(b"\x7fELF") and _has_pvh_note(elf):
            return elf
    return None


def _has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has a Xen PVH entry note (type 18)."""
    import struct

    if len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


class _Cpio:
    """A minimal writer of the ``newc`` cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        name_b = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        )
        self._ino += 1
        self._out.write(header.encode() + name_b)
        self._out.write(b"\0" * (-(110 + len(name_b)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, path: str) -> None:
        path = path.strip("/")
        if not path or path in self._dirs:
            return
        parent = os.path.dirname(path)
        if parent:
            self.directory(parent)
        self._dirs.add(path)
        self._entry(path, stat.S_IFDIR | 0o755, b"")

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.directory(os.path.dirname(path))
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.directory(os.path.dirname(path))
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self._out.getvalue()


def _fingerprint(paths: Iterable[str | Path]) -> list[str]:
    out = []
    for p in sorted({str(p) for p in paths}):
        st = os.stat(p)
        out.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return out


def _build_initrd(
    release: str, modules: list[tuple[str, Path]], qga: Path, busybox: Path, peer: Peer
) -> bytes:
    cpio = _Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "mnt",
              "etc/qmpagent", "lib/modules", "lib64"):
        cpio.directory(d)
    cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    applets = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("sbin/shutdown", SHUTDOWN_SCRIPT.encode(), 0o755)
    cpio.file("usr/sbin/qemu-ga", Path(qga).read_bytes(), 0o755)
    for lib in peer.shared_libraries(qga) + peer.shared_libraries(busybox):
        data = lib.read_bytes()
        cpio.file(peer.guest_path(lib), data, 0o755)
        real = os.path.realpath(lib)
        with contextlib.suppress(PeerError):  # a link out of the root: the loader needs no copy
            if real != str(lib):
                cpio.file(peer.guest_path(real), data, 0o755)
    for name, path in modules:
        cpio.file(f"lib/modules/{name}.ko", _read_module(path))
    cpio.file("etc/qmpagent/modules", ("\n".join(n for n, _ in modules) + "\n").encode())
    cpio.file("etc/qmpagent/kernel-release", (release + "\n").encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def _make_data_disk(path: Path, label: str, workdir: Path, peer: Peer) -> None:
    mkfs = find_tool("mkfs.ext4")  # the host's: an ext4 image is an ext4 image
    qemu_img = _peer_command(peer, "qemu-img")
    raw = workdir / f"{label}.raw"
    with open(raw, "wb") as f:
        f.truncate(DATA_DISK_SIZE)
    _host.run([mkfs, "-q", "-F", "-L", label, "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)],
              GuestBuildError)
    _host.run([*qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], GuestBuildError)
    raw.unlink()


def _entry_peer(entry: Path) -> str:
    try:
        return (entry / "peer").read_text().strip()
    except OSError:
        return "host"  # built before peers existed


def _peer_command(peer: Peer, name: str) -> list[str]:
    try:
        return peer.command(name)
    except PeerError as exc:
        raise GuestBuildError(str(exc)) from exc


def resolve_peer(peer: Peer | str | None) -> Peer:
    """``peer`` as a :class:`~qmpagent.testing.peer.Peer` (a name, or None for
    ``$QMPAGENT_PEER``/``"host"``), provisioning a Debian 13 root when needed.

    Raises:
        GuestBuildError: the peer cannot be provisioned.
        UsageError: unknown peer name.
    """
    if isinstance(peer, Peer):
        return peer
    try:
        return get_peer(peer)
    except PeerError as exc:
        raise GuestBuildError(str(exc)) from exc


def build_guest_image(
    cache_dir: str | os.PathLike[str] | None = None, *, peer: Peer | str | None = None
) -> GuestImage:
    """Build the test guest, or return the cached build when its inputs are unchanged.

    Blocking (it runs subprocesses and writes tens of MB the first time, about a second when
    cached; provisioning the Debian 13 peer takes about a minute more, once): from async code
    call it through ``anyio.to_thread.run_sync``.

    Args:
        cache_dir: where builds are cached; default :func:`default_cache_dir`.
        peer: ``"host"``, ``"debian13"`` or a :class:`~qmpagent.testing.peer.Peer`; default
            ``$QMPAGENT_PEER``, else ``"host"``.

    Raises:
        GuestBuildError: a package is missing (for the host, the message names the
            ``apt-get install`` line), the peer cannot be provisioned, or a build step failed.
        UsageError: unknown peer name.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    the_peer = resolve_peer(peer)
    _peer_command(the_peer, "qemu-system-x86_64")
    _peer_command(the_peer, "qemu-img")
    qga = the_peer.path(QEMU_GA_PATH)
    _need(str(qga) if qga.exists() else None, f"{QEMU_GA_PATH} (package qemu-guest-agent)")
    busybox = next(
        (b for p in ("/bin/busybox", "/usr/bin/busybox") if (b := the_peer.path(p)).exists()), None
    )
    _need(str(busybox) if busybox else None, "busybox (package busybox-static)")
    assert busybox is not None
    release, vmlinuz = _kernel_release(the_peer)
    modules = _module_paths(release, the_peer)
    inputs: list[str | Path] = [qga, busybox, vmlinuz, *(p for _, p in modules)]
    inputs += the_peer.shared_libraries(qga) + the_peer.shared_libraries(busybox)
    digest = hashlib.sha256(
        json.dumps(
            [_RECIPE_VERSION, INIT_SCRIPT, SHUTDOWN_SCRIPT, GUEST_MODULES, DATA_DISK_SIZE,
             _fingerprint(inputs)]
        ).encode()
    ).hexdigest()[:16]
    entry = cache / f"{release}-{digest}"
    image = GuestImage(
        directory=entry,
        kernel=entry / "vmlinux",
        initrd=entry / "initrd.gz",
        data_disk=entry / "data.qcow2",
        data2_disk=entry / "data2.qcow2",
        kernel_version=release,
        peer=the_peer.name,
    )
    if (entry / "complete").exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "complete").exists():
            return image
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            elf = _extract_vmlinux(vmlinuz)
            if elf is not None:
                (tmp / "vmlinux").write_bytes(elf)
            else:  # no PVH ELF inside: boot the bzImage itself (slower, still works)
                shutil.copyfile(vmlinuz, tmp / "vmlinux")
            (tmp / "initrd.gz").write_bytes(
                _build_initrd(release, modules, qga, busybox, the_peer)
            )
            _make_data_disk(tmp / "data.qcow2", "data", tmp, the_peer)
            _make_data_disk(tmp / "data2.qcow2", "data2", tmp, the_peer)
            # Old builds of this peer's other inputs are not needed any more (other peers'
            # builds are kept: both peers are tested in one run).
            for old in cache.iterdir():
                same_peer = old.is_dir() and _entry_peer(old) == the_peer.name
                if same_peer and not old.name.startswith(".") and old != entry:
                    shutil.rmtree(old, ignore_errors=True)
            (tmp / "peer").write_text(the_peer.name + "\n")
            (tmp / "complete").write_text(digest + "\n")
            if entry.exists():
                shutil.rmtree(entry)
            tmp.rename(entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return image

