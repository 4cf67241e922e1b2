"""The publisher on real ZeroMQ sockets over loopback; every message validated against the
JSON Schemas in guidance/alerts/schemas/."""

from __future__ import annotations

import json
import threading
import time

import pytest
import zmq
from conftest import validate_message

from guidance.alerts import EventPublisher


def subscriber(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def receive(sub: zmq.Socket, timeout_s: float = 5.0) -> dict:
    if not sub.poll(int(timeout_s * 1000)):
        raise AssertionError("nothing received before the deadline")
    topic, payload = sub.recv_multipart()
    msg = json.loads(payload)
    assert topic.decode() == msg["type"]
    validate_message(msg)
    return msg


def until(sub: zmq.Socket, pred, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = receive(sub, deadline - time.monotonic())
        if pred(msg):
            return msg
    raise AssertionError("expected message not received")


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def test_status_alerts_heartbeats_on_a_real_socket(tmp_path, zctx):
    log = tmp_path / "alerts.jsonl"
    pub = EventPublisher("tcp://127.0.0.1:*", heartbeat_ms=100, alert_log=log).open()
    assert pub.endpoint.startswith("tcp://127.0.0.1:")
    sub = subscriber(zctx, pub.endpoint)
    try:
        pub.start_heartbeat()
        hb = until(sub, lambda m: m["type"] == "heartbeat")  # joined: no sleep needed
        assert hb["state"] == "starting" and hb["active_alerts"] == []
        pub.state = "running"
        captured = time.monotonic_ns() - 5_000_000  # a frame grabbed 5 ms before publishing
        status = pub.status(
            7,
            captured,
            {"capture": 0.1, "calibrate": 0.2, "segment": 3.0, "track": 0.5, "publish": 0.1},
            {"posterior": False, "venous": False},
            {"cement": 10.0, "posterior": 0.0, "venous": 0.0},
            0.0,
            "mm",
            0,
        )
        after = time.monotonic_ns()
        # measured from the frame's stamp to the publish stamp, not estimated nor left at 0
        assert captured + 5_000_000 <= status["publish_mono_ns"] <= after
        assert status["latency_ms"]["capture_to_publish"] == round((status["publish_mono_ns"] - captured) / 1e6, 3)
        assert status["latency_ms"]["capture_to_publish"] >= 5.0
        raised = pub.raise_alert(
            "posterior_leak",
            8,
            "Posterior leak.",
            {
                "area": 2.0,
                "depth": 1.5,
                "centroid": [10, 20],
                "box": [5, 15, 12, 25],
                "units": "mm",
            },
        )
        assert raised["alert_id"] == f"{pub.session}:{raised['seq']}"
        assert pub.raise_alert("posterior_leak", 9, "again") is None  # one raise per episode
        got = until(sub, lambda m: m["type"] == "alert")
        assert got == raised and got["priority"] == "high" and got["category"] == "physiological"
        hb = until(sub, lambda m: m["type"] == "heartbeat")
        assert [a["alert_id"] for a in hb["active_alerts"]] == [raised["alert_id"]]
        assert hb["active_alerts"][0]["raised_seq"] == raised["seq"]
        assert hb["last_frame"] == 7 and hb["frames_processed"] == 1
        cleared = pub.clear_alert("posterior_leak", 20, "Gone.")
        assert cleared["alert_id"] == raised["alert_id"] and cleared["state"] == "cleared"
        assert pub.clear_alert("posterior_leak", 21, "Gone.") is None
        tech = pub.raise_alert("video_lost", None, "No video.")
        assert tech["priority"] == "medium" and tech["evidence"] is None
        hb = until(sub, lambda m: m["type"] == "heartbeat" and m["seq"] > tech["seq"])
        assert [a["kind"] for a in hb["active_alerts"]] == ["video_lost"]
    finally:
        sub.close()
        pub.close()
    # the log has every message sent, in seq order, each a valid protocol message
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [m["seq"] for m in lines] == list(range(1, len(lines) + 1))
    assert len(lines) == pub.sent
    for m in lines:
        validate_message(m)
    assert lines[-1]["type"] == "heartbeat" and lines[-1]["state"] == "stopping"
    kinds = [(m["kind"], m["state"]) for m in lines if m["type"] == "alert"]
    assert kinds == [
        ("posterior_leak", "raised"),
        ("posterior_leak", "cleared"),
        ("video_lost", "raised"),
    ]


def test_late_subscriber_learns_the_whole_state_from_one_heartbeat(zctx):
    pub = EventPublisher("tcp://127.0.0.1:*", heartbeat_ms=100).open()
    sub = None
    try:
        pub.start_heartbeat()
        first = pub.raise_alert("venous_leak", 3, "Venous leak.", None)
        pub.raise_alert("calibration_missing", None, "No calibration.")
        sub = subscriber(zctx, pub.endpoint)  # connects after the alerts went out
        hb = until(sub, lambda m: m["type"] == "heartbeat")
        assert {a["kind"] for a in hb["active_alerts"]} == {"venous_leak", "calibration_missing"}
        assert first["alert_id"] in {a["alert_id"] for a in hb["active_alerts"]}
        # heartbeats keep coming with nothing else happening, at the promised period: two
        # consecutive ones are period_ms apart (the sender waits a period after each; the
        # upper bound is loose for a loaded 2-core CI machine)
        a = until(sub, lambda m: m["type"] == "heartbeat")
        b = until(sub, lambda m: m["type"] == "heartbeat")
        assert b["seq"] == a["seq"] + 1 and a["period_ms"] == b["period_ms"] == 100
        gap_ms = (b["publish_mono_ns"] - a["publish_mono_ns"]) / 1e6
        assert 0.9 * 100 <= gap_ms <= 5 * 100, gap_ms
    finally:
        # closed on failure too: an open socket would hang the fixture's ctx.term()
        if sub is not None:
            sub.close()
        pub.close()


def _send_statuses(pub: EventPublisher, count: int) -> None:
    for i in range(count):
        pub.status(
            i,
            time.monotonic_ns(),
            {},
            {"posterior": False, "venous": False},
            {"cement": 0, "posterior": 0, "venous": 0},
            0.0,
            "px",
            0,
        )


def _sends_without_waiting(pub: EventPublisher, count: int, deadline_s: float = 20.0) -> None:
    """`count` status messages from a thread that must finish: a send that waited on a
    subscriber would hold it past the deadline."""
    sender = threading.Thread(target=_send_statuses, args=(pub, count), daemon=True)
    sender.start()
    sender.join(deadline_s)
    assert not sender.is_alive(), "the publisher waited on a subscriber"


def test_a_subscriber_that_never_reads_costs_the_sender_nothing(zctx):
    """20,000 messages to a connected subscriber that reads nothing while they go out: the
    sender never waits; the subscriber later finds what its queues could not hold missing,
    as gaps in `seq` (how a console tells loss)."""
    pub = EventPublisher("tcp://127.0.0.1:*", sndhwm=10, heartbeat_ms=50).open()
    sub = subscriber(zctx, pub.endpoint)
    sub.setsockopt(zmq.RCVHWM, 10)
    try:
        pub.start_heartbeat()
        until(sub, lambda m: m["type"] == "heartbeat")  # connected (no sleep for the slow joiner)
        first = pub.sent
        _sends_without_waiting(pub, 20000)
        assert pub.sent - first >= 20000
        last = pub.sent  # seq of the last status (seq counts every message sent, from 1)
        seqs: list[int] = []
        deadline = time.monotonic() + 10
        # read until a message sent after the statuses (a heartbeat) arrives
        while (not seqs or seqs[-1] < last) and time.monotonic() < deadline and sub.poll(1000):
            seqs.append(json.loads(sub.recv_multipart()[1])["seq"])
        assert seqs and seqs[-1] >= last
        assert len([q for q in seqs if first < q <= last]) < last - first
        assert any(b - a > 1 for a, b in zip(seqs, seqs[1:], strict=False))
    finally:
        sub.close()
        pub.close()


def test_no_subscriber_never_blocks_and_no_address_binds_nothing(tmp_path):
    pub = EventPublisher("tcp://127.0.0.1:*", sndhwm=10).open()
    try:
        _sends_without_waiting(pub, 5000)  # nobody listening: PUB drops, the sender never waits
        assert pub.sent == 5000
    finally:
        pub.close()
    offline = EventPublisher(None, alert_log=tmp_path / "log.jsonl").open()
    msg = offline.raise_alert("frame_error", 4, "Bad frame.")
    offline.close()
    assert offline.endpoint is None and msg["priority"] == "low"
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0]) == msg


def test_alert_log_appends_never_truncates(tmp_path):
    log = tmp_path / "a.jsonl"
    log.write_text('{"already": "there"}\n')
    pub = EventPublisher(None, alert_log=log).open()
    pub.raise_alert("latency_overrun", 1, "Slow.")
    # flushed as sent: readable before close
    assert len(log.read_text().splitlines()) == 2
    pub.close()
    assert log.read_text().startswith('{"already": "there"}\n')


def test_heartbeat_period_must_promise_at_least_1_hz():
    with pytest.raises(ValueError):
        EventPublisher(None, heartbeat_ms=1500)


def test_schemas_reject_what_the_protocol_forbids():
    import jsonschema

    pub = EventPublisher(None).open()
    msg = pub.raise_alert(
        "posterior_leak",
        1,
        "x",
        {"area": 1, "depth": 0, "centroid": [1, 2], "box": [0, 0, 1, 1], "units": "mm"},
    )
    pub.close()
    validate_message(msg)
    for bad in (
        {**msg, "priority": "urgent"},
        {**msg, "category": "technical"},
        {**msg, "seq": 0},
        {k: v for k, v in msg.items() if k != "alert_id"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_message(bad)
