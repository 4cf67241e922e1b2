"""Real-socket helpers around the bridge, for tests, the latency bench and the demo.

- `GuidancePublisher`: a guidance-shaped PUB (heartbeats, alerts) on a real ZeroMQ socket,
  used where the real guidance service is not running (tests, bench, recorded-log replay).
- `BridgeTap`: a SUB on the bridge's PUB that keeps everything it heard.
- `send_ack`: the console side of the ack channel (REQ with a deadline).
- `BridgeThread`: a Bridge serving on its own thread.

No sleeps: every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from firmware_bridge.bridge import Bridge, BridgeConfig
from firmware_bridge.link import InjectorLink
from firmware_bridge.messages import PROTOCOL, dumps, stamped

LOCAL_ANY = "tcp://127.0.0.1:*"


class GuidancePublisher:
    """Publishes guidance-protocol messages; heartbeats from a thread when asked."""

    def __init__(
        self,
        context: zmq.Context,
        endpoint: str = LOCAL_ANY,
        session: str | None = None,
        source: str = "guidance",
        sock: zmq.Socket | None = None,
    ) -> None:
        if sock is None:  # else: a PUB already bound by the caller
            sock = context.socket(zmq.PUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.bind(endpoint)
        self.sock = sock
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.session = session or secrets.token_hex(6)
        self.source = source
        self.seq = 0
        self.frame = 0
        self.active: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # heartbeat thread and caller share the socket
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self.heartbeat_period_ms = 100
        self._last_hb_ns = 0
        self.max_heartbeat_gap_ns = 0  # how late our own heartbeats ran (a loaded machine)

    def envelope(self, mtype: str, **body: Any) -> dict[str, Any]:
        self.seq += 1
        now_mono, now_unix = time.monotonic_ns(), time.time_ns()
        return stamped(mtype, body, self.source, self.session, self.seq, now_mono, now_unix, self.frame)

    def send_raw(self, frames: list[bytes]) -> None:
        with self._lock:
            self.sock.send_multipart(frames)

    def heartbeat(self, state: str = "running") -> dict[str, Any]:
        with self._lock:
            doc = self.envelope(
                "heartbeat",
                period_ms=self.heartbeat_period_ms,
                state=state,
                active_alerts=list(self.active.values()),
                frames_processed=self.frame,
                dropped_frames=0,
                dropped_messages=0,
                last_frame=self.frame,
            )
            self.sock.send_multipart([b"heartbeat", dumps(doc)])
        if self._last_hb_ns:
            self.max_heartbeat_gap_ns = max(self.max_heartbeat_gap_ns, doc["publish_mono_ns"] - self._last_hb_ns)
        self._last_hb_ns = doc["publish_mono_ns"]
        return doc

    def status(self) -> dict[str, Any]:
        """A per-frame status (the fields the bridge does not use are left out)."""
        with self._lock:
            self.frame += 1
            doc = self.envelope("status", flags={"posterior": False, "venous": False})
            self.sock.send_multipart([b"status", dumps(doc)])
        return doc

    def alert(
        self,
        kind: str = "posterior_leak",
        state: str = "raised",
        priority: str = "high",
        alert_id: str | None = None,
        frame: int | None = None,
        message: str | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            self.frame = self.frame + 1 if frame is None else frame
            seq = self.seq + 1  # the raise's own seq names the alert (envelope takes it)
            alert_id = alert_id or f"{self.session}:{seq}"
            category = "physiological" if kind.endswith("_leak") else "technical"
            doc = self.envelope(
                "alert",
                alert_id=alert_id,
                kind=kind,
                state=state,
                priority=priority,
                category=category,
                evidence=None,
                message=message or f"{kind} {state} (test)",
            )
            if state == "raised":
                self.active[alert_id] = {
                    "alert_id": alert_id,
                    "kind": kind,
                    "priority": priority,
                    "frame": self.frame,
                    "raised_seq": seq,
                }
            else:
                self.active.pop(alert_id, None)
            self.sock.send_multipart([b"alert", dumps(doc)])
        return doc

    def start_heartbeats(self, period_s: float = 0.1) -> GuidancePublisher:
        self.heartbeat_period_ms = int(period_s * 1000)
        self._hb_stop.clear()

        def loop() -> None:
            while not self._hb_stop.wait(period_s):
                self.heartbeat()

        self.heartbeat()
        self._hb_thread = threading.Thread(target=loop, name="fake-guidance-hb", daemon=True)
        self._hb_thread.start()
        return self

    def start_status(self, hz: float = 15.0) -> GuidancePublisher:
        """Per-frame status at the loop's frame rate, as the service sends it."""

        def loop() -> None:
            while not self._hb_stop.wait(1.0 / hz):
                self.status()

        self._status_thread = threading.Thread(target=loop, name="fake-guidance-status", daemon=True)
        self._status_thread.start()
        return self

    def stop_heartbeats(self) -> None:
        self._hb_stop.set()
        for name in ("_hb_thread", "_status_thread"):
            thread = getattr(self, name, None)
            if thread:
                thread.join(timeout=2.0)
                setattr(self, name, None)

    def close(self) -> None:
        self.stop_heartbeats()
        self.sock.close()


