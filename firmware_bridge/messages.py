"""ZeroMQ JSON messages (docs/protocol.md): the bridge's envelope, and checks of what comes in.

Pure: no sockets, no clocks (times are passed in). Everything that arrives is checked here and
turned into either a typed message or a `Rejected` with a reason the bridge logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PROTOCOL = "cement-guidance/1"
SOURCE = "firmware_bridge"
GUIDANCE_SOURCE = "guidance"
CONSOLE_SOURCE = "console"
CLINICAL_HOLD_KINDS = frozenset({"posterior_leak", "venous_leak"})
PRIORITIES = frozenset({"high", "medium", "low"})
MAX_PAYLOAD_BYTES = 64 * 1024

# bridge technical alerts and their IEC 60601-1-8 priorities (docs/protocol.md)
BRIDGE_ALERT_PRIORITY = {
    "guidance_lost": "high",
    "injector_silent": "medium",
    "injector_fault": "high",
    "command_failed": "high",
    "hold_latched": "medium",
}


@dataclass(frozen=True)
class Rejected:
    reason: str


@dataclass(frozen=True)
class GuidanceAlert:
    session: str
    seq: int
    publish_mono_ns: int
    alert_id: str
    kind: str
    state: str
    priority: str
    frame: int | None
    message: str

    @property
    def requests_hold(self) -> bool:
        return self.kind in CLINICAL_HOLD_KINDS and self.state == "raised" and self.priority == "high"


@dataclass(frozen=True)
class ActiveAlert:
    alert_id: str
    kind: str
    priority: str

    @property
    def requests_hold(self) -> bool:
        return self.kind in CLINICAL_HOLD_KINDS and self.priority == "high"


@dataclass(frozen=True)
class GuidanceHeartbeat:
    session: str
    seq: int
    publish_mono_ns: int
    period_ms: int
    state: str
    active_alerts: tuple[ActiveAlert, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class GuidanceStatus:
    """Per-frame status: only its envelope matters here (seq continuity, last frame)."""

    session: str
    seq: int
    publish_mono_ns: int
    frame: int | None


GuidanceMessage = GuidanceAlert | GuidanceHeartbeat | GuidanceStatus


@dataclass(frozen=True)
class AckRequest:
    operator: str
    alert_id: str
    session: str
    seq: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load(payload: bytes) -> dict[str, Any] | Rejected:
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Rejected(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return Rejected("payload is not UTF-8")
    except (json.JSONDecodeError, RecursionError) as err:
        return Rejected(f"payload is not JSON ({err})")
    if not isinstance(doc, dict):
        return Rejected("payload is not a JSON object")
    return doc


def _envelope(doc: dict[str, Any], source: str, types: tuple[str, ...]) -> Rejected | None:
    if doc.get("protocol") != PROTOCOL:
        return Rejected(f"protocol {doc.get('protocol')!r} is not {PROTOCOL!r}")
    if doc.get("source") != source:
        return Rejected(f"source {doc.get('source')!r} is not {source!r}")
    if doc.get("type") not in types:
        return Rejected(f"type {doc.get('type')!r} not one of {types}")
    if not isinstance(doc.get("session"), str) or not doc["session"]:
        return Rejected("session missing or not a string")
    if not _is_int(doc.get("seq")) or doc["seq"] < 0:
        return Rejected("seq missing or not a non-negative integer")
    if not _is_int(doc.get("publish_mono_ns")):
        return Rejected("publish_mono_ns missing or not an integer")
    return None


GUIDANCE_TOPICS = (b"alert", b"heartbeat", b"status")


def parse_guidance(frames: list[bytes]) -> GuidanceMessage | Rejected:
    """A [topic, payload] multipart from the guidance PUB -> typed message or the reason not."""
    if len(frames) != 2:
        return Rejected(f"expected 2 frames [topic, payload], got {len(frames)}")
    topic, payload = frames
    if topic not in GUIDANCE_TOPICS:
        return Rejected(f"unexpected topic {topic[:32]!r}")
    doc = _load(payload)
    if isinstance(doc, Rejected):
        return doc
    bad = _envelope(doc, GUIDANCE_SOURCE, ("alert", "heartbeat", "status"))
    if bad:
        return bad
    if doc["type"].encode() != topic:
        return Rejected(f"topic {topic.decode()!r} does not match type {doc['type']!r}")
    common = (doc["session"], doc["seq"], doc["publish_mono_ns"])
    if doc["type"] == "status":
        frame = doc.get("frame")
        if frame is not None and not _is_int(frame):
            return Rejected("status frame is not an integer or null")
        return GuidanceStatus(*common, frame)
    if doc["type"] == "alert":
        for key in ("alert_id", "kind", "state", "priority"):
            if not isinstance(doc.get(key), str):
                return Rejected(f"alert field {key!r} missing or not a string")
        if doc["state"] not in ("raised", "cleared"):
            return Rejected(f"alert state {doc['state']!r} is not raised/cleared")
        if doc["priority"] not in PRIORITIES:
            return Rejected(f"alert priority {doc['priority']!r} is not high/medium/low")
        frame = doc.get("frame")
        if frame is not None and not _is_int(frame):
            return Rejected("alert frame is not an integer or null")
        message = doc.get("message") if isinstance(doc.get("message"), str) else ""
        return GuidanceAlert(*common, doc["alert_id"], doc["kind"], doc["state"], doc["priority"], frame, message)
    period = doc.get("period_ms")
    if not _is_int(period) or period <= 0:
        return Rejected("heartbeat period_ms missing or not a positive integer")
    active = doc.get("active_alerts", [])
    if not isinstance(active, list):
        return Rejected("heartbeat active_alerts is not a list")
    alerts = []
    for item in active:
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("alert_id", "kind", "priority"))):
            return Rejected("heartbeat active_alerts entry lacks alert_id/kind/priority")
        alerts.append(ActiveAlert(item["alert_id"], item["kind"], item["priority"]))
    state = doc.get("state") if isinstance(doc.get("state"), str) else ""
    return GuidanceHeartbeat(*common, period, state, tuple(alerts))


def parse_ack(payload: bytes) -> AckRequest | Rejected:
    doc = _load(payload)
    if isinstance(doc, Rejected):
        return doc
    bad = _envelope(doc, CONSOLE_SOURCE, ("ack",))
    if bad:
        return bad
    operator, alert_id = doc.get("operator"), doc.get("alert_id")
    if not isinstance(operator, str) or not operator.strip():
        return Rejected("operator missing or empty: an ack must name who acknowledged")
    if not isinstance(alert_id, str) or not alert_id:
        return Rejected("alert_id missing: name the hold being acknowledged or '*'")
    return AckRequest(operator.strip(), alert_id, doc["session"], doc["seq"])


class Envelope:
    """Stamps the bridge's outgoing messages: own session, one seq over all types."""

    def __init__(self, session: str, source: str = SOURCE) -> None:
        self.session = session
        self.source = source
        self.seq = 0

    def make(
        self, mtype: str, body: dict[str, Any], mono_ns: int, unix_ns: int, frame: int | None = None
    ) -> dict[str, Any]:
        self.seq += 1
        return stamped(mtype, body, self.source, self.session, self.seq, mono_ns, unix_ns, frame)


def stamped(
    mtype: str,
    body: dict[str, Any],
    source: str,
    session: str,
    seq: int,
    mono_ns: int,
    unix_ns: int,
    frame: int | None,
) -> dict[str, Any]:
    """A message with the protocol's envelope (docs/protocol.md) around `body`."""
    return {
        "protocol": PROTOCOL,
        "type": mtype,
        "source": source,
        "session": session,
        "seq": seq,
        "publish_mono_ns": mono_ns,
        "publish_unix_ns": unix_ns,
        "frame": frame,
        **body,
    }


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
