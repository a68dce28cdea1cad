"""Memory sizes as people write them and as pyhv prints them: one parser and one formatter for
the whole project (the command line, VM configurations, the VMMS API, migration options).

``parse_size`` reads a byte count (``1073741824``) or a number with a binary unit: ``512M``,
``2G``, ``1.5GiB``, ``64KB``, ``1t`` (K, M, G, T are powers of 1024; ``B``/``iB`` optional, any
case). ``format_size`` prints bytes as the shortest exact form of that syntax (``1536M``), so
what it prints parses back to the same number. Imports nothing: it is on every start-up path.
"""

from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40

_UNITS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB}
_FORMS = "a byte count or a number with a unit K, M, G or T (512M, 2G, 1.5GiB)"


class SizeError(ValueError):
    """A size that is not understood; the message gives the text and the accepted forms."""


def parse_size(text: str | int) -> int:
    """Bytes in `text` (``512M``, ``2G``, ``1.5GiB``, ``4096``); SizeError if it is not a size."""
    if isinstance(text, bool):
        raise SizeError(f"memory size {text!r} is not understood: use {_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"memory size {text} is negative: use {_FORMS}")
        return text
    s = text.strip().upper()
    bare = s.removesuffix("IB") if s.endswith("IB") else s.removesuffix("B")
    unit = bare[-1:] if bare[-1:] in ("K", "M", "G", "T") else ""
    if s.endswith("IB") and not unit:
        unit = "?"  # "iB" needs a unit before it
    number = bare[: len(bare) - len(unit)].strip()
    whole, dot, frac = number.partition(".")
    if (
        unit == "?"
        or not (whole.isascii() and whole.isdigit())
        or (dot and not (frac.isascii() and frac.isdigit()))
    ):
        raise SizeError(f"memory size {text!r} is not understood: use {_FORMS}")
    scale = _UNITS[unit]
    if not dot:
        return int(whole) * scale
    # exact arithmetic: 1.5G is 1610612736 bytes, 0.3K is not a whole number of bytes
    numerator = int(whole + frac) * scale
    denominator = 10 ** len(frac)
    if numerator % denominator:
        raise SizeError(
            f"memory size {text!r} is not a whole number of bytes: round it (for example "
            f"{numerator // denominator} or {numerator // denominator + 1})"
        )
    return numerator // denominator


def format_size(n: int) -> str:
    """The shortest exact way to write `n` bytes: ``1G``, ``1536M``, ``4K``, ``100``."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
