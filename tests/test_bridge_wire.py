"""Serial wire protocol: COBS, CRC, frames, and the streaming parser under fuzzing."""

from __future__ import annotations

import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_bridge import wire
from firmware_bridge.wire import Frame, FrameParser, MsgType, NakReason, Reject

# derandomized: the same examples every run, so CI never flakes on a lucky draw
FUZZ = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(FUZZ, max_examples=120)


def frames_st() -> st.SearchStrategy[Frame]:
    """Valid frames of every type, with the payload size the type requires."""
    return st.sampled_from(list(MsgType)).flatmap(
        lambda t: st.builds(
            Frame,
            st.just(t),
            st.integers(0, 0xFFFF),
            st.binary(min_size=wire.PAYLOAD_SIZES[t], max_size=wire.PAYLOAD_SIZES[t]),
            st.integers(0, 255),
        )
    )


def accepted(items: list[Frame | Reject]) -> list[Frame]:
    return [i for i in items if isinstance(i, Frame)]


@FUZZ
@given(st.binary(max_size=1200))
def test_cobs_roundtrip_and_no_zero_bytes(data: bytes) -> None:
    enc = wire.cobs_encode(data)
    assert 0 not in enc
    assert wire.cobs_decode(enc) == data
    assert len(enc) <= len(data) + len(data) // 254 + 1


def test_cobs_reference_vectors() -> None:
    # from the COBS paper / Wikipedia examples
    assert wire.cobs_encode(b"\x00") == b"\x01\x01"
    assert wire.cobs_encode(b"\x00\x00") == b"\x01\x01\x01"
    assert wire.cobs_encode(b"\x11\x22\x00\x33") == b"\x03\x11\x22\x02\x33"
    assert wire.cobs_encode(bytes(range(1, 255))) == b"\xff" + bytes(range(1, 255)) + b"\x01"


def test_crc_is_crc32_ieee_check_value() -> None:
    assert wire.crc32(b"123456789") == 0xCBF43926


def test_known_hold_frame_bytes() -> None:
    data = wire.encode_frame(wire.hold_frame(5, wire.HoldReason.CLINICAL_ALERT))
    raw = struct.pack("<BBBHHB", 1, 0x01, 1, 5, 1, 1)  # version, HOLD, epoch 1, seq, len, reason
    raw += struct.pack("<I", zlib.crc32(raw))
    assert data == b"\x00" + wire.cobs_encode(raw) + b"\x00"


@HEAVY
@given(frames_st())
def test_frame_roundtrip(frame: Frame) -> None:
    data = wire.encode_frame(frame)
    assert data[0] == 0 and data[-1] == 0 and 0 not in data[1:-1]
    assert len(data) <= wire.MAX_ENCODED + 2
    assert FrameParser().feed(data) == [frame]


@HEAVY
@given(st.lists(frames_st(), max_size=12), st.lists(st.integers(1, 40), max_size=30))
def test_parser_reassembles_any_chunking(frames: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(wire.encode_frame(f) for f in frames)
    parser, got, pos = FrameParser(), [], 0
    for cut in cuts + [len(stream)]:
        got += parser.feed(stream[pos : pos + cut])
        pos += cut
    got += parser.feed(stream[pos:])
    assert got == frames
    assert parser.rejects == 0


@FUZZ
@given(st.binary(max_size=3000))
def test_parser_never_raises_on_garbage(data: bytes) -> None:
    parser = FrameParser()
    for item in parser.feed(data):
        if isinstance(item, Frame):  # only if the garbage happens to hold a well-formed frame
            assert FrameParser().feed(wire.encode_frame(item)) == [item]
    assert len(parser._buf) <= wire.MAX_ENCODED


# A mutation of the byte stream: what a noisy or lossy line does to it
mutation_st = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("drop"), st.integers(0, 10**6), st.integers(1, 30)),
    st.tuples(st.just("dup"), st.integers(0, 10**6), st.integers(1, 40)),
    st.tuples(st.just("swap"), st.integers(0, 10**6), st.integers(1, 30)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.integers(0, 0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=30)),
)


