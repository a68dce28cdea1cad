"""The fuzz campaign's harness: one target per decoder a guest or a peer reaches, each a function
of bytes with a seed corpus built from real, valid encodings (docs/security.md, "Fuzzing").

A :class:`Target` names the decoder, builds its seeds, and runs one input; it may raise only the
decoder's documented error types (`expected`). Anything else is a crash, and so is a hang (more
than `time_limit` seconds for one input) or unbounded memory (more than `memory_limit` bytes
allocated for one input at its peak: exactly while tracemalloc traces, else as the growth of
the process's peak resident memory, which costs nothing but sees an input only when it takes
the process above its earlier peak). :func:`run_one` runs an input and raises :class:`Crash`
for those.

Inputs are made two ways, from the same mutation operators: Hypothesis draws them
(:func:`inputs`: a seed, a mutated seed, or any bytes; shrinking finds the smallest crashing
input) for the bounded run in the test suite (tests/fuzz/test_fuzz.py), and :class:`Mutator`
draws them from a seeded `random.Random` for the timed campaign (bench/fuzz.py), where
Hypothesis's per-example bookkeeping would cost most of the time.

pyhv itself carries no fuzz code; the tests and bench/fuzz.py import this package.
"""

from __future__ import annotations

import json
import random
import re
import resource
import signal
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

#: Seconds one input may take before it counts as a hang (this machine is slow and shared:
#: the decoders take well under a millisecond).
TIME_LIMIT = 2.0
#: Bytes one input may allocate at its peak before it counts as unbounded memory;
#: inputs are at most a few KiB, the largest legitimate structure here (a ring of 8 KiB, an
#: 8 KiB control page image) far below it.
MEMORY_LIMIT = 32 << 20


@dataclass(frozen=True)
class Target:
    """One decoder under fuzz: `run(data)` feeds it `data` and raises only `expected`."""

    name: str
    what: str  #: the decoder(s), in words (bench output, docs)
    seeds: Callable[[], list[bytes]]
    run: Callable[[bytes], object]
    expected: tuple[type[BaseException], ...] = ()
    max_size: int = 16384
    #: Targets that need a live process (the VMMS's HTTP server): bench/fuzz.py starts it.
    needs: str | None = None
    #: The test kind of its bounded run (tests/conftest.py): "simulation" where the input
    #: stands in for a guest driving a device.
    kind: str = "unit"
    #: The seeds are JSON documents: half the inputs change their values only (one to three
    #: values replaced or dropped), so they get past the JSON parser to the declarations.
    json: bool = False

    @property
    def corpus(self) -> list[bytes]:
        return _seeds(self)


@cache
def _seeds_cached(name: str, build: Callable[[], list[bytes]]) -> tuple[bytes, ...]:
    seeds = tuple(build())
    if not seeds:
        raise ValueError(f"fuzz target {name} has no seeds")
    return seeds


def _seeds(t: Target) -> list[bytes]:
    return list(_seeds_cached(t.name, t.seeds))


class Crash(AssertionError):
    """An input made the decoder fail in a way it does not declare."""

    def __init__(self, target: str, kind: str, data: bytes, detail: str) -> None:
        self.target, self.kind, self.data, self.detail = target, kind, data, detail
        shown = data[:256].hex() + ("..." if len(data) > 256 else "")
        super().__init__(f"{target}: {kind}: {detail}; input ({len(data)} bytes): {shown}")


class _Hang(BaseException):
    """Raised by the alarm in the input that overran (BaseException: no decoder's `except
    Exception` may swallow it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang


def run_one(
    t: Target,
    data: bytes,
    *,
    time_limit: float = TIME_LIMIT,
    memory_limit: int | None = MEMORY_LIMIT,
) -> None:
    """Run one input; Crash if it raised anything but `t.expected`, hung or took too much
    memory (None: not checked)."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGALRM, _alarm) if main else None
    if main:
        signal.setitimer(signal.ITIMER_REAL, time_limit)
    tracing = memory_limit is not None and tracemalloc.is_tracing()
    if tracing:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    rss = _peak_rss() if memory_limit is not None and not tracing else 0
    start = time.monotonic()
    try:
        t.run(data)
    except _Hang:
        raise Crash(t.name, "hang", data, f"no result within {time_limit} s") from None
    except t.expected:
        pass
    except Exception as e:  # noqa: BLE001 - what this harness looks for
        raise Crash(t.name, "exception", data, f"{type(e).__name__}: {e}") from e
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    took = time.monotonic() - start
    if took > time_limit:  # off the main thread no alarm interrupts it
        raise Crash(t.name, "hang", data, f"took {took:.2f} s, more than {time_limit} s")
    if tracing:
        peak = tracemalloc.get_traced_memory()[1] - base
        if memory_limit is not None and peak > memory_limit:
            raise Crash(t.name, "memory", data, f"allocated {peak >> 20} MiB for {len(data)} bytes")
    elif memory_limit is not None and (grew := _peak_rss() - rss) > memory_limit:
        why = f"the peak resident memory grew {grew >> 20} MiB for {len(data)} bytes"
        raise Crash(t.name, "memory", data, why)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


