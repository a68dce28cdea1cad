"""What goes with the last pages, without a VM: the state structure survives its encoding, the
serial device carries every register and the bytes not read yet, and the RAM checksum sees
contents, not how the host keeps them."""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from pyhv.devices.uart16550 import Uart16550, UartState
from pyhv.migration import memory as mem
from pyhv.migration.state import STATE_VERSION, VmState
from pyhv.migration.stream import MigrationError
from tests.support.hostile import json_values
from tests.support.vm_state import vm_state as _vm_state

pytestmark = pytest.mark.unit


def test_the_vm_state_survives_its_encoding() -> None:
    st = _vm_state()
    assert VmState.decode(st.encode()) == st
    no_dm = replace(st, dynmem=None)
    assert VmState.decode(no_dm.encode()) == no_dm


def test_a_state_of_another_version_or_malformed_is_refused() -> None:
    with pytest.raises(MigrationError, match="version 4 is not 3"):
        VmState.decode(_vm_state(STATE_VERSION + 1).encode())
    with pytest.raises(MigrationError, match="malformed"):
        VmState.decode(b'{"version": 2}')
    with pytest.raises(MigrationError, match="malformed"):
        VmState.decode(_vm_state().encode().replace(b'"IDLE"', b"7"))


def test_the_serial_device_goes_on_where_it_was() -> None:
    out: list[bytes] = []
    a = Uart16550(out.append)
    a.io_write(3, 1, 0x83)  # DLAB, 8 bits
    a.io_write(0, 1, 0x0C)  # divisor 12: 9600 baud
    a.io_write(3, 1, 0x03)
    a.io_write(2, 1, 0xC7)  # FIFO on, trigger 14
    a.io_write(1, 1, 0x01)  # receive interrupt on
    a.io_write(7, 1, 0x5A)
    a.feed(b"hello, world, this is more than sixteen bytes")
    assert a.io_read(0, 1) == ord("h")
    b = Uart16550(out.append)
    b.restore(UartState.from_wire(a.save().to_wire()))
    assert b.baud == 9600 and b.io_read(7, 1) == 0x5A
    assert b.io_read(2, 1) & 0xC0 == 0xC0
    got = bytes(b.io_read(0, 1) for _ in range(b.pending_input))
    assert got == b"ello, world, this is more than sixteen bytes"


@dataclass
class _Region:
    """What the checksum needs of a RAM region: a memfd mapping at a GPA."""

    gpa: int
    size: int
    memfd: int = 0
    offset: int = 0
    mm: mmap.mmap = field(init=False)

    def __post_init__(self) -> None:
        self.memfd = os.memfd_create("t")
        os.ftruncate(self.memfd, self.size)
        self.mm = mmap.mmap(self.memfd, self.size)

    @property
    def pages(self) -> int:
        return self.size // 4096


def test_the_ram_checksum_sees_contents_not_holes_or_zero_pages() -> None:
    a, b = _Region(0, 64 << 12), _Region(0, 64 << 12)
    for r in (a, b):
        r.mm[5 * 4096 : 5 * 4096 + 3] = b"abc"
    b.mm[9 * 4096 : 10 * 4096] = bytes(4096)  # a zero page held as data, not a hole
    assert list(mem.data_extents(b)) != list(mem.data_extents(a))
    assert mem.ram_checksum([a]) == mem.ram_checksum([b])  # type: ignore[list-item]
    b.mm[9 * 4096] = 1
    assert mem.ram_checksum([a]) != mem.ram_checksum([b])  # type: ignore[list-item]


def test_skipped_ranges_are_left_out_of_the_checksum_and_never_read() -> None:
    a = _Region(0x100000, 16 << 12)
    a.mm[0:1] = b"x"
    before = mem.ram_checksum([a])  # type: ignore[list-item]
    a.mm[4 * 4096] = 7
    assert mem.ram_checksum([a], skip=[(0x100000 + 4 * 4096, 2)]) == before  # type: ignore[list-item]


