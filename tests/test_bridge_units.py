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


def test_epoch_is_constant_until_resync_and_moves_pending_commands() -> None:
    ch = CommandChannel(seq_start=10)
    first = sent_frame(ch.command(MsgType.HEARTBEAT, 0, hold_latched=False))
    second = sent_frame(ch.command(MsgType.HOLD, 0, reason=HoldReason.CLINICAL_ALERT))
    assert 1 <= first.epoch <= 255 and first.epoch == second.epoch
    assert (first.seq, second.seq) == (11, 12) and ch.last_state_seq == 12
    ch.resync()
    resent, _ = ch.poll(10**9)  # both still in flight: they go out in the new epoch
    assert {sent_frame(d).epoch for d in resent} == {ch.epoch} and ch.epoch != first.epoch
    assert sent_frame(ch.command(MsgType.RELEASE, 0)).epoch == ch.epoch
    for _ in range(300):  # wraps 255 -> 1, never 0 (device frames)
        ch.resync()
        assert 1 <= ch.epoch <= 255


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
    assert sorted(ch.on_nak(wire.NAK_PAYLOAD.pack(wire.NO_SEQ, wire.NakReason.BAD_CRC), MS)[0]) == sorted([a, b])


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
    doc = {
        "protocol": "cement-guidance/1",
        "type": "alert",
        "source": "guidance",
        "session": "s1",
        "seq": 4,
        "publish_mono_ns": time.monotonic_ns(),
        "publish_unix_ns": time.time_ns(),
        "frame": 12,
        "alert_id": "s1:4",
        "kind": "posterior_leak",
        "state": "raised",
        "priority": "high",
        "category": "physiological",
        "evidence": None,
        "message": "m",
    }
    doc.update(over)
    return doc


def test_parse_guidance_alert_and_heartbeat() -> None:
    msg = messages.parse_guidance([b"alert", json.dumps(guidance_doc()).encode()])
    assert isinstance(msg, GuidanceAlert) and msg.requests_hold and msg.frame == 12
    assert not messages.parse_guidance([b"alert", json.dumps(guidance_doc(priority="medium")).encode()]).requests_hold
    assert not messages.parse_guidance([b"alert", json.dumps(guidance_doc(kind="video_lost")).encode()]).requests_hold
    hb = guidance_doc(
        type="heartbeat",
        period_ms=500,
        state="running",
        active_alerts=[{"alert_id": "s1:4", "kind": "venous_leak", "priority": "high", "frame": 1, "raised_seq": 4}],
    )
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
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=12,
)


@settings(max_examples=120, derandomize=True, deadline=None)
@given(
    st.sampled_from([b"alert", b"heartbeat", b"status", b""]),
    st.one_of(
        st.binary(max_size=200),
        json_st.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.sampled_from(list(guidance_doc()) + ["period_ms", "active_alerts"]), json_st, max_size=12
        ).map(lambda d: json.dumps({**guidance_doc(), **d}).encode()),
    ),
    st.integers(1, 3),
)
def test_parse_guidance_never_raises(topic: bytes, payload: bytes, nframes: int) -> None:
    frames = [topic, payload, b"x"][:nframes] if nframes != 2 else [topic, payload]
    res = messages.parse_guidance(frames)
    assert isinstance(res, Rejected | GuidanceAlert | GuidanceHeartbeat | GuidanceStatus)
    res = messages.parse_ack(payload)
    assert isinstance(res, Rejected | messages.AckRequest)


# ---- the safety property of the command path, fuzzed end to end (pure parts, no I/O)
net_op = st.one_of(
    st.tuples(st.just("send"), st.sampled_from([MsgType.HOLD, MsgType.RELEASE, MsgType.HEARTBEAT])),
    st.tuples(st.just("deliver"), st.integers(0, 63)),  # any in-flight frame: reordering
    st.tuples(st.just("dup"), st.integers(0, 63)),
    st.tuples(st.just("drop"), st.integers(0, 63)),
    st.tuples(st.just("ack"), st.integers(0, 63)),  # an ACK reaches the host (any order)
    st.tuples(st.just("ack_loss"), st.integers(0, 63)),
    st.tuples(st.just("tick"), st.just(0)),  # ack time-out: retransmissions
    st.tuples(st.just("reconnect"), st.just(0)),  # link lost: everything in flight is gone
)


