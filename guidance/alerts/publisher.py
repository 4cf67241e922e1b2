"""The guidance event publisher: `status`, `alert` and `heartbeat` per docs/protocol.md.

One PUB socket, shared by the loop and the heartbeat thread under one lock (which also makes
`seq` one counter over all message types and keeps the alert log in seq order). Sends are
NOBLOCK with explicit SNDHWM and LINGER: a slow or absent console costs the loop nothing (PUB
drops what a subscriber's queue cannot hold, for that subscriber: a gap in its `seq`); a send
ZeroMQ refuses outright is dropped and counted. With no address, messages are still built,
logged and returned, but no socket is bound (offline replays, many in parallel).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import IO

PROTOCOL = "cement-guidance/1"
PRIORITIES = {
    "posterior_leak": "high",
    "venous_leak": "high",
    "video_lost": "medium",
    "model_error": "medium",
    "frame_error": "low",
    "latency_overrun": "low",
    "calibration_missing": "low",
    "posterior_not_assessed": "low",
}
CLINICAL = frozenset({"posterior_leak", "venous_leak"})
HEARTBEAT_STATES = ("starting", "running", "video_lost", "stopping")


class EventPublisher:
    def __init__(
        self,
        address: str | None = "tcp://127.0.0.1:5556",
        *,
        sndhwm: int = 1000,
        linger_ms: int = 500,
        heartbeat_ms: int = 500,
        alert_log: str | Path | None = None,
        source: str = "guidance",
    ) -> None:
        if not 0 < heartbeat_ms <= 1000:
            raise ValueError(f"heartbeat period {heartbeat_ms} ms: the protocol promises >= 1 Hz")
        self.address = address
        self.source = source
        self.session = secrets.token_hex(6)
        self.heartbeat_ms = heartbeat_ms
        self.sndhwm, self.linger_ms = sndhwm, linger_ms
        self.endpoint: str | None = None  # the bound endpoint (resolves tcp://127.0.0.1:*)
        self._lock = threading.RLock()  # re-entered by raise/clear/heartbeat -> _send
        self._seq = 0
        self._active: dict[str, dict] = {}  # kind -> {alert_id, kind, priority, frame, raised_seq}
        self.state = "starting"
        self.frames_processed = 0
        self.dropped_frames = 0
        self.dropped_messages = 0
        self.last_frame: int | None = None
        self.sent = 0
        self._log: IO[str] | None = None
        self._log_path = Path(alert_log) if alert_log else None
        self._ctx = None
        self._sock = None
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> EventPublisher:
        """Open the log (append: nothing already logged is lost) and bind the socket."""
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self._log_path.open("a", encoding="utf-8")
        if self.address:
            import zmq

            self._zmq = zmq
            self._ctx = zmq.Context()
            sock = self._ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.SNDHWM, self.sndhwm)
            sock.setsockopt(zmq.LINGER, self.linger_ms)
            try:
                sock.bind(self.address)
            except zmq.ZMQError as exc:
                sock.close(0)
                self._ctx.term()
                self._ctx = None
                from guidance.errors import BadInputError

                raise BadInputError(f"{self.address}: cannot bind the PUB socket ({exc})") from None
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._sock = sock
        return self

    def start_heartbeat(self) -> None:
        """Heartbeats from now on, also while no frame arrives (starting, video lost)."""
        self.heartbeat()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        period = self.heartbeat_ms / 1000.0
        while not self._hb_stop.wait(period):
            self.heartbeat()

    def close(self) -> None:
        """Last heartbeat says `stopping`; LINGER gives it time to leave."""
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2.0)
        if self._sock is not None or self._log is not None:
            self.state = "stopping"
            self.heartbeat()
        with self._lock:
            if self._sock is not None:
                self._sock.close()  # uses the socket's LINGER
                self._sock = None
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> EventPublisher:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending --------------------------------------------------------------------------
    def _send(
        self,
        msg_type: str,
        frame: int | None,
        body: dict,
        capture_mono_ns: int | None = None,
        raising_kind: str | None = None,
    ) -> dict:
        with self._lock:
            self._seq += 1
            now_mono, now_unix = time.monotonic_ns(), time.time_ns()
            msg = {
                "protocol": PROTOCOL,
                "type": msg_type,
                "source": self.source,
                "session": self.session,
                "seq": self._seq,
                "publish_mono_ns": now_mono,
                "publish_unix_ns": now_unix,
                "frame": frame,
            }
            msg.update(body)
            if capture_mono_ns is not None:  # measured at the stamp, not estimated
                msg["latency_ms"]["capture_to_publish"] = round((now_mono - capture_mono_ns) / 1e6, 3)
            if raising_kind is not None:
                msg["alert_id"] = f"{self.session}:{self._seq}"
                self._active[raising_kind] = {
                    "alert_id": msg["alert_id"],
                    "kind": raising_kind,
                    "priority": msg["priority"],
                    "frame": frame,
                    "raised_seq": self._seq,
                }
            payload = json.dumps(msg, separators=(",", ":"))
            if self._sock is not None:
                try:
                    self._sock.send_multipart([msg_type.encode(), payload.encode()], flags=self._zmq.NOBLOCK)
                except self._zmq.Again:
                    self.dropped_messages += 1
            if self._log is not None:
                self._log.write(payload + "\n")
                self._log.flush()
            self.sent += 1
            return msg

    def status(
        self,
        frame: int,
        capture_mono_ns: int,
        latency_ms: dict[str, float],
        flags: dict[str, bool],
        areas: dict[str, float],
        posterior_depth: float,
        units: str,
        dropped_frames: int,
        injector: dict | None = None,
        reference_frame: int | None = None,
    ) -> dict:
        with self._lock:
            self.frames_processed += 1
            self.last_frame = frame
            self.dropped_frames = dropped_frames
        body = {
            "capture_mono_ns": capture_mono_ns,
            "latency_ms": {
                "capture_to_publish": 0.0,
                **{k: round(v, 3) for k, v in latency_ms.items()},
            },
            "flags": dict(flags),
            "areas": {k: round(v, 3) for k, v in areas.items()},
            "posterior_depth": round(posterior_depth, 3),
            "units": units,
            "dropped_frames": dropped_frames,
            "injector": injector,
            "reference_frame": reference_frame,
        }
        return self._send("status", frame, body, capture_mono_ns=capture_mono_ns)

    def is_active(self, kind: str) -> bool:
        return kind in self._active

    def raise_alert(
        self,
        kind: str,
        frame: int | None,
        message: str,
        evidence: dict | None = None,
        priority: str | None = None,
    ) -> dict | None:
        """Raise `kind` unless it is already raised (then None: one raise per episode)."""
        with self._lock:
            if kind in self._active:
                return None
            body = {
                "kind": kind,
                "state": "raised",
                "priority": priority or PRIORITIES.get(kind, "low"),
                "category": "physiological" if kind in CLINICAL else "technical",
                "evidence": evidence if kind in CLINICAL else None,
                "message": message,
            }
            return self._send("alert", frame, body, raising_kind=kind)

    def clear_alert(self, kind: str, frame: int | None, message: str, evidence: dict | None = None) -> dict | None:
        """Clear `kind` if raised (the clear repeats the raise's alert_id)."""
        with self._lock:
            raised = self._active.pop(kind, None)
            if raised is None:
                return None
            body = {
                "alert_id": raised["alert_id"],
                "kind": kind,
                "state": "cleared",
                "priority": raised["priority"],
                "category": "physiological" if kind in CLINICAL else "technical",
                "evidence": evidence if kind in CLINICAL else None,
                "message": message,
            }
            return self._send("alert", frame, body)

    def active_alerts(self) -> list[dict]:
        with self._lock:
            return [dict(a) for a in self._active.values()]

    def heartbeat(self) -> dict:
        with self._lock:  # a consistent snapshot: the alert state as of this seq
            body = {
                "period_ms": self.heartbeat_ms,
                "state": self.state,
                "active_alerts": [dict(a) for a in self._active.values()],
                "frames_processed": self.frames_processed,
                "dropped_frames": self.dropped_frames,
                "dropped_messages": self.dropped_messages,
                "last_frame": self.last_frame,
            }
            return self._send("heartbeat", self.last_frame, body)
