"""The host terminal as a VM's serial console: raw mode, and QEMU's Ctrl-A escapes
(Ctrl-A x quits, Ctrl-A h shows help, Ctrl-A Ctrl-A sends one Ctrl-A to the guest)."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Protocol

from pyhv.worker.outcome import VmEnd

CTRL_A = 0x01
HELP = (
    "\r\n[pyhv] console keys: Ctrl-A x  quit (stops the VM)\r\n"
    "[pyhv]               Ctrl-A h  this help\r\n"
    "[pyhv]               Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n"
)


class EscapeDecoder:
    """Splits typed bytes into what goes to the guest and console actions ('quit', 'help')."""

    def __init__(self) -> None:
        self._escaped = False

    def feed(self, data: bytes) -> tuple[bytes, list[str]]:
        out = bytearray()
        actions: list[str] = []
        for b in data:
            if self._escaped:
                self._escaped = False
                if b in (ord("x"), ord("X")):
                    actions.append("quit")
                elif b in (ord("h"), ord("H"), ord("?")):
                    actions.append("help")
                elif b == CTRL_A:
                    out.append(CTRL_A)
                # Any other key after Ctrl-A is dropped, as in QEMU.
            elif b == CTRL_A:
                self._escaped = True
            else:
                out.append(b)
        return bytes(out), actions


class Machine(Protocol):
    def send(self, data: bytes) -> None: ...
    def stop(self, why: str = ...) -> None: ...
    def wait(self, timeout: float | None = None) -> VmEnd | None: ...


def interactive(vm: Machine, stdin_fd: int, write: Callable[[bytes], object]) -> VmEnd:
    """Forward the terminal to the VM until the VM ends or the user quits."""
    restore = _raw_mode(stdin_fd)
    decoder = EscapeDecoder()
    done = threading.Event()

    def pump() -> None:
        while not done.is_set():
            ready, _, _ = select.select([stdin_fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(stdin_fd, 4096)
            except OSError:
                return
            if not data:
                return  # end of input: keep the VM running until it ends by itself
            to_guest, actions = decoder.feed(data)
            if to_guest:
                vm.send(to_guest)
            for action in actions:
                if action == "quit":
                    vm.stop("Ctrl-A x")
                    return
                write(HELP.encode())

    reader = threading.Thread(target=pump, name="console-input", daemon=True)
    reader.start()
    try:
        end = vm.wait()
        assert end is not None
        return end
    finally:
        done.set()
        if restore is not None:
            restore()


def _raw_mode(fd: int) -> Callable[[], None] | None:
    """Put a terminal in raw mode; returns how to restore it (None if fd is not a terminal)."""
    if not os.isatty(fd):
        return None
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)

    def restore() -> None:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    return restore
