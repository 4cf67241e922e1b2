"""The injector as the bridge reports it: a SUB on firmware_bridge's telemetry PUB, so every
`status` can carry the latest telemetry (`injector`, docs/protocol.md). Only the documented
wire protocol is used; nothing of firmware_bridge is imported."""

from __future__ import annotations

import json
import threading
import time


class InjectorListener:
    """A background SUB that keeps the newest `telemetry` payload. `latest()` gives it while it
    is fresh (heard within `stale_s`), else None: stale telemetry is worse than none."""

    def __init__(self, address: str, stale_s: float = 2.0) -> None:
        self.address = address
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._latest: dict | None = None
        self._heard_ns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.received = 0

    def start(self) -> InjectorListener:
        import zmq

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 100)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"telemetry")
        self._sock.connect(self.address)  # connecting never fails: the bridge may come later
        self._thread = threading.Thread(target=self._run, name="injector-telemetry", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import zmq

        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK)
                msg = json.loads(parts[-1])
            except (zmq.Again, ValueError, UnicodeDecodeError):
                continue
            if not isinstance(msg, dict) or msg.get("type") != "telemetry":
                continue
            with self._lock:
                self._latest = msg
                self._heard_ns = time.monotonic_ns()
                self.received += 1

    def latest(self) -> dict | None:
        with self._lock:
            if self._latest is None:
                return None
            if (time.monotonic_ns() - self._heard_ns) / 1e9 > self.stale_s:
                return None
            return dict(self._latest)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._sock.close()
            self._ctx.term()
            self._thread = None
