"""COM1: a 16550A UART (National Semiconductor PC16550D register set).

Registers at base+0..7: RBR/THR (DLL with DLAB), IER (DLM with DLAB), IIR/FCR, LCR, MCR, LSR,
MSR, SCR. Transmission is instantaneous: a byte written to THR goes to the output callback at
once, so THR and the transmitter are always empty. Received bytes come from the host via
:meth:`Uart16550.feed`; a host-side backlog refills the 16-byte FIFO as the guest reads, so host
input never overruns. The interrupt is edge-triggered (ISA IRQ 4 on the IOAPIC): the model keeps
the level the chip would drive and calls ``pulse_irq`` on each rising edge. Like QEMU's model,
OUT2 does not gate the interrupt. The character-timeout interrupt is raised at once when the FIFO
holds fewer bytes than the trigger level (there is no bit timing to wait for).

Every register accepts any value: unknown bits are ignored, reserved registers read back sanely.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyhv import wire

COM1_BASE = 0x3F8
COM1_IRQ = 4
FIFO_SIZE = 16
BACKLOG_MAX = 1 << 20  # bytes of host input held beyond the FIFO
CLOCK_HZ = 1_843_200  # the PC's UART crystal: baud = 115200 / divisor

# Register offsets.
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDA, IER_THRE, IER_RLS, IER_MS = 1, 2, 4, 8

IIR_NO_INT = 0x01
IIR_MS, IIR_THRE, IIR_RDA, IIR_RLS, IIR_TIMEOUT = 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 1, 2, 4
TRIGGER_LEVELS = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 16

LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI, LSR_THRE, LSR_TEMT, LSR_FIFO_ERR = (
    1,
    2,
    4,
    8,
    16,
    32,
    64,
    128,
)
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 1, 2, 4, 8
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 16, 32, 64, 128
# With nothing in loopback, the host side is "connected": CTS, DSR and DCD asserted.
MSR_CONNECTED = MSR_CTS | MSR_DSR | MSR_DCD


UART_STATE_VERSION = 1
#: The chip's registers and flags as Uart16550 keeps them (the state's fields, less the "_").
_REGISTERS = (
    "ier lcr mcr scr dll dlm _fifo_enabled _trigger _lsr_errors _msr _thr_ipending _irq_level"
).split()
_FLAGS = ("fifo_enabled", "thr_ipending", "irq_level")
#: The bits each saved register may have (the migration stream is untrusted input).
_STATE_MASKS = {"ier": 0x0F, "mcr": 0x1F}


@dataclass(frozen=True)
class UartState:
    """A 16550A's registers, its receive FIFO and the host input waiting behind it."""

    version: int
    ier: int
    lcr: int
    mcr: int
    scr: int
    dll: int
    dlm: int
    fifo_enabled: bool
    trigger: int
    lsr_errors: int
    msr: int
    thr_ipending: bool
    irq_level: bool
    rx: bytes
    backlog: bytes

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: object) -> UartState:
        """The shape (types, declared by the fields); restore() checks the values."""
        return wire.from_wire(cls, d, "serial state")


