"""Demo: guidance + bridge + simulated injector together, showing a hold and its release.

    python -m firmware_bridge.demo                 # guidance service on its bundled leak loop
    python -m firmware_bridge.demo --replay LOG    # or: replay a recorded guidance log (JSONL)
    python -m firmware_bridge.demo --record LOG    # record what the guidance PUB sends

Prints the guidance alert, the HOLD as the simulated firmware read it off the pty, the injector
state (held), the operator ack and the RELEASE. Everything runs on loopback; nothing is left
running afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from firmware_bridge.harness import BridgeTap, BridgeThread, GuidancePublisher, send_ack
from firmware_bridge.link import SerialInjectorLink
from firmware_bridge.simulator import FirmwareSimulator
from firmware_bridge.wire import HoldReason, MsgType

ROOT = Path(__file__).resolve().parents[1]
GUIDANCE_ENDPOINT = "tcp://127.0.0.1:5556"


def say(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:6.2f} s] {text}", flush=True)


class GuidanceWatch:
    """SUB on the guidance PUB: prints what guidance says, remembers the first leak raise."""

    def __init__(self, ctx: zmq.Context, endpoint: str, record: str | None = None) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        for topic in (b"alert", b"heartbeat"):
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.record = open(record, "w") if record else None  # noqa: SIM115
        self.heartbeat: dict[str, Any] | None = None
        self.alerts: list[dict[str, Any]] = []
        self._t0 = time.monotonic_ns()

    def pump(self, timeout_s: float) -> None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return
        while True:
            try:
                topic, payload = self.sock.recv_multipart(zmq.NOBLOCK)
            except (zmq.Again, ValueError):
                return
            try:
                doc = json.loads(payload)
            except json.JSONDecodeError:
                continue
            if self.record:
                self.record.write(json.dumps({"t_ms": (time.monotonic_ns() - self._t0) / 1e6,
                                              "topic": topic.decode(), "payload": doc}) + "\n")
            if topic == b"heartbeat":
                self.heartbeat = doc
            else:
                self.alerts.append(doc)

    def close(self) -> None:
        self.sock.close()
        if self.record:
            self.record.close()


class ReplayGuidance:
    """Re-publishes the alerts of a recorded guidance log with fresh stamps (own session,
    seq, publish times), and heartbeats every 200 ms, as the live service would."""

    def __init__(self, ctx: zmq.Context, events: list[dict[str, Any]]) -> None:
        self.pub = GuidancePublisher(ctx)
        self.endpoint = self.pub.endpoint
        self.events = [e for e in events if e.get("topic") == "alert"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="replay")

    def start(self) -> ReplayGuidance:
        self.pub.start_heartbeats(0.2)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        ids: dict[str, str] = {}
        first = self.events[0]["t_ms"] if self.events else 0.0
        for event in self.events:
            if self._stop.wait(max(0.0, t0 + (event["t_ms"] - first) / 1000 + 1.0
                                   - time.monotonic())):
                return
            doc = event["payload"]
            old_id = doc.get("alert_id", "")
            doc_id = ids.get(old_id)
            sent = self.pub.alert(doc["kind"], doc["state"], doc["priority"], alert_id=doc_id,
                                  frame=doc.get("frame"), message=doc.get("message"))
            ids.setdefault(old_id, sent["alert_id"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.pub.close()


# A scripted leak, in the wire format, used when no recording is given and the guidance
# service is not available: posterior leak raised at frame 42, cleared at frame 61.
SCRIPTED_LOG = [
    {"t_ms": 0.0, "topic": "alert", "payload": {
        "alert_id": "rec:1", "kind": "posterior_leak", "state": "raised", "priority": "high",
        "frame": 42, "message": "Cement 2.1 mm past the posterior wall (scripted)."}},
    {"t_ms": 1500.0, "topic": "alert", "payload": {
        "alert_id": "rec:1", "kind": "posterior_leak", "state": "cleared", "priority": "high",
        "frame": 61, "message": "Posterior leak no longer seen (scripted)."}},
]


def service_available() -> bool:
    return (ROOT / "guidance" / "app.py").exists()


def run_demo(replay: str | None = None, record: str | None = None,
             use_service: bool = True, service_timeout_s: float = 90.0) -> int:
    t0 = time.monotonic()
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="bridge-demo-")
    sim = FirmwareSimulator(link_dir=tmp).start()
    say(t0, f"simulated injector on {sim.port} -> {sim.pty_name} (injecting at "
            f"{sim.model.demand_ml_per_min} mL/min)")
    service: subprocess.Popen | None = None
    source: ReplayGuidance | None = None
    watch = tap = bt = None
    try:
        if replay is None and use_service and service_available():
            service = subprocess.Popen([sys.executable, "-m", "guidance", "run"], cwd=ROOT,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
            endpoint = GUIDANCE_ENDPOINT
            say(t0, f"guidance service started: `guidance run` (pid {service.pid}), PUB "
                    f"{endpoint}")
        else:
            if replay:
                events = [json.loads(line) for line in Path(replay).read_text().splitlines()
                          if line.strip()]
                what = f"recorded guidance log {replay} ({len(events)} messages)"
            else:
                events, what = SCRIPTED_LOG, "scripted leak alert (guidance service not found)"
            source = ReplayGuidance(ctx, events)
            endpoint = source.endpoint
            say(t0, f"guidance: replaying {what} on {endpoint}")
        watch = GuidanceWatch(ctx, endpoint, record)
        bt = BridgeThread(SerialInjectorLink(sim.port), endpoint, ctx,
                          guidance_timeout_s=2.0 if service else 1.0)
        tap = BridgeTap(ctx, bt.bridge.pub_address)
        bt.start()
        say(t0, f"bridge up: SUB {endpoint}, ack REP {bt.bridge.ack_address}, PUB "
                f"{bt.bridge.pub_address}")
        if source:
            source.start()
        # wait for the first high-priority leak alert from guidance
        deadline = time.monotonic() + (service_timeout_s if service else 10.0)
        alert = None
        while alert is None and time.monotonic() < deadline:
            watch.pump(0.05)
            tap.pump(0)
            alert = next((a for a in watch.alerts if a.get("kind") in
                          ("posterior_leak", "venous_leak") and a.get("state") == "raised"
                          and a.get("priority") == "high"), None)
            if service and service.poll() is not None and alert is None:
                err = service.stderr.read() if service.stderr else ""
                say(t0, f"guidance service exited ({service.returncode}) before a leak alert: "
                        f"{err.strip()[-300:]}")
                return 1
        if alert is None:
            say(t0, "no high-priority leak alert from guidance before the deadline")
            return 1
        say(t0, f"GUIDANCE ALERT: {alert['kind']} {alert['state']} priority {alert['priority']}"
                f" frame {alert.get('frame')} id {alert['alert_id']}: {alert.get('message', '')}")
        if not sim.wait_for(lambda r: any(x.frame.type == MsgType.HOLD and x.frame.payload[0]
                                          == HoldReason.CLINICAL_ALERT for x in r), 5.0):
            say(t0, "no HOLD reached the injector")
            return 1
        hold = next(x for x in sim.commands(MsgType.HOLD)
                    if x.frame.payload[0] == HoldReason.CLINICAL_ALERT)
        say(t0, f"HOLD on the wire: seq {hold.frame.seq}, read by the firmware "
                f"{(hold.rx_mono_ns - alert['publish_mono_ns']) / 1e6:.2f} ms after the alert "
                f"was published; firmware ACK {hold.status.name}")
        held = tap.wait_for(lambda t, d: t == "telemetry" and d["injector_state"] == "held", 3)
        if not held:
            say(t0, "injector never reported held")
            return 1
        say(t0, f"INJECTOR: state {held['injector_state']}, delivered "
                f"{held['delivered_volume_ml']:.3f} mL, pressure {held['pressure_kpa']:.0f} kPa,"
                f" flow {held['flow_ml_per_min']:.1f} mL/min, hold_latched "
                f"{held['hold_latched']}")
        # the hold stays while we wait, whatever guidance does (clears, keeps raising)
        hold_until = time.monotonic() + 2.0
        while time.monotonic() < hold_until:
            watch.pump(0.05)
            tap.pump(0)
        cleared = [a for a in watch.alerts if a.get("alert_id") == alert["alert_id"]
                   and a.get("state") == "cleared"]
        last = tap.of("telemetry")[-1]
        say(t0, f"2 s later: guidance {'cleared the alert' if cleared else 'still alerting'};"
                f" injector still {last['injector_state']}, delivered "
                f"{last['delivered_volume_ml']:.3f} mL (no release without an ack)")
        mark = len(tap.messages)
        reply = send_ack(ctx, bt.bridge.ack_address, "*", operator="demo-operator")
        say(t0, f"OPERATOR ACK (demo-operator, all holds): accepted {reply['accepted']}, "
                f"{reply['reason']}")
        if not reply["accepted"]:
            return 1
        if not sim.wait_for(lambda r: any(x.frame.type == MsgType.RELEASE for x in r), 3.0):
            say(t0, "no RELEASE reached the injector")
            return 1
        release = sim.commands(MsgType.RELEASE)[0]
        say(t0, f"RELEASE on the wire: seq {release.frame.seq}, firmware ACK "
                f"{release.status.name}")
        moving = tap.wait_for(lambda t, d: t == "telemetry" and d["injector_state"]
                              in ("injecting", "idle"), 3, since=mark)
        if moving:
            say(t0, f"INJECTOR: state {moving['injector_state']}, delivered "
                    f"{moving['delivered_volume_ml']:.3f} mL, hold_latched "
                    f"{moving['hold_latched']}")
        alerts = [(d["kind"], d["state"]) for t, d in tap.messages if t == "alert"]
        say(t0, f"bridge alerts published: {alerts}")
        return 0
    finally:
        if bt:
            with contextlib.suppress(Exception):
                bt.stop()
        for part in (tap, watch, source):
            if part:
                part.close()
        if service and service.poll() is None:
            service.send_signal(signal.SIGINT)
            try:
                service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
        sim.stop()
        ctx.term()
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m firmware_bridge.demo", description=__doc__)
    ap.add_argument("--replay", help="replay this recorded guidance log (JSONL) instead of "
                                     "running the guidance service")
    ap.add_argument("--record", help="also record the guidance messages to this JSONL file")
    ap.add_argument("--scripted", action="store_true",
                    help="use the built-in scripted leak alert even if the service exists")
    args = ap.parse_args(argv)
    if args.replay and not Path(args.replay).is_file():
        print(f"demo: error: --replay {args.replay!r}: no such file", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="           %(name)s: %(message)s")
    try:
        return run_demo(args.replay, args.record, use_service=not args.scripted)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
