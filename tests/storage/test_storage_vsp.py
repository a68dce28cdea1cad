"""The synthetic storage VSP on the host side, over real rings in guest memory: a Python stand-in
for the guest's storage VSC opens the channel through the VMBus controller and sends requests;
good ones move data between the disk (a sparse host file) and guest pages, hostile ones are each
answered with an error status, logged and counted, and the channel goes on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pyhv.memory.manager import PAGE_SIZE, MemfdRegion
from pyhv.memory.ranges import RangeSet
from pyhv.storage import protocol as sp
from pyhv.storage.disk import MAX_SAVED_BYTES, Disk, DiskError
from pyhv.storage.protocol import Operation as Op
from pyhv.storage.protocol import Status
from pyhv.storage.vsp import StorageState, StorageVsp, StorageVspState
from pyhv.vmbus.controller import Reg, VmbusController
from tests.support.guest_ring import open_channel

pytestmark = pytest.mark.simulation

MiB = 1 << 20
RAM = 16 * MiB
RING_GPA = 0x10000
BUF = 0x100000  # a guest buffer page
DISK = 1 * MiB


class World:
    def __init__(self, tmp: Path, name: str = "disk") -> None:
        self.region = MemfdRegion(0, RAM)
        assert self.region.mm is not None
        self.ram = memoryview(self.region.mm)
        self.ballooned = RangeSet()
        ram = RangeSet([(0, RAM // PAGE_SIZE)])
        self.disk = Disk(tmp / name, DISK)
        self.vsp = StorageVsp(
            self.disk,
            self.view,
            lambda pfn: ram.contains(pfn, 1) and not self.ballooned.overlaps(pfn, 1),
        )
        self.ctl = VmbusController(self.view, lambda vector: lambda: None)
        self.ctl.offer(sp.STORAGE_GUID, self.vsp.bind)
        self.out, self.inb = open_channel(self.ctl, self.ram, 0, RING_GPA)

    def view(self, gpa: int, n: int) -> memoryview:
        if gpa < 0 or gpa + n > RAM:
            raise ValueError(f"GPA {gpa:#x} is not RAM")
        return self.ram[gpa : gpa + n]

    def request(self, payload: bytes, trans_id: int) -> sp.Response:
        assert self.out.write(payload, trans_id)
        self.ctl.io_write(Reg.DOORBELL, 1)
        pkt = self.inb.read()
        assert pkt is not None, "no response"
        assert pkt[2] == trans_id, "the response carries the request's id"
        return sp.decode_response(pkt[3])

    def io(self, op: Op, lba: int, sectors: int, gpa: int, trans_id: int = 1) -> sp.Response:
        off = gpa % PAGE_SIZE
        pages = sp.pages_spanned(off, sectors * sp.SECTOR_SIZE)
        pfns = tuple(gpa // PAGE_SIZE + i for i in range(pages))
        return self.request(sp.encode_request(op, lba, sectors, pfns, off), trans_id)


def test_a_write_puts_the_guests_pages_in_the_host_file_and_a_read_brings_them_back(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    r = w.request(sp.encode_request(Op.QUERY_PROPERTIES), 7)
    assert (r.status, r.value, r.sector_size) == (Status.SUCCESS, DISK // 512, 512)
    data = os.urandom(3 * PAGE_SIZE)
    w.ram[BUF + 100 : BUF + 100 + len(data)] = data  # an unaligned buffer over 4 pages
    r = w.io(Op.WRITE, 16, len(data) // 512, BUF + 100)
    assert (r.status, r.value) == (Status.SUCCESS, len(data))
    with open(tmp_path / "disk", "rb") as f:
        f.seek(16 * 512)
        assert f.read(len(data)) == data, "the host file holds the written blocks"
    assert os.stat(tmp_path / "disk").st_blocks * 512 < DISK, "the disk file is sparse"
    r = w.io(Op.READ, 16, len(data) // 512, 2 * BUF)
    assert r.status == Status.SUCCESS
    assert bytes(w.ram[2 * BUF : 2 * BUF + len(data)]) == data
    c = w.vsp.counters
    assert (c["writes"], c["reads"], c["sectors_written"], c["refused"]) == (1, 1, 24, 0)
    assert list(w.disk.written) == [(2, 3)]  # 4 KiB blocks 2..4 of the disk


@pytest.mark.parametrize(
    ("payload", "status", "counter"),
    [
        (sp.encode_request(0x77), Status.UNKNOWN_OPERATION, "unknown_operation"),
        (sp.encode_request(Op.READ, DISK // 512 - 1, 8, (BUF // PAGE_SIZE,)), Status.LBA_OUT_OF_RANGE, "lba_out_of_range"),
        (sp.encode_request(Op.READ, 2**64 - 1, 8, (BUF // PAGE_SIZE,)), Status.LBA_OUT_OF_RANGE, "lba_out_of_range"),
        (sp.encode_request(Op.READ, 0, 8, (RAM // PAGE_SIZE,)), Status.BAD_BUFFER, "bad_buffer"),
        (sp.encode_request(Op.WRITE, 0, 8, (1 << 40,)), Status.BAD_BUFFER, "bad_buffer"),
        (sp.encode_request(Op.WRITE, 0, 256, tuple(range(33))), Status.TOO_LARGE, "too_large"),
        (sp.encode_request(Op.READ, 0, 8, ()), Status.INVALID_REQUEST, "invalid_request"),
        (sp.encode_request(Op.READ, 0, 0, ()), Status.INVALID_REQUEST, "invalid_request"),
        (sp.encode_request(Op.READ, 0, 8, (256,), offset=4096), Status.INVALID_REQUEST, "invalid_request"),
        (b"\x02\x00\x00", Status.INVALID_REQUEST, "invalid_request"),
        (sp.encode_request(Op.UNMAP, 4, 8), Status.INVALID_REQUEST, "invalid_request"),
        (sp.encode_request(Op.UNMAP, 0, 12), Status.INVALID_REQUEST, "invalid_request"),
        (sp.encode_request(Op.UNMAP, 0, 8, (256,)), Status.INVALID_REQUEST, "invalid_request"),
        (sp.encode_request(Op.UNMAP, 0, (128 << 20) // 512), Status.TOO_LARGE, "too_large"),
        (sp.encode_request(Op.UNMAP, DISK // 512, 8), Status.LBA_OUT_OF_RANGE, "lba_out_of_range"),
        (bytes(sp.RequestHeader(operation=2, flags=1)), Status.INVALID_REQUEST, "invalid_request"),
    ],
)  # fmt: skip
def test_a_hostile_request_is_answered_with_an_error_status_logged_and_counted(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    payload: bytes,
    status: Status,
    counter: str,
) -> None:
    w = World(tmp_path)
    before = bytes(w.ram[BUF:RAM])  # all RAM above the rings
    with caplog.at_level(logging.WARNING):
        r = w.request(payload, 99)
    assert r.status == status and r.value == 0
    assert w.vsp.counters[counter] == 1 and w.vsp.counters["refused"] == 1
    assert any("refused" in rec.getMessage() for rec in caplog.records)
    assert bytes(w.ram[BUF:RAM]) == before, "nothing was read into guest memory"
    assert w.disk.written.pages == 0, "nothing was written to the disk"
    # the channel goes on: a good request right after is served
    assert w.io(Op.WRITE, 0, 8, BUF).status == Status.SUCCESS
    assert w.vsp.state is StorageState.READY


def test_a_ballooned_page_is_no_buffer(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.ballooned.add(BUF // PAGE_SIZE, 1)
    assert w.io(Op.READ, 0, 8, BUF).status == Status.BAD_BUFFER
    assert w.io(Op.READ, 0, 8, BUF + PAGE_SIZE).status == Status.SUCCESS


def test_the_disks_written_blocks_travel_in_the_saved_state(tmp_path: Path) -> None:
    src = World(tmp_path, "src")
    data = os.urandom(64 << 10)
    src.ram[BUF : BUF + len(data)] = data
    assert src.io(Op.WRITE, 1024, 128, BUF).status == Status.SUCCESS
    st = src.vsp.save()
    wire = StorageVspState.from_wire(st.to_wire())
    dst = World(tmp_path, "dst")
    dst.vsp.restore(wire)
    assert dst.vsp.counters["writes"] == 1
    assert dst.io(Op.READ, 1024, 128, 2 * BUF).status == Status.SUCCESS
    assert bytes(dst.ram[2 * BUF : 2 * BUF + len(data)]) == data
    assert list(dst.disk.written) == list(src.disk.written)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"size": 2 * DISK}, "same page_file_size"),
        ({"written": ((200, 100),)}, "beyond the disk"),
        ({"written": ((4, 1), (2, 1))}, "out of order"),
        ({"data": b"not zlib"}, "do not decompress"),
        ({"written": ((0, 1),)}, "bytes of blocks"),
    ],
)
def test_a_saved_disk_that_does_not_fit_is_refused_and_nothing_changes(
    tmp_path: Path, change: dict[str, object], match: str
) -> None:
    import dataclasses

    src = World(tmp_path, "src")
    src.ram[BUF : BUF + 2 * PAGE_SIZE] = os.urandom(2 * PAGE_SIZE)
    assert src.io(Op.WRITE, 0, 16, BUF).status == Status.SUCCESS
    st = src.vsp.save()
    bad = dataclasses.replace(st, disk=dataclasses.replace(st.disk, **change))  # type: ignore[arg-type]
    dst = World(tmp_path, "dst")
    with pytest.raises(ValueError, match=match):
        dst.vsp.restore(bad)
    assert dst.disk.written.pages == 0


def test_a_disk_too_full_to_carry_says_so(tmp_path: Path) -> None:
    disk = Disk(tmp_path / "big", 16 * MiB)
    disk.write(0, os.urandom(MAX_SAVED_BYTES + MiB))  # random: does not compress
    with pytest.raises(DiskError, match="more than a VM state carries"):
        disk.save()


def test_two_vms_cannot_share_one_disk_file(tmp_path: Path) -> None:
    Disk(tmp_path / "shared", DISK)
    with pytest.raises(DiskError, match="in use by another VM"):
        Disk(tmp_path / "shared", DISK)


def test_pages_a_read_writes_are_logged_for_a_migration_only_while_it_runs(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    assert w.io(Op.READ, 0, 16, BUF).status == Status.SUCCESS
    assert w.vsp.take_dirtied() == set()  # no migration: nothing kept
    w.vsp.begin_dirty_log()
    assert w.io(Op.READ, 0, 16, BUF + 100).status == Status.SUCCESS  # 3 pages
    assert w.io(Op.WRITE, 0, 8, 2 * BUF).status == Status.SUCCESS  # the guest's own write
    first = BUF // PAGE_SIZE
    assert w.vsp.take_dirtied() == {first, first + 1, first + 2}
    assert w.io(Op.READ, 0, 8, BUF).status == Status.SUCCESS
    assert w.vsp.take_dirtied() == set()  # the log stopped with the take


def test_an_unmap_punches_the_blocks_out_of_the_host_file_and_the_saved_state(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    w.ram[BUF : BUF + 4 * PAGE_SIZE] = os.urandom(4 * PAGE_SIZE)
    assert w.io(Op.WRITE, 64, 32, BUF).status == Status.SUCCESS  # blocks 8..11
    used = os.stat(tmp_path / "disk").st_blocks
    r = w.request(sp.encode_request(Op.UNMAP, 72, 16), 5)  # blocks 9 and 10
    assert (r.status, r.value) == (Status.SUCCESS, 16 * 512)
    assert list(w.disk.written) == [(8, 1), (11, 1)]
    assert os.stat(tmp_path / "disk").st_blocks < used
    assert w.io(Op.READ, 72, 16, 2 * BUF).status == Status.SUCCESS
    assert bytes(w.ram[2 * BUF : 2 * BUF + 2 * PAGE_SIZE]) == bytes(2 * PAGE_SIZE)
    assert w.vsp.counters["unmaps"] == 1 and w.vsp.counters["sectors_unmapped"] == 16
    assert len(w.vsp.save().disk.written) == 2