class Uart16550:
    """The chip's state and its eight registers. Thread-safe: VP threads access registers while
    the host feeds input from another thread."""

    def __init__(
        self,
        output: Callable[[bytes], None],
        pulse_irq: Callable[[], None] | None = None,
    ) -> None:
        self._output = output
        self._pulse_irq = pulse_irq
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._backlog: deque[int] = deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.dll = 0x01  # 115200 baud until the guest programs the divisor
        self.dlm = 0x00
        self._fifo_enabled = False
        self._trigger = 1
        self._lsr_errors = 0
        self._msr = MSR_CONNECTED
        self._thr_ipending = False  # THRE interrupt armed (cleared by an IIR read or a THR write)
        self._irq_level = False
        #: Host input held back, not given to the guest (None: not holding): a migrating
        #: source holds what is typed once its state is saved, and sends it with COMMIT.
        self._held: bytearray | None = None

    # --- host side -------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Queue bytes for the guest to receive; returns how many were accepted (the rest
        did not fit the backlog, like a full line buffer)."""
        with self._lock:
            if self._held is not None:
                taken = data[: max(BACKLOG_MAX - len(self._held), 0)]
                self._held += taken
                return len(taken)
            room = BACKLOG_MAX - len(self._backlog)
            taken = data[: max(room, 0)]
            self._backlog.extend(taken)
            self._refill()
            self._update_irq()
        return len(taken)

    @property
    def divisor(self) -> int:
        return self.dlm << 8 | self.dll

    @property
    def baud(self) -> int:
        return CLOCK_HZ // 16 // self.divisor if self.divisor else 0

    @property
    def pending_input(self) -> int:
        """Bytes the guest has not read yet."""
        with self._lock:
            return len(self._rx) + len(self._backlog)

    @property
    def irq_level(self) -> bool:
        return self._irq_level

    # --- guest side (port I/O) -------------------------------------------------------

    def read(self, offset: int) -> int:
        """Read the 8-bit register at ``offset`` (0..7)."""
        with self._lock:
            value = self._read(offset & 7)
            self._update_irq()
        return value

    def write(self, offset: int, value: int) -> None:
        """Write the 8-bit register at ``offset`` (0..7); any value is accepted."""
        out = None
        with self._lock:
            out = self._write(offset & 7, value & 0xFF)
            self._update_irq()
        if out is not None:
            # Outside the lock: the callback may block on a terminal or a pipe.
            self._output(out)

    # --- registers -------------------------------------------------------------------

    def _dlab(self) -> bool:
        return bool(self.lcr & LCR_DLAB)

    def _read(self, reg: int) -> int:
        if reg == RBR_THR_DLL:
            if self._dlab():
                return self.dll
            if not self._rx:
                return 0
            value = self._rx.popleft()
            self._refill()
            return value
        if reg == IER_DLM:
            return self.dlm if self._dlab() else self.ier
        if reg == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRE:
                self._thr_ipending = False  # reading IIR acknowledges THRE
            return iir | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            lsr = LSR_THRE | LSR_TEMT | self._lsr_errors
            if self._rx:
                lsr |= LSR_DR
            self._lsr_errors = 0  # reading LSR clears the error bits
            return lsr
        if reg == MSR:
            msr = self._msr
            self._msr &= ~0x0F  # reading MSR clears the delta bits
            return msr
        return self.scr

    def _write(self, reg: int, value: int) -> bytes | None:
        if reg == RBR_THR_DLL:
            if self._dlab():
                self.dll = value
                return None
            # THR: sent at once, so the holding register is empty again right away.
            self._thr_ipending = bool(self.ier & IER_THRE)
            if self.mcr & MCR_LOOP:
                self._receive_loopback(value)
                return None
            return bytes((value,))
        if reg == IER_DLM:
            if self._dlab():
                self.dlm = value
            else:
                was = self.ier
                self.ier = value & 0x0F
                # Enabling THRE with an empty THR raises the interrupt (the 16550 does).
                if self.ier & IER_THRE and not was & IER_THRE:
                    self._thr_ipending = True
                if not self.ier & IER_THRE:
                    self._thr_ipending = False
        elif reg == IIR_FCR:
            self._write_fcr(value)
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self._write_mcr(value & 0x1F)
        elif reg == SCR:
            self.scr = value
        # LSR and MSR are read-only; writes (factory test on real chips) are ignored.
        return None

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self._fifo_enabled:
            # Switching FIFO mode clears both FIFOs.
            self._rx.clear()
            self._fifo_enabled = enable
        if not enable:
            self._trigger = 1
        else:
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self._trigger = TRIGGER_LEVELS[value >> 6]
        self._refill()

    def _write_mcr(self, value: int) -> None:
        self.mcr = value
        old = self._msr
        if value & MCR_LOOP:
            # Loopback: modem outputs drive the modem inputs.
            new = (
                (MSR_CTS if value & MCR_RTS else 0)
                | (MSR_DSR if value & MCR_DTR else 0)
                | (MSR_RI if value & MCR_OUT1 else 0)
                | (MSR_DCD if value & MCR_OUT2 else 0)
            )
        else:
            new = MSR_CONNECTED
        delta = old & 0x0F
        changed = (old ^ new) & 0xF0
        if changed & MSR_CTS:
            delta |= MSR_DCTS
        if changed & MSR_DSR:
            delta |= MSR_DDSR
        if changed & MSR_DCD:
            delta |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:
            delta |= MSR_TERI  # trailing edge of RI
        self._msr = new | delta
        self._refill()  # leaving loopback reconnects the input

    def _receive_loopback(self, value: int) -> None:
        if len(self._rx) >= self._capacity():
            self._lsr_errors |= LSR_OE
            return
        self._rx.append(value)

    def _capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled else 1

    def _refill(self) -> None:
        if self.mcr & MCR_LOOP:
            return  # loopback disconnects the serial input: host bytes wait in the backlog
        cap = self._capacity()
        while self._backlog and len(self._rx) < cap:
            self._rx.append(self._backlog.popleft())

    def _iir(self) -> int:
        """Highest-priority pending interrupt: line status, received data, THRE, modem status."""
        if self.ier & IER_RLS and self._lsr_errors:
            return IIR_RLS
        if self.ier & IER_RDA and self._rx:
            if len(self._rx) >= self._trigger:
                return IIR_RDA
            return IIR_TIMEOUT if self._fifo_enabled else IIR_RDA
        if self.ier & IER_THRE and self._thr_ipending:
            return IIR_THRE
        if self.ier & IER_MS and self._msr & 0x0F:
            return IIR_MS
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._iir() != IIR_NO_INT
        rising = level and not self._irq_level
        self._irq_level = level
        if rising and self._pulse_irq is not None:
            self._pulse_irq()

    # --- state save/restore (live migration) -----------------------------------------

    def save(self, hold_input: bool = False) -> UartState:
        """Every register, the FIFO and the host backlog. With `hold_input`, input fed from
        now on is held (take_held(), or release_held() to give it to the guest after all)."""
        with self._lock:
            if hold_input and self._held is None:
                self._held = bytearray()
            return UartState(
                UART_STATE_VERSION,
                **{n.lstrip("_"): getattr(self, n) for n in _REGISTERS},
                rx=bytes(self._rx),
                backlog=bytes(self._backlog),
            )

    def take_held(self) -> bytes:
        """The input held since save(hold_input=True) (it stays held from now on)."""
        with self._lock:
            if self._held is None:
                return b""
            data, self._held = bytes(self._held), bytearray()
            return data

    def release_held(self) -> None:
        """Stop holding input: what was held goes to the guest (a migration rolled back)."""
        with self._lock:
            data, self._held = bytes(self._held or b""), None
        if data:
            self.feed(data)

    def restore(self, st: UartState) -> None:
        """Take the state save() gave (on another host); the interrupt level is taken as is,
        without a new edge (the IOAPIC's own state comes with the partition's). A version or a
        register value no chip holds raises ValueError naming it, and nothing is changed."""
        if st.version != UART_STATE_VERSION:
            raise ValueError(
                f"serial state version {st.version!r} is not {UART_STATE_VERSION}: the hosts "
                "run different pyhv releases"
            )
        for key in _REGISTERS:
            key = key.lstrip("_")
            v = getattr(st, key)
            if isinstance(v, bool):
                continue
            if key == "trigger" and v not in TRIGGER_LEVELS:
                raise ValueError(f"serial state: trigger {v!r} is not one of {TRIGGER_LEVELS}")
            if key != "trigger" and v & ~_STATE_MASKS.get(key, 0xFF):
                raise ValueError(f"serial state: register {key}={v!r} is out of range")
        if len(st.rx) > FIFO_SIZE or len(st.backlog) > BACKLOG_MAX:
            raise ValueError(
                f"serial state: {len(st.rx)} bytes in the FIFO and {len(st.backlog)} in the "
                f"backlog, more than {FIFO_SIZE} and {BACKLOG_MAX}"
            )
        with self._lock:
            for n in _REGISTERS:
                setattr(self, n, getattr(st, n.lstrip("_")))
            self._rx, self._backlog = deque(st.rx), deque(st.backlog)

    # --- port I/O glue ---------------------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        """A port read of ``size`` bytes at base+offset, split into byte accesses like the
        ISA bus does for an 8-bit device; bytes beyond the 8 registers read as 0xFF."""
        value = 0
        for i in range(size):
            reg = offset + i
            byte = self.read(reg) if 0 <= reg < 8 else 0xFF
            value |= byte << (8 * i)
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            reg = offset + i
            if 0 <= reg < 8:
                self.write(reg, (value >> (8 * i)) & 0xFF)