# --- mutation ---------------------------------------------------------------------------------

#: Integers that break length and index checks (AFL's "interesting values", widened to 64 bits).
INTERESTING = (
    0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 512, 1023, 1024, 4095, 4096,
    4097, 8191, 8192, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
    1 << 32, (1 << 40) - 1, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
)  # fmt: skip
#: Text that breaks JSON decoders and number parsers.
TOKENS = (
    b"null", b"true", b"false", b"-1", b"0", b"1e309", b"-0", b"NaN", b"Infinity", b"[]", b"{}",
    b'""', b"99999999999999999999999999", b"\\u0000", b"\\ud800", b'"\xff"', b"[[[[[[[[", b",",
    b":", b'{"', b"}", b"]", b"0x10", b"1e300", b"-1e300", b"1e18", b"-9223372036854775809",
    b"18446744073709551616", b"0.5", b'"\\ud800"', b'"\\u0000"', b'"' + b"A" * 300 + b'"',
)  # fmt: skip
#: Openers of nested JSON values (a decoder that recurses runs out of stack on them).
NESTS = (b"[", b'{"a":', b'[{"k":')
#: JSON values a field of a declared message is replaced by (wrong types, bounds, sizes).
JSON_VALUES: tuple[object, ...] = (
    None, True, False, 0, -1, 1, 255, 256, 4096, 1 << 31, 1 << 32, 1 << 63, 1 << 64, -(1 << 63),
    1 << 100, 0.5, -0.0, 1e300, "", "x", "IDLE", "512M", "1Q", "\ud800", "A" * 5000, [], [0, 0],
    [[1, 2]], [[-1, 1 << 40]], {}, {"a": 1},
)  # fmt: skip
N_OPS = 13
_NUMBER = re.compile(rb"-?[0-9][0-9.eE+-]*")


def mutate(data: bytes, ops: Sequence[tuple[int, int, int]], other: bytes = b"") -> bytes:
    """`data` changed by `ops`, each (operator, position, argument): bit flip, byte set,
    interesting u16/u32/u64 (both byte orders), insert, delete, duplicate a chunk, splice
    `other` in, insert a JSON token, truncate, replace the next number by a JSON token, nest
    deeply, replace (or drop) one value of a JSON document."""
    b = bytearray(data)
    for op, pos, arg in ops:
        n = len(b)
        at = pos % (n + 1)
        op %= N_OPS
        if op == 0 and n:
            b[at % n] ^= 1 << (arg & 7)
        elif op == 1 and n:
            b[at % n] = arg & 0xFF
        elif op in (2, 3):
            width = (2, 4, 8)[arg % 3]
            value = INTERESTING[(arg >> 2) % len(INTERESTING)] & ((1 << (8 * width)) - 1)
            if arg & 2:
                value = (1 << (8 * width)) - value if value else 0  # negative numbers
            raw = value.to_bytes(width, "big" if op == 3 else "little")
            b[at : at + width] = raw
        elif op == 4:
            b[at:at] = bytes([arg & 0xFF]) * (1 + (arg >> 8) % 16)
        elif op == 5 and n:
            del b[at : at + 1 + (arg % 16)]
        elif op == 6 and n:
            chunk = b[at : at + 1 + arg % 64]
            b[at:at] = chunk
        elif op == 7 and other:
            start = arg % len(other)
            b[at : at + (arg >> 8) % 64] = other[start : start + 1 + (arg >> 4) % 64]
        elif op == 8:
            b[at:at] = TOKENS[arg % len(TOKENS)]
        elif op == 9 and n:
            del b[at:]
        elif op == 10:
            m = _NUMBER.search(b, at) or _NUMBER.search(b)
            if m is not None:
                b[m.start() : m.end()] = TOKENS[arg % len(TOKENS)]
        elif op == 11:
            b[at:at] = NESTS[arg % len(NESTS)] * (arg >> 8)
        elif op == 12:
            b[:] = _json_leaf(bytes(b), pos, arg)
    return bytes(b)