def test_page_runs_of_a_mask() -> None:
    m = np.array([0, 1, 1, 0, 1, 0, 0, 1], dtype=bool)
    assert mem.runs(m) == [(1, 3), (4, 5), (7, 8)]
    assert mem.runs(np.zeros(0, dtype=bool)) == []


def test_the_pages_of_a_packed_dirty_bitmap_are_its_set_bits_within_the_region() -> None:
    # KVM's bitmap is padded to 64 bits: set padding bits past the region are not pages
    bits = np.zeros(64, dtype=bool)
    bits[[0, 1, 2, 9, 40, 60, 61]] = True
    region = SimpleNamespace(
        pages=41, dirty_bitmap=lambda: np.packbits(bits, bitorder="little").tobytes()
    )
    idx = mem.dirty_pages(region)  # type: ignore[arg-type]
    assert idx.tolist() == [0, 1, 2, 9, 40]
    assert mem.index_runs(idx) == [(0, 3), (9, 10), (40, 41)]
    assert mem.index_runs(np.zeros(0, dtype=np.int64)) == []
    assert mem.union(idx, np.array([2, 3, 40, 50])).tolist() == [0, 1, 2, 3, 9, 40, 50]
    assert mem.union(np.array([5]), np.zeros(0, dtype=np.int64)).tolist() == [5]


@pytest.mark.parametrize(
    ("key", "value"),
    [("lcr", 0x1_0003), ("dll", -1), ("ier", 0x10), ("mcr", 0x20), ("msr", 256), ("trigger", 0)],
)
def test_a_serial_state_with_a_register_no_chip_holds_is_refused_and_changes_nothing(
    key: str, value: int
) -> None:
    a = Uart16550(lambda b: None)
    a.io_write(7, 1, 0x5A)
    st = UartState.from_wire(a.save().to_wire() | {key: value})
    b = Uart16550(lambda b: None)
    with pytest.raises(ValueError, match="serial state"):
        b.restore(st)
    assert b.io_read(7, 1) == 0 and b.save() == Uart16550(lambda b: None).save()


def test_a_serial_state_of_another_version_or_shape_is_refused() -> None:
    st = Uart16550(lambda b: None).save()
    b = Uart16550(lambda b: None)
    with pytest.raises(ValueError, match="version 2 is not 1"):
        b.restore(replace(st, version=2))
    with pytest.raises(ValueError, match="more than 16"):
        b.restore(replace(st, rx=bytes(17)))
    with pytest.raises(ValueError, match="fields"):
        UartState.from_wire(st.to_wire() | {"extra": 1})
    with pytest.raises(ValueError, match=r"serial state: Expected `int`, got `str` - at `\$.lcr`"):
        UartState.from_wire(st.to_wire() | {"lcr": "3"})
    assert b.save() == st


def _paths(value: object, here: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every place in a JSON value: the keys and indexes that lead to it."""
    out = [here] if here else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += _paths(v, (*here, i))
    return out


_WIRE = json.loads(_vm_state().encode())
_JSON = json_values()


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(where=hs.sampled_from(_paths(_WIRE)), value=_JSON, drop=hs.booleans())
def test_a_state_frame_with_any_field_replaced_or_dropped_is_read_or_refused_by_name(
    where: tuple[object, ...], value: object, drop: bool
) -> None:
    wire = json.loads(json.dumps(_WIRE))
    parent = wire
    for key in where[:-1]:
        parent = parent[key]
    if drop and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    try:
        got = VmState.decode(json.dumps(wire).encode())
    except MigrationError as e:
        assert e.phase == "state" and str(e).startswith(("the VM state frame", "VM state version"))
        return
    assert isinstance(got, VmState)  # a value restore() checks against the machine


def test_a_state_nested_too_deeply_is_malformed_not_a_recursion_error() -> None:
    # found by the fuzz campaign (tests/fuzz): msgspec's RecursionError escaped VmState.decode
    with pytest.raises(MigrationError, match="malformed: JSON nested too deeply"):
        VmState.decode(b'{"version":3,"partition":{"x":' + b"[" * 5000)
