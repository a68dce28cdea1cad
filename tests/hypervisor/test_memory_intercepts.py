"""GPA intercepts: MMIO on ranges with no RAM, write intercepts on read-only RAM (copy-on-write)."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import GpaError, InterceptError, MemoryIntercept, Partition
from tests.guests.harness import guest, run_until_power_off
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

VALUE = 0x1122334455667788


def _u64(p, gpa: int) -> int:  # type: ignore[no-untyped-def]
    return int.from_bytes(p.read(gpa, 8), "little")


def _reported(values: list[int]) -> list[int]:
    """REPORT64 sends low then high halves on port 0x11."""
    return [values[i] | values[i + 1] << 32 for i in range(0, len(values) - 1, 2)]


def test_mmio_reads_of_1_2_4_8_bytes_return_the_handlers_value_and_writes_reach_it() -> None:
    with guest("mmio") as (p, vp, _):
        writes: list[tuple[int, int]] = []

        def device(m: MemoryIntercept) -> int | None:
            if m.is_write:
                writes.append((m.access_size, m.value))
                return None
            assert m.gpa == 0xD0000000
            return VALUE

        p.intercepts.install_gpa(0xD0000000, 0x1000, device)
        run_until_power_off(p, vp)
        assert writes[:4] == [(1, 0x88), (2, 0x7788), (4, 0x55667788), (8, VALUE)]
        # 0xe0000000: no RAM, no intercept: reads as all ones, counted as defaulted
        assert writes[4] == (8, 0xFFFF_FFFF_FFFF_FFFF)
        assert p.counters["memory"]["defaulted"] == 1


def test_the_book_copy_on_write_page_gives_the_writer_a_private_copy() -> None:
    with guest("cow") as (p, vp, _), Partition("neighbour") as neighbour:
        shared = p.add_memory(0x1000000, 0x1000, readonly=True)
        shared.mm[8:16] = (0x1111).to_bytes(8, "little")
        other = p.add_memory(0x1100000, 0x1000, readonly=True, memfd=shared.memfd)
        neighbour.add_memory(0x5000, 0x1000, readonly=True, memfd=shared.memfd)
        assert _u64(neighbour, 0x5008) == 0x1111  # and a second partition shares it too
        assert _u64(p, 0x1100008) == 0x1111  # one page, two GPA ranges
        state = {"region": shared}

        def copy_on_write(m: MemoryIntercept) -> None:
            page = bytes(state["region"].mm)
            p.remove_memory(state["region"])
            private = p.add_memory(0x1000000, 0x1000)
            private.mm[:] = page
            p.write(m.gpa, m.data)  # KVM cannot retry the write: complete it in the copy
            state["region"] = private

        p.intercepts.install_gpa(0x1000000, 0x1000, copy_on_write, read=False)
        out: list[int] = []
        p.intercepts.install_io(0x11, 0x11, lambda m: out.append(m.value), read=False)
        run_until_power_off(p, vp)
        assert _reported(out) == [0x2222, 0x1111, 0x3333]
        assert p.counters["memory"]["count"] == 1  # only the first write was intercepted
        assert _u64(p, 0x1100008) == 0x1111
        assert int.from_bytes(other.mm[8:16], "little") == 0x1111
        assert _u64(neighbour, 0x5008) == 0x1111 and _u64(neighbour, 0x5010) == 0


def test_a_region_added_while_the_vp_runs_is_seen_by_the_guest() -> None:
    with guest("hotadd") as (p, vp, _):
        out: list[int] = []
        p.intercepts.install_io(0x11, 0x11, lambda m: out.append(m.value), read=False)
        done: list[int] = []
        p.intercepts.install_io(0xF4, 0xF4, lambda m: done.append(1), read=False)
        vp.start()
        # the guest polls a GPA with no RAM
        wait_for(lambda: p.counters["memory"]["defaulted"] >= 3, 5, "three defaulted reads")
        region = p.add_memory(0x4000000, 2 << 20)
        region.mm[0:8] = (0x5A5A5A5A).to_bytes(8, "little")
        wait_for(lambda: done, 5, "the guest's power-off write")
        assert _reported(out) == [0x5A5A5A5A]


def test_dirty_tracking_reports_exactly_the_pages_the_guest_wrote() -> None:
    base = 0x2000000
    offsets = [0, 0x3000, 0x3008, 0x7FF8, 0xFF000]
    table = 0x300000
    with guest("dirty", rbx=table, rcx=len(offsets)) as (p, vp, _):
        region = p.add_memory(base, 1 << 20, track_dirty=True)
        p.write(table, b"".join((base + o).to_bytes(8, "little") for o in offsets))
        region.mm[0x5000:0x5008] = b"host!..."  # the host's own writes are not the guest's
        assert region.dirty_pages() == []
        run_until_power_off(p, vp)
        assert region.dirty_pages() == [base, base + 0x3000, base + 0x7000, base + 0xFF000]
        assert region.dirty_pages() == []  # reading the log cleared it


@pytest.mark.kvm
def test_bad_memory_requests_get_clear_errors() -> None:
    with guest("io_echo") as (p, _vp, _):
        with pytest.raises(GpaError, match="overlaps the region 0x0-0x1000000"):
            p.add_memory(0xFFF000, 0x2000)
        with pytest.raises(GpaError, match="multiples of 4 KiB"):
            p.add_memory(0x2000001, 0x1000)
        with pytest.raises(GpaError, match="outside the guest physical address space"):
            p.add_memory(p.max_gpa, 0x1000)
        with pytest.raises(GpaError, match="not backed by RAM"):
            p.read(0x5000000, 4)
        with pytest.raises(GpaError, match="runs past the end"):
            p.view(0xFFFFF0, 0x20)
        with pytest.raises(GpaError, match="without track_dirty"):
            p.regions[0].dirty_pages()
        with pytest.raises(InterceptError, match="overlaps writable RAM"):
            p.intercepts.install_gpa(0x100000, 0x1000, lambda m: 0)
        p.intercepts.install_gpa(0xD0000000, 0x1000, lambda m: 0)
        with pytest.raises(InterceptError, match="overlaps the intercept"):
            p.intercepts.install_gpa(0xD0000800, 0x1000, lambda m: 0)
