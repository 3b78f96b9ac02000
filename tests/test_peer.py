"""Peers (qmpagent.testing.peer) and the kernel payloads of both Debian releases, without a VM:
the root-relative paths and loader command lines, the Debian 13 root not provisioned, the mirror
choice, and a PVH ELF found inside an xz or zstd bzImage payload (by every zstd decoder)."""

from __future__ import annotations

import lzma
import shutil
import struct
from pathlib import Path

import pytest

from qmpagent import UsageError
from qmpagent.testing import Peer, PeerError, get_peer
from qmpagent.testing import image as image_mod
from qmpagent.testing import peer as peer_mod


def test_unknown_peer_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown peer 'debian11'"):
        get_peer("debian11")


def test_host_peer_runs_programs_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QMPAGENT_PEER", raising=False)
    host = get_peer()
    assert host == Peer("host", Path("/")) and host.is_host
    assert host.path("/usr/sbin/qemu-ga") == Path("/usr/sbin/qemu-ga")
    assert host.guest_path("/usr/lib/x") == "/usr/lib/x"
    assert host.environment() == {}
    with pytest.raises(PeerError, match=r"no-such-tool not found; install it with: apt-get install"):
        host.find("no-such-tool")


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for rel in ("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "usr/bin/qemu-img",
                "usr/bin/qemu-system-x86_64"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "usr/lib64").mkdir()
    (root / "usr/lib64/ld-linux-x86-64.so.2").symlink_to("../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("bin", "usr/bin")):
        (root / link).symlink_to(target)
    return root


def test_peer_root_programs_run_through_the_roots_own_loader(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    peer = Peer("debian13", root)
    argv = peer.command("qemu-img")
    assert argv[0] == str(root / "lib64/ld-linux-x86-64.so.2")
    assert argv[1] == "--library-path"
    assert argv[2].split(":")[:2] == [str(root / "lib/x86_64-linux-gnu"),
                                      str(root / "usr/lib/x86_64-linux-gnu")]
    assert argv[3] == str(root / "usr/bin/qemu-img")
    qemu = peer.qemu_command()
    assert qemu[-4:] == ["-L", str(root / "usr/share/qemu"), "-L", str(root / "usr/share/seabios")]
    assert peer.environment() == {"QEMU_MODULE_DIR": str(root / "usr/lib/x86_64-linux-gnu/qemu")}
    assert peer.guest_path(root / "usr/lib/libc.so.6") == "/usr/lib/libc.so.6"
    with pytest.raises(PeerError, match="is not inside the debian13 root"):
        peer.guest_path("/usr/lib/libc.so.6")
    with pytest.raises(PeerError, match="qemu-ga not found in the debian13 root"):
        peer.command("qemu-ga")


def test_an_unprovisioned_debian13_root_is_an_error_without_provisioning(tmp_path: Path) -> None:
    with pytest.raises(PeerError, match="not provisioned"):
        get_peer("debian13", provision=False, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_provisioning_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(PeerError, match="needs root"):
        peer_mod.provision_debian13(tmp_path / "debian13")


def test_the_mirror_comes_from_the_environment_or_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMPAGENT_DEBIAN_MIRROR", "http://mirror.invalid/debian")
    assert peer_mod._debian_mirror() == "http://mirror.invalid/debian"
    monkeypatch.delenv("QMPAGENT_DEBIAN_MIRROR")
    if Path("/etc/apt/sources.list.d").exists() or Path("/etc/apt/sources.list").exists():
        mirror = peer_mod._debian_mirror()
        assert mirror.startswith(("http://", "https://")) and "security" not in mirror


def _pvh_elf() -> bytes:
    """A minimal 64-bit ELF with one PT_NOTE holding a Xen PVH entry note (type 18)."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 120, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note + bytes(4096)


def _bzimage(payload: bytes) -> bytes:
    return b"MZ setup code " * 100 + payload + b"\x00trailer after the payload" * 10


def test_pvh_vmlinux_is_found_in_an_xz_payload(tmp_path: Path) -> None:
    elf = _pvh_elf()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ)))
    assert image_mod._extract_vmlinux(kernel) == elf


def test_pvh_vmlinux_is_found_in_a_zstd_payload(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    elf = _pvh_elf()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(_bzimage(zstandard.ZstdCompressor(level=19).compress(elf)))
    assert image_mod._extract_vmlinux(kernel) == elf


def test_the_zstd_program_is_the_fallback_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    zstandard = pytest.importorskip("zstandard")
    if shutil.which("zstd") is None:
        pytest.skip("no zstd program here")
    frame = zstandard.ZstdCompressor().compress(b"payload" * 1000)
    import builtins

    real_import = builtins.__import__

    def no_python_zstd(name: str, *args: object, **kwargs: object) -> object:
        if name in ("zstandard", "compression"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_python_zstd)
    assert image_mod.zstd_decompress(frame + b"trailing garbage") == b"payload" * 1000


def test_bad_zstd_data_is_a_typed_error() -> None:
    pytest.importorskip("zstandard")
    with pytest.raises(image_mod.GuestBuildError, match="bad zstd data"):
        image_mod.zstd_decompress(image_mod._ZSTD_MAGIC + b"\xff" * 64)


def test_a_kernel_without_a_known_payload_boots_as_it_is(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"MZ" + bytes(1000))
    assert image_mod._extract_vmlinux(kernel) is None