def _json_leaf(data: bytes, pos: int, arg: int) -> bytes:
    """`data` as JSON with one value (chosen by `pos`) replaced by a JSON_VALUES entry, or
    dropped from its object (unchanged if `data` is no JSON)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return data
    places: list[tuple[Any, Any]] = []

    def walk(v: Any) -> None:
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            places.append((v, k))
            walk(x)

    walk(doc)
    if not places:
        return data
    parent, key = places[pos % len(places)]
    if isinstance(parent, dict) and arg % 8 == 7:
        del parent[key]
    else:
        parent[key] = JSON_VALUES[arg % len(JSON_VALUES)]
    return json.dumps(doc).encode()


class Mutator:
    """Inputs for a target from a seeded random.Random: a seed mutated by 1-8 operators (most),
    a seed as is, or random bytes."""

    def __init__(self, t: Target, seed: int = 0) -> None:
        self.rng = random.Random(f"{t.name}/{seed}")
        self.corpus = t.corpus
        self.max_size = t.max_size
        self.json = t.json

    def __call__(self) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.02:
            return rng.choice(self.corpus)
        if roll < 0.07:
            return rng.randbytes(rng.randrange(self.max_size + 1))
        leaves = self.json and roll < 0.5
        ops = [
            (12 if leaves else rng.randrange(N_OPS), rng.randrange(1 << 16), rng.randrange(1 << 20))
            for _ in range(rng.randrange(1, 4 if leaves else 9))
        ]
        data = mutate(rng.choice(self.corpus), ops, rng.choice(self.corpus))
        return data[: self.max_size]


def inputs(t: Target) -> Any:
    """A Hypothesis strategy of inputs for `t` (same operators as :class:`Mutator`)."""
    from hypothesis import strategies as st

    corpus = t.corpus
    op = st.tuples(
        st.integers(0, N_OPS - 1), st.integers(0, (1 << 16) - 1), st.integers(0, (1 << 20) - 1)
    )
    mutated = st.builds(
        mutate,
        st.sampled_from(corpus),
        st.lists(op, min_size=1, max_size=8),
        st.sampled_from(corpus),
    )
    leaf = st.tuples(st.just(12), st.integers(0, (1 << 16) - 1), st.integers(0, (1 << 20) - 1))
    leaves = st.builds(mutate, st.sampled_from(corpus), st.lists(leaf, min_size=1, max_size=3))
    return st.one_of(
        st.sampled_from(corpus),
        mutated,
        *([leaves] if t.json else []),
        st.binary(max_size=min(t.max_size, 512)),
    ).map(lambda d: d[: t.max_size])


# --- reading a program from bytes (structured targets) ------------------------------------------


class Reader:
    """Bytes read as a program (a libFuzzer FuzzedDataProvider): fixed-size little-endian
    integers, zero past the end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, n: int) -> bytes:
        out = self.data[self.at : self.at + n]
        self.at += len(out)
        return out

    def u8(self) -> int:
        return int.from_bytes(self.take(1).ljust(1, b"\0"), "little")

    def u16(self) -> int:
        return int.from_bytes(self.take(2).ljust(2, b"\0"), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4).ljust(4, b"\0"), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8).ljust(8, b"\0"), "little")

    def blob(self) -> bytes:
        """A u16 length and that many bytes."""
        return self.take(self.u16())


def blob(data: bytes) -> bytes:
    """What Reader.blob reads back as `data`."""
    return struct.pack("<H", len(data)) + data


def all_targets() -> list[Target]:
    """Every target of the campaign, in a fixed order."""
    from tests.support.fuzz import devices, dynmem, loaders, migration, vmbus, vmms, worker

    return [
        *vmbus.TARGETS,
        *dynmem.TARGETS,
        *migration.TARGETS,
        *vmms.TARGETS,
        *worker.TARGETS,
        *devices.TARGETS,
        *loaders.TARGETS,
    ]