def mutate(stream: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(stream)
    for kind, pos, arg in ops:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            buf[pos] ^= arg
        elif kind == "drop":
            del buf[pos : pos + arg]
        elif kind == "dup":
            buf[pos:pos] = buf[pos : pos + arg]
        elif kind == "swap":  # reorder two adjacent runs
            a, b = buf[pos : pos + arg], buf[pos + arg : pos + 2 * arg]
            buf[pos : pos + 2 * arg] = b + a
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = arg
    return bytes(buf)


@HEAVY
@given(st.lists(frames_st(), min_size=1, max_size=10), st.lists(mutation_st, min_size=1, max_size=6))
def test_parser_accepts_only_frames_that_were_sent(frames: list[Frame], ops: list) -> None:
    """Corrupted, dropped, duplicated, reordered, truncated bytes: no invented frame, ever."""
    stream = b"".join(wire.encode_frame(f) for f in frames)
    parser = FrameParser()
    out = parser.feed(mutate(stream, ops))
    sent = set(frames)
    for frame in accepted(out):
        assert frame in sent
    # every chunk is either a sent frame or counted as a reject
    assert parser.frames + parser.rejects == len(out)


@HEAVY
@given(st.lists(frames_st(), min_size=3, max_size=8), st.data())
def test_damage_to_one_frame_loses_only_that_frame(frames: list[Frame], data) -> None:
    """Resynchronisation: the frames around a damaged one all survive."""
    encoded = [wire.encode_frame(f) for f in frames]
    victim = data.draw(st.integers(0, len(frames) - 1))
    body = bytearray(encoded[victim][1:-1])  # damage inside the delimiters only
    how = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    pos = data.draw(st.integers(0, len(body) - 1))
    if how == "flip":
        bit = data.draw(st.integers(0, 7))
        body[pos] ^= 1 << bit  # a flip to 0x00 splits the frame: still only this one is lost
    elif how == "truncate":
        del body[pos:]
    else:
        body[pos:pos] = data.draw(st.binary(min_size=1, max_size=20).filter(lambda b: 0 not in b))
    encoded[victim] = b"\x00" + bytes(body) + b"\x00"
    got = accepted(FrameParser().feed(b"".join(encoded)))
    expected = [f for i, f in enumerate(frames) if i != victim]
    assert got == expected


def test_rejects_name_their_reason() -> None:
    def raw_frame(
        version: int, mtype: int, seq: int, payload: bytes, length: int | None = None, crc_xor: int = 0
    ) -> bytes:
        raw = struct.pack("<BBBHH", version, mtype, 0, seq, len(payload) if length is None else length) + payload
        raw += struct.pack("<I", zlib.crc32(raw) ^ crc_xor)
        return b"\x00" + wire.cobs_encode(raw) + b"\x00"

    cases = {
        NakReason.BAD_CRC: raw_frame(1, 0x01, 7, b"\x01", crc_xor=1),
        NakReason.BAD_VERSION: raw_frame(2, 0x01, 7, b"\x01"),
        NakReason.UNKNOWN_TYPE: raw_frame(1, 0x7E, 7, b"\x01"),
        NakReason.BAD_PAYLOAD: raw_frame(1, 0x01, 7, b"\x01\x02"),
    }
    for reason, data in cases.items():
        (item,) = FrameParser().feed(data)
        assert isinstance(item, Reject) and item.reason is reason, (reason, item)
    (short,) = FrameParser().feed(b"\x00\x03\x01\x02\x00")
    assert isinstance(short, Reject) and short.reason is NakReason.BAD_FRAMING
    (length,) = FrameParser().feed(raw_frame(1, 0x01, 7, b"\x01", length=3))
    assert isinstance(length, Reject) and length.reason is NakReason.BAD_FRAMING
    assert length.seq == 7  # the header was trustworthy (CRC good), so the NAK can name it


def test_overlong_run_is_discarded_and_parser_resyncs() -> None:
    parser = FrameParser()
    good = wire.hold_frame(9, wire.HoldReason.CLINICAL_ALERT)
    out = parser.feed(b"\x55" * 5000) + parser.feed(b"\x55" * 5000 + wire.encode_frame(good))
    assert accepted(out) == [good]
    assert any(isinstance(i, Reject) and "delimiter" in i.detail for i in out)
    assert len(parser._buf) == 0


def test_telemetry_payload_roundtrip_and_bad_state() -> None:
    t = wire.Telemetry(12345, 2500, 800000, 3000, wire.InjectorState.HELD, 0, 99)
    assert wire.Telemetry.unpack(t.pack()) == t
    bad = bytearray(t.pack())
    bad[16] = 9  # state byte out of range
    try:
        wire.Telemetry.unpack(bytes(bad))
    except ValueError:
        pass
    else:
        raise AssertionError("unknown injector state accepted")


def test_seq_newer_wraps() -> None:
    assert wire.seq_newer(1, 0) and wire.seq_newer(0, 0xFFFF) and wire.seq_newer(5, 0xFFF0)
    assert not wire.seq_newer(0, 1) and not wire.seq_newer(3, 3)
    assert not wire.seq_newer(0xFFF0, 5)
