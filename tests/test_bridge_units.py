"""Pure parts of the bridge: command channel, hold latch, incoming-message checks (fuzzed)."""

from __future__ import annotations

import json
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import messages, wire
from firmware_bridge.commands import CommandChannel
from firmware_bridge.latch import HoldLatch
from firmware_bridge.messages import GuidanceAlert, GuidanceHeartbeat, GuidanceStatus, Rejected
from firmware_bridge.wire import AckStatus, FrameParser, HoldReason, MsgType

MS = 1_000_000


def sent_frame(data: bytes) -> wire.Frame:
    (frame,) = FrameParser().feed(data)
    assert isinstance(frame, wire.Frame)
    return frame


def ack_payload(seq: int, status: AckStatus = AckStatus.APPLIED) -> bytes:
    return wire.ACK_PAYLOAD.pack(seq, status)


def test_first_command_after_connect_carries_sync_then_not() -> None:
    ch = CommandChannel(seq_start=10)
    first = sent_frame(ch.command(MsgType.HEARTBEAT, 0, hold_latched=False))
    second = sent_frame(ch.command(MsgType.HOLD, 0, reason=HoldReason.CLINICAL_ALERT))
    assert first.flags & wire.FLAG_SYNC and not second.flags & wire.FLAG_SYNC
    assert (first.seq, second.seq) == (11, 12)
    ch.resync()
    assert sent_frame(ch.command(MsgType.RELEASE, 0)).flags & wire.FLAG_SYNC


def test_retransmit_on_timeout_then_fail_after_bounded_attempts() -> None:
    ch = CommandChannel(ack_timeout_ns=40 * MS, max_attempts=3, seq_start=0)
    data = ch.command(MsgType.HOLD, 0, reason=HoldReason.CLINICAL_ALERT)
    assert ch.poll(39 * MS) == ([], [])
    resend, failed = ch.poll(40 * MS)
    assert resend == [data] and failed == []  # byte-identical: same seq, firmware dedups
    assert ch.next_deadline_ns() == 80 * MS
    assert ch.poll(80 * MS)[0] == [data]
    resend, failed = ch.poll(120 * MS)
    assert resend == [] and len(failed) == 1
    assert failed[0].status is None and failed[0].attempts == 3 and "3 attempts" in failed[0].why
    assert ch.pending == {} and ch.failed == 1 and ch.retransmits == 2


def test_ack_completes_and_late_duplicate_ack_is_stray() -> None:
    ch = CommandChannel(seq_start=99)
    ch.command(MsgType.HOLD, 0, reason=HoldReason.CLINICAL_ALERT)
    out = ch.on_ack(ack_payload(100), 3 * MS)
    assert out and out.ok and out.status is AckStatus.APPLIED and out.elapsed_ns == 3 * MS
    assert ch.on_ack(ack_payload(100), 4 * MS) is None and ch.stray_acks == 1
    assert ch.poll(10**12) == ([], [])


def test_nak_resends_named_command_or_all_when_unknown() -> None:
    ch = CommandChannel(seq_start=0)
    a = ch.command(MsgType.HOLD, 0, reason=HoldReason.CLINICAL_ALERT)
    b = ch.command(MsgType.HEARTBEAT, 0, hold_latched=True)
    assert ch.on_nak(wire.NAK_PAYLOAD.pack(2, wire.NakReason.BAD_PAYLOAD), MS)[0] == [b]
    assert sorted(ch.on_nak(wire.NAK_PAYLOAD.pack(wire.NO_SEQ, wire.NakReason.BAD_CRC),
                            MS)[0]) == sorted([a, b])


def test_abandon_fails_everything_in_flight() -> None:
    ch = CommandChannel(seq_start=0)
    ch.command(MsgType.HOLD, 0, reason=HoldReason.REASSERT)
    (out,) = ch.abandon(5 * MS, "link lost (EIO)")
    assert not out.ok and out.why == "link lost (EIO)" and ch.pending == {}


