"""The migration stream's control frames are declared once: each body read back is the body
sent, and whatever else a peer puts in a control frame is refused with an error that names the
frame and the field."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.migration import frames
from tests.support.hostile import json_values

pytestmark = pytest.mark.unit

BODIES: list[msgspec.Struct] = [
    frames.Hello(1, "ab" * 32),
    frames.Auth(2, "cd" * 32, "ef" * 32, "12" * 32, True),
    frames.AuthOk("01" * 32, "34" * 32),
    frames.Config({"name": "vm"}, [(0, 1 << 20), (1 << 32, 2 << 20)], frames.ConfigOptions(False)),
    frames.Empty(),
    frames.Commit(b"ls\r"),
    frames.PassEnd(3, 100),
    frames.Checksum("0123abcd"),
    frames.Resumed(12.5, 3.25),
    frames.Abort("out of memory"),
    frames.Postcopy("0f" * 16),
    frames.Resume("a5" * 16),
    frames.ResumeAck(4096, 3),
    frames.PostcopyDone("00" * 8, 3, 2, 0.5, 1.5, 2.0, {"vp0": 1.5}, 1, 2, 2),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_a_control_frame_body_read_back_is_the_body_sent(body: msgspec.Struct) -> None:
    assert frames.decode(frames.encode(body), type(body), "X") == body


def test_a_pass_end_keeps_its_wire_name() -> None:
    assert frames.encode(frames.PassEnd(2, 7)) == b'{"pass":2,"pages":7}'


@pytest.mark.parametrize(
    ("kind", "raw", "words"),
    [
        (frames.Hello, {"version": 1, "nonce": "zz"}, "at `$.nonce`"),
        (frames.Hello, {"version": True, "nonce": "ab" * 32}, "got `bool` - at `$.version`"),
        (frames.Config, {"regions": []}, "missing required field `config`"),
        (frames.Config, {"config": {}, "regions": [[0, 0]]}, "RAM region"),
        (frames.Config, {"config": {}, "regions": [[4096, 1 << 60]]}, "at `$.regions[0][1]`"),
        (frames.Config, {"config": {}, "regions": [], "rogue": 1}, "unknown field `rogue`"),
        (frames.PassEnd, {"pass": -1}, "at `$.pass`"),
        (frames.Resumed, {"time": "now"}, "got `str` - at `$.time`"),
        (frames.Empty, {"x": 1}, "unknown field `x`"),
        (frames.Checksum, [], "Expected `object`, got `array`"),
        (frames.AuthOk, {"mac": "x", "key": "00"}, "at `$.key`"),
        (frames.Auth, {"version": 2, "nonce": "ab" * 32, "mac": 1, "encrypt": 1}, "$.encrypt"),
        (frames.Resume, {"migration": "AB" * 16}, "at `$.migration`"),  # lower-case hex only
        (frames.Resume, {"migration": "ab" * 17}, "at `$.migration`"),
        (frames.ResumeAck, {"pages": -1, "runs": 0}, "at `$.pages`"),
    ],
)
def test_a_malformed_body_is_refused_naming_the_frame_and_field(
    kind: type[Any], raw: object, words: str
) -> None:
    with pytest.raises(frames.FrameError, match=r"^the FRAME frame is refused: ") as e:
        frames.decode(json.dumps(raw).encode(), kind, "FRAME")
    assert words in str(e.value)


_JSON = json_values(st.sampled_from(["config", "regions", "pass", "time", "x"]))


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([type(b) for b in BODIES]),
    payload=st.binary(max_size=100) | _JSON.map(lambda v: json.dumps(v).encode()),
)
def test_any_control_frame_payload_is_its_body_or_refused(kind: type[Any], payload: bytes) -> None:
    try:
        body = frames.decode(payload, kind, "X")
    except frames.FrameError as e:
        assert str(e).startswith("the X frame is refused: ")
        return
    assert isinstance(body, kind) and frames.decode(frames.encode(body), kind, "X") == body


def test_a_body_nested_too_deeply_is_refused_not_a_recursion_error() -> None:
    # found by the fuzz campaign (tests/fuzz): msgspec's RecursionError escaped the decoder
    with pytest.raises(frames.FrameError, match="CONFIG frame is refused: JSON nested too deeply"):
        frames.decode(b'{"config":{"a":' + b"[" * 5000, frames.Config, "CONFIG")