@settings(max_examples=250, derandomize=True, deadline=None)
@given(st.lists(net_op, max_size=80), st.integers(0, 0xFFFF))
def test_firmware_ends_in_the_hosts_last_intent(ops: list, seq_start: int) -> None:
    """A lossy, duplicating, reordering line between CommandChannel and the firmware's
    CommandGate: the firmware never applies an older HOLD/RELEASE after a newer one, never
    applies one twice, and once the line is good again it ends in the host's last intent."""
    ch = CommandChannel(ack_timeout_ns=40 * MS, max_attempts=10_000, seq_start=seq_start)
    gate = wire.CommandGate()
    fw_state: MsgType | None = None
    applied: dict[int, list[int]] = {}  # epoch -> state-command seqs in the order applied
    to_fw: list[bytes] = []
    to_host: list[bytes] = []
    intent: MsgType | None = None
    now = 0

    def host_sends(mtype: MsgType) -> None:
        nonlocal intent
        kw = (
            {"reason": HoldReason.CLINICAL_ALERT}
            if mtype is MsgType.HOLD
            else ({"hold_latched": intent is MsgType.HOLD} if mtype is MsgType.HEARTBEAT else {})
        )
        to_fw.append(ch.command(mtype, now, **kw))
        if mtype is not MsgType.HEARTBEAT:
            intent = mtype

    def firmware_reads(data: bytes) -> None:
        nonlocal fw_state
        (frame,) = FrameParser().feed(data)
        status = gate.admit(frame)
        if status is None:
            if frame.type is not MsgType.HEARTBEAT:
                seqs = applied.setdefault(frame.epoch, [])
                assert frame.seq not in seqs, "a command applied twice"
                assert not seqs or wire.seq_newer(frame.seq, seqs[-1]), "older after newer"
                seqs.append(frame.seq)
                fw_state = frame.type
            status = AckStatus.APPLIED
            gate.done(frame.seq, status)
        to_host.append(wire.encode_frame(wire.ack_frame(0, frame.seq, status)))

    def host_reads(data: bytes) -> None:
        (frame,) = FrameParser().feed(data)
        out = ch.on_ack(frame.payload, now)
        # the bridge's rule: our newest HOLD/RELEASE called stale -> new epoch, send again
        if (
            out
            and out.status is AckStatus.STALE
            and out.frame.type is not MsgType.HEARTBEAT
            and out.frame.seq == ch.last_state_seq
        ):
            ch.resync()
            host_sends(out.frame.type)

    for kind, arg in ops:
        if kind == "send":
            host_sends(arg)
        elif kind == "deliver" and to_fw:
            firmware_reads(to_fw.pop(arg % len(to_fw)))
        elif kind == "dup" and to_fw:
            to_fw.append(to_fw[arg % len(to_fw)])
        elif kind == "drop" and to_fw:
            to_fw.pop(arg % len(to_fw))
        elif kind == "ack" and to_host:
            host_reads(to_host.pop(arg % len(to_host)))
        elif kind == "ack_loss" and to_host:
            to_host.pop(arg % len(to_host))
        elif kind == "tick":
            now += 40 * MS
            to_fw += ch.poll(now)[0]
        elif kind == "reconnect":
            to_fw.clear()
            to_host.clear()
            lost = ch.abandon(now, "link lost")
            ch.resync()
            if intent is not None and any(o.frame.type is intent for o in lost):
                host_sends(intent)  # the bridge re-asserts its hold; an operator re-acks

    # the line is good again: deliver everything in order until nothing is in flight
    for _ in range(50):
        while to_fw:
            firmware_reads(to_fw.pop(0))
        while to_host:
            host_reads(to_host.pop(0))
        if not ch.pending:
            break
        now += 40 * MS
        to_fw += ch.poll(now)[0]
    assert not ch.pending
    if intent is not None:
        assert fw_state is intent
