"""Each KVM exit is decoded into its own small typed object from the kvm_run page."""

from __future__ import annotations

import mmap
import struct

import pytest

from pyhv.kvm import (
    DebugExit,
    HltExit,
    InternalErrorExit,
    IoExit,
    MmioExit,
    MsrExit,
    RunPage,
    ShutdownExit,
    UnknownExit,
)
from pyhv.kvm import constants as c

pytestmark = pytest.mark.unit

U = 32  # the exit union


@pytest.fixture
def page() -> RunPage:
    return RunPage(mmap.mmap(-1, 4096))


def _set_reason(page: RunPage, reason: int) -> None:
    struct.pack_into("<I", page.mm, 8, reason)


def test_a_port_write_decodes_as_an_io_exit(page: RunPage) -> None:
    _set_reason(page, c.EXIT_IO)
    struct.pack_into("<BBHIQ", page.mm, U, c.IO_OUT, 2, 0x3F8, 1, 0x1000)
    assert page.decode() == IoExit(port=0x3F8, size=2, is_write=True, count=1, data_offset=0x1000)
    assert (page.io_port(), page.io_size(), page.io_is_write(), page.io_count()) == (
        0x3F8,
        2,
        True,
        1,
    )


def test_an_mmio_read_decodes_with_its_gpa_and_length_and_takes_its_answer(page: RunPage) -> None:
    _set_reason(page, c.EXIT_MMIO)
    struct.pack_into("<Q8sIB", page.mm, U, 0xFEE000B0, b"\0" * 8, 4, 0)
    assert page.decode() == MmioExit(gpa=0xFEE000B0, length=4, is_write=False, data=b"\0" * 4)
    page.set_mmio_data(0x1_2345_6789, 4)  # wider than the access: cut to 4 bytes
    assert page.mm[U + 8 : U + 16] == bytes.fromhex("8967452300000000")


def test_an_mmio_length_beyond_8_is_clamped_not_trusted(page: RunPage) -> None:
    _set_reason(page, c.EXIT_MMIO)
    struct.pack_into("<Q8sIB", page.mm, U, 0x1000, b"abcdefgh", 4000, 1)
    d = page.decode()
    assert isinstance(d, MmioExit) and d.length == 8 and d.data == b"abcdefgh"


def test_rdmsr_and_wrmsr_decode_as_msr_exits_and_carry_the_gp_request(page: RunPage) -> None:
    _set_reason(page, c.EXIT_X86_WRMSR)
    struct.pack_into("<B7xIIQ", page.mm, U, 0, c.MSR_EXIT_REASON_FILTER, 0x40000000, 0xAB)
    assert page.decode() == MsrExit(0x40000000, True, c.MSR_EXIT_REASON_FILTER, 0xAB)
    page.set_msr_result(0, True)
    assert page.mm[U] == 1


def test_the_other_exits_decode_to_their_own_types(page: RunPage) -> None:
    _set_reason(page, c.EXIT_DEBUG)
    struct.pack_into("<I4xQQQ", page.mm, U, 1, 0x200000, 0x4001, 0x402)
    assert page.decode() == DebugExit(1, 0x200000, 0x4001, 0x402)
    _set_reason(page, c.EXIT_HLT)
    assert page.decode() == HltExit()
    _set_reason(page, c.EXIT_SHUTDOWN)
    assert page.decode() == ShutdownExit()
    _set_reason(page, c.EXIT_INTERNAL_ERROR)
    struct.pack_into("<II3Q", page.mm, U, 1, 99, 1, 2, 3)  # ndata 99 is clamped to 16
    d = page.decode()
    assert isinstance(d, InternalErrorExit) and d.suberror == 1 and d.data[:3] == (1, 2, 3)
    assert len(d.data) == 16
    _set_reason(page, 12345)
    u = page.decode()
    assert isinstance(u, UnknownExit) and u.reason == 12345 and len(u.raw) == 256