def test_latch_needs_an_ack_per_reason_or_a_wildcard() -> None:
    latch = HoldLatch()
    assert latch.ack("*").accepted is False
    assert latch.latch("g:1", "posterior_leak") and not latch.latch("g:1", "posterior_leak")
    assert latch.latch("b:5", "guidance_lost")
    res = latch.ack("g:9")
    assert not res.accepted and "g:9" in res.reason and latch.latched
    res = latch.ack("g:1")
    assert res.accepted and not res.released and latch.latched
    res = latch.ack("b:5")
    assert res.accepted and res.released and not latch.latched
    assert not latch.latch("g:1", "posterior_leak")  # acknowledged ids never re-latch
    latch.latch("g:2", "venous_leak")
    latch.latch("g:3", "venous_leak")
    assert latch.ack("*").released and latch.reasons == {}


def guidance_doc(**over) -> dict:
    doc = {"protocol": "cement-guidance/1", "type": "alert", "source": "guidance",
           "session": "s1", "seq": 4, "publish_mono_ns": time.monotonic_ns(),
           "publish_unix_ns": time.time_ns(), "frame": 12, "alert_id": "s1:4",
           "kind": "posterior_leak", "state": "raised", "priority": "high",
           "category": "physiological", "evidence": None, "message": "m"}
    doc.update(over)
    return doc


def test_parse_guidance_alert_and_heartbeat() -> None:
    msg = messages.parse_guidance([b"alert", json.dumps(guidance_doc()).encode()])
    assert isinstance(msg, GuidanceAlert) and msg.requests_hold and msg.frame == 12
    assert not messages.parse_guidance(
        [b"alert", json.dumps(guidance_doc(priority="medium")).encode()]).requests_hold
    assert not messages.parse_guidance(
        [b"alert", json.dumps(guidance_doc(kind="video_lost")).encode()]).requests_hold
    hb = guidance_doc(type="heartbeat", period_ms=500, state="running", active_alerts=[
        {"alert_id": "s1:4", "kind": "venous_leak", "priority": "high", "frame": 1,
         "raised_seq": 4}])
    msg = messages.parse_guidance([b"heartbeat", json.dumps(hb).encode()])
    assert isinstance(msg, GuidanceHeartbeat) and msg.active_alerts[0].requests_hold
    status = guidance_doc(type="status", frame=77)
    msg = messages.parse_guidance([b"status", json.dumps(status).encode()])
    assert isinstance(msg, GuidanceStatus) and msg.frame == 77


def test_parse_guidance_rejections_name_the_field() -> None:
    cases = {
        "protocol": guidance_doc(protocol="x"),
        "source": guidance_doc(source="firmware_bridge"),
        "seq": guidance_doc(seq=True),
        "publish_mono_ns": guidance_doc(publish_mono_ns=1.5),
        "state": guidance_doc(state="maybe"),
        "frame": guidance_doc(frame="12"),
        "period_ms": guidance_doc(type="heartbeat", period_ms=0),
    }
    for field, doc in cases.items():
        res = messages.parse_guidance([doc["type"].encode(), json.dumps(doc).encode()])
        assert isinstance(res, Rejected) and field in res.reason, (field, res)


json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                max_size=5), max_leaves=12)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.sampled_from([b"alert", b"heartbeat", b"status", b""]),
       st.one_of(st.binary(max_size=200), json_st.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(list(guidance_doc()) + ["period_ms",
                                                                         "active_alerts"]),
                                 json_st, max_size=12).map(
                     lambda d: json.dumps({**guidance_doc(), **d}).encode())),
       st.integers(1, 3))
def test_parse_guidance_never_raises(topic: bytes, payload: bytes, nframes: int) -> None:
    frames = [topic, payload, b"x"][:nframes] if nframes != 2 else [topic, payload]
    res = messages.parse_guidance(frames)
    assert isinstance(res, Rejected | GuidanceAlert | GuidanceHeartbeat | GuidanceStatus)
    res = messages.parse_ack(payload)
    assert isinstance(res, Rejected | messages.AckRequest)
