"""The flight recorder turns on only the intercept sources asked for: the other handlers stay
plain, so watching Dynamic Memory costs the exit path nothing."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import InterceptKind, Partition

pytestmark = pytest.mark.kvm


def test_tracing_some_kinds_leaves_the_other_handlers_plain() -> None:
    """`pyhv vm trace --only dm` turns on no intercept source; `--only io` only port I/O."""

    def io(m: object) -> int:
        return 0

    def msr(m: object) -> int:
        return 0

    with Partition("kinds") as p:
        p.intercepts.install_io(0x10, 0x10, io)
        p.intercepts.install_msr(0x40000000, msr)
        p.intercepts.set_tracer(lambda e: None, [InterceptKind.IO_PORT])
        io_entry, msr_entry = p.intercepts.io[0x10], p.intercepts.msr[0x40000000]
        assert io_entry is not None and io_entry.handler is not io
        assert msr_entry.handler is msr
        p.intercepts.set_tracer(lambda e: None, [])
        assert io_entry.handler is io and msr_entry.handler is msr
