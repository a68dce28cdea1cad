"""Guest RAM in 2 MiB pages (pyhv.memory.hugeram): files on a private tmpfs mounted with
huge=within_size, never attached to a path. The kernel backs them in 2 MiB folios; discarding
(free-page hints) and releasing (balloons, 4 KiB ranges: the folio is split) give the memory
back as with a memfd; a process without CAP_SYS_ADMIN, or a jailed worker, is refused clearly."""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyhv.memory.hugeram import HUGE_PAGE, HugeRam
from pyhv.memory.manager import PAGE_SIZE, MemfdRegion, MemoryManager
from pyhv.worker import messages as m
from pyhv.worker import protocol
from pyhv.worker.config import ConfigError, VmConfig

pytestmark = pytest.mark.unit

MiB = 1 << 20


def _blocks(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_a_file_on_the_mount_is_backed_in_2_mib_folios_and_not_visible_anywhere() -> None:
    huge = HugeRam(64 * MiB)
    fd = huge.new_file("vm-ram", 8 * MiB)
    try:
        with mmap.mmap(fd, 8 * MiB) as mm:
            mm[5] = 1  # one byte: the whole 2 MiB block is backed
            assert _blocks(fd) == HUGE_PAGE
            # an unnamed file, not a memfd; no mount table lists the tmpfs
            assert not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
            assert os.fstat(fd).st_nlink == 0
            assert "huge=within_size" not in Path("/proc/self/mountinfo").read_text()
    finally:
        os.close(fd)
        huge.close()


def test_discard_and_4_kib_releases_give_the_memory_back() -> None:
    huge = HugeRam(64 * MiB)
    size = 16 * MiB
    fd = huge.new_file("vm-ram", size)
    region = MemfdRegion(0, size, memfd=fd)
    region.mm = mmap.mmap(fd, size)
    mm = region.mm
    try:
        for off in range(0, size, PAGE_SIZE):
            mm[off : off + 8] = off.to_bytes(8, "little")
        assert _blocks(fd) == size
        mgr = MemoryManager(64 * MiB)
        mgr.add_partition("vm", [region])
        # a free-page hint: whole 2 MiB blocks leave the host, the rest keep their data
        assert mgr.discard("vm", [(512, 2048)]) == 2048
        assert _blocks(fd) == size - 8 * MiB
        # a balloon's 4 KiB ranges inside a 2 MiB folio: split, and those pages freed
        assert mgr.release("vm", [(3, 1), (7, 2), (3000, 1)]) == 4
        assert _blocks(fd) == size - 8 * MiB - 4 * PAGE_SIZE
        assert mgr.release_backed == 0  # each range checked unbacked after its punch
        for page in range(4096):
            want = 0 if 512 <= page < 2560 or page in (3, 7, 8, 3000) else page * PAGE_SIZE
            got = int.from_bytes(os.pread(fd, 8, page * PAGE_SIZE), "little")
            assert got == want, page
        assert mgr.free_pages + mgr.partitions["vm"].assigned_pages == mgr.budget_pages
    finally:
        region.close()
        huge.close()


def test_without_cap_sys_admin_the_mount_is_refused_with_the_reason() -> None:
    code = (
        "from pyhv.memory.hugeram import HugeRam, HugeRamError\n"
        "try:\n    HugeRam(1 << 26)\nexcept HugeRamError as e:\n    print(e)\n"
    )
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
        + ["--bounding-set=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stderr
    assert "CAP_SYS_ADMIN" in r.stdout and "without huge pages" in r.stdout, r.stdout


def test_huge_pages_is_a_boolean_and_crosses_to_the_worker(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"\0" * 4096)
    cfg = VmConfig.create(image=image, memory="128M", huge_pages=True)
    assert VmConfig.from_dict(cfg.to_dict()).huge_pages is True
    assert VmConfig.from_dict({**cfg.to_dict(), "huge_pages": False}).huge_pages is False
    with pytest.raises(ConfigError, match="huge_pages 'yes' must be true or false"):
        VmConfig.from_dict({**cfg.to_dict(), "huge_pages": "yes"})


def test_a_jailed_worker_refuses_huge_pages_instead_of_dying_at_the_mount(tmp_path: Path) -> None:
    """A confined worker (seccomp on: fsopen would kill it) answers with the reason."""
    image = tmp_path / "image"
    image.write_bytes(b"\0" * 4096)
    cfg = VmConfig.create(image=image, memory="128M", huge_pages=True)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv.worker", "--fd", str(theirs.fileno())]
            + [f"--confine={128 * MiB}"],
            pass_fds=[theirs.fileno()],
            cwd=Path(__file__).resolve().parents[2],
        )
        theirs.close()
        protocol.send_message(ours, m.Boot(cfg.to_dict(), m.PROTOCOL_VERSION))
        raw = protocol.recv_frame(ours)
        assert raw is not None
        event = m.decode_event(raw)
        assert proc.wait(30) == 2
    assert isinstance(event, m.Ended), event
    assert "huge_pages needs a private tmpfs mount" in event.end.reason + str(event.end)
