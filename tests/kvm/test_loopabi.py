"""The C run loop reads only what pyhv.kvm.loopabi declares, and the Python loop reads kvm_run at
the places pyhv.kvm.runpage names (those of struct kvm_run in linux/kvm.h)."""

from __future__ import annotations

import mmap
from array import array
from types import ModuleType

import pytest

from pyhv.kvm import fastrun, loopabi
from pyhv.kvm import runpage as rp

pytestmark = pytest.mark.unit


@pytest.fixture
def c_loop(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The C loop module even under PYHV_NO_FASTRUN; a machine with gcc and Python's headers
    builds it."""
    if fastrun.disabled():
        monkeypatch.delenv(fastrun.DISABLE_ENV)
        monkeypatch.setattr(fastrun, "_why_not", None)
    mod = fastrun.load()
    if mod is None:
        pytest.fail(f"the C run loop could not be built: {fastrun.why_unavailable()}")
    return mod


class _Owner(loopabi.LoopOwner):
    __slots__ = ("upper",)  # a layer above may add slots of its own


class _Table(loopabi.Routes):
    __slots__ = ("halt",)


def _args(**change: object) -> dict[str, object]:
    counters = [array("q", bytes(8 * 7)) for _ in range(3)]
    args: dict[str, object] = {
        "fd": -1,
        "run_mmap": mmap.mmap(-1, 4096),
        "vp": _Owner(),
        "table": _Table(),
        "io_msg": loopabi.IoAccess(),
        "mem_msg": loopabi.MmioAccess(),
        "msr_msg": loopabi.MsrAccess(),
        "counts": counters[0],
        "defaults": counters[1],
        "handler_ns": counters[2],
        "timed": True,
        "read": 0,
        "write": 1,
    }
    return {**args, **change}


def test_the_c_loop_takes_the_declared_structures_and_what_derives_from_them(
    c_loop: ModuleType,
) -> None:
    runner = c_loop.Runner(**_args())
    assert callable(runner.run)


@pytest.mark.parametrize(
    ("arg", "declared"),
    [
        ("vp", "LoopOwner"),
        ("table", "Routes"),
        ("io_msg", "IoAccess"),
        ("mem_msg", "MmioAccess"),
        ("msr_msg", "MsrAccess"),
    ],
)
def test_the_c_loop_refuses_an_object_that_is_not_the_declared_structure(
    c_loop: ModuleType, arg: str, declared: str
) -> None:
    class LooksAlike:  # the same field names, but not the declared layout
        __slots__ = ("io", "gpa", "gpa_starts", "msr", "_attention", "_touched", "port")

    with pytest.raises(TypeError, match=f"{arg} must be a pyhv.kvm.loopabi.{declared}"):
        c_loop.Runner(**_args(**{arg: LooksAlike()}))


def test_the_hot_path_reads_kvm_run_where_linux_kvm_h_puts_its_fields() -> None:
    # byte offsets in struct kvm_run (linux/kvm.h): the exit union starts at 32
    assert rp.IMMEDIATE_EXIT == 1 and rp.REASON * 4 == 8
    assert (rp.IO_DIRECTION, rp.IO_SIZE, rp.IO_PORT * 2) == (32, 33, 34)
    assert (rp.IO_COUNT * 4, rp.IO_DATA_OFFSET * 8) == (36, 40)
    assert (rp.MMIO_GPA * 8, rp.MMIO_DATA, rp.MMIO_LEN * 4, rp.MMIO_IS_WRITE) == (32, 40, 48, 52)
    assert (rp.MMIO_DATA_H * 2, rp.MMIO_DATA_I * 4, rp.MMIO_DATA_Q * 8) == (40, 40, 40)
    assert (rp.MSR_ERROR, rp.MSR_REASON * 4, rp.MSR_INDEX * 4, rp.MSR_DATA * 8) == (32, 40, 44, 48)


def test_the_c_loop_refuses_a_message_whose_class_hides_a_declared_slot(
    c_loop: ModuleType,
) -> None:
    class HidesPort(loopabi.IoAccess):
        __slots__ = ()
        port = 0x80  # a class attribute would not see what the loop writes into the slot

    with pytest.raises(TypeError, match="HidesPort hides the slot port declared by"):
        c_loop.Runner(**_args(io_msg=HidesPort()))