class BridgeTap:
    """Everything the bridge publishes, in order, with the topic."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.sock = context.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.on_message: Callable[[str, dict[str, Any]], None] | None = None

    def pump(self, timeout_s: float) -> None:
        """Receive for up to timeout_s (returns early when nothing more is pending)."""
        if self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    topic, payload = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                doc = json.loads(payload)
                self.messages.append((topic.decode(), doc))
                if self.on_message:
                    self.on_message(topic.decode(), doc)

    def wait_for(
        self, predicate: Callable[[str, dict[str, Any]], bool], timeout_s: float = 3.0, since: int = 0
    ) -> dict[str, Any] | None:
        """First message from index `since` on (heard or arriving by the deadline) that matches."""
        seen = since
        deadline = time.monotonic() + timeout_s
        while True:
            for topic, doc in self.messages[seen:]:
                if predicate(topic, doc):
                    return doc
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.pump(min(left, 0.05))

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [d for t, d in self.messages if t == topic]

    def close(self) -> None:
        self.sock.close()


def send_ack(
    context: zmq.Context,
    endpoint: str,
    alert_id: str = "*",
    operator: str = "dr-test",
    payload: bytes | None = None,
    timeout_s: float = 3.0,
) -> dict[str, Any]:
    """One console ack: REQ -> bridge REP, with a deadline (raises TimeoutError)."""
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        if payload is None:
            payload = dumps(
                {
                    "protocol": PROTOCOL,
                    "type": "ack",
                    "source": "console",
                    "session": "console-test",
                    "seq": 1,
                    "publish_mono_ns": time.monotonic_ns(),
                    "publish_unix_ns": time.time_ns(),
                    "frame": None,
                    "operator": operator,
                    "alert_id": alert_id,
                }
            )
        sock.send(payload)
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no ack_reply from {endpoint} within {timeout_s} s")
        return json.loads(sock.recv())
    finally:
        sock.close()


class BridgeThread:
    """A Bridge on its own thread; sockets bound to free loopback ports unless told."""

    def __init__(
        self, link: InjectorLink, guidance_endpoint: str, context: zmq.Context | None = None, **config: Any
    ) -> None:
        config.setdefault("pub_endpoint", LOCAL_ANY)
        config.setdefault("ack_endpoint", LOCAL_ANY)
        self.bridge = Bridge(BridgeConfig(guidance_endpoint=guidance_endpoint, **config), link, context)
        self.bridge.open()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)

    def _run(self) -> None:
        try:
            self.bridge.run()
        except BaseException as err:  # surfaced by stop(): a crash must fail the test
            self.error = err
            raise

    def start(self) -> BridgeThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.bridge.stop_event.set()
        self._thread.join(timeout=5.0)
        self.bridge.close()
        if self.error is not None:
            raise RuntimeError(f"bridge thread crashed: {self.error!r}") from self.error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
