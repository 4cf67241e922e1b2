"""Demo: guidance + bridge + simulated injector together, showing a hold and its release.

    python -m firmware_bridge.demo                      # `guidance run` on its bundled leak loop
    python -m firmware_bridge.demo --guidance-args "--model M.onnx --sha256sums SUMS"
    python -m firmware_bridge.demo --recorded           # replay the bundled recorded alert log
    python -m firmware_bridge.demo --replay LOG.jsonl   # replay a `guidance run --alert-log` file
    guidance bridge --demo                              # same as the first line

Prints the guidance alert, the HOLD as the simulated firmware read it off the pty, the injector
state (held, and still held after guidance clears), the operator ack and the RELEASE. If the
guidance service cannot run (e.g. no shipped model yet) it says why and replays the recorded
log instead. Everything is on loopback; nothing is left running afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
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
from firmware_bridge.wire import HoldReason, InjectorState, MsgType

ROOT = Path(__file__).resolve().parents[1]
RECORDED_LOG = Path(__file__).parent / "demo_data" / "guidance_alert_log.jsonl"
LEAKS = ("posterior_leak", "venous_leak")
HOLD_SHOWN_S = 1.0  # how long the demo lets the hold stand before the operator acks
STARTUP_GRACE_S = 60.0  # guidance boot + model load; the 1 s watchdog applies once it is heard


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f} s] {text}", flush=True)


class GuidanceWatch:
    """SUB on the guidance PUB: what guidance says (and, optionally, a recording of it)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, record: str | None = None) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)  # on as soon as the service binds
        for topic in (b"alert", b"heartbeat"):
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.record = open(record, "w") if record else None  # noqa: SIM115
        self.heartbeat: dict[str, Any] | None = None
        self.alerts: list[dict[str, Any]] = []

    def pump(self, timeout_s: float) -> None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                doc = json.loads(frames[-1])
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if self.record:  # the `guidance run --alert-log` format: one payload a line
                self.record.write(json.dumps(doc, separators=(",", ":")) + "\n")
            if doc.get("type") == "heartbeat":
                self.heartbeat = doc
            elif doc.get("type") == "alert":
                self.alerts.append(doc)

    def first_leak(self) -> dict[str, Any] | None:
        """The first high-priority leak raise heard; if its message went out before this SUB
        had joined, the raise as listed in a heartbeat's active_alerts (no publish time)."""
        heard = next(
            (
                a
                for a in self.alerts
                if a.get("kind") in LEAKS and a.get("state") == "raised" and a.get("priority") == "high"
            ),
            None,
        )
        if heard or not self.heartbeat:
            return heard
        listed = next(
            (
                a
                for a in self.heartbeat.get("active_alerts", [])
                if a.get("kind") in LEAKS and a.get("priority") == "high"
            ),
            None,
        )
        if listed:
            return {
                **listed,
                "state": "raised",
                "message": "(raise sent before the demo had joined; listed in guidance's heartbeat)",
                "publish_mono_ns": None,
            }
        return None

    def close(self) -> None:
        self.sock.close()
        if self.record:
            self.record.close()


class ReplayGuidance:
    """Re-publishes the alerts of a recorded log (`guidance run --alert-log` format) at their
    recorded pace with fresh stamps (own session, seq, publish times), heartbeating every
    200 ms as the live service would."""

    def __init__(
        self,
        ctx: zmq.Context,
        events: list[dict[str, Any]],
        endpoint: str = "tcp://127.0.0.1:*",
        sock: zmq.Socket | None = None,
    ) -> None:
        self.pub = GuidancePublisher(ctx, endpoint, sock=sock)
        self.endpoint = self.pub.endpoint
        self.events = [e for e in events if e.get("type") == "alert"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="replay")
        self._delay_s = 1.0

    def start(self, delay_s: float = 1.0) -> ReplayGuidance:
        self._delay_s = delay_s
        self.pub.start_heartbeats(0.2)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic() + self._delay_s
        ids: dict[str, str] = {}
        first = self.events[0]["publish_mono_ns"] if self.events else 0
        for doc in self.events:
            due = t0 + (doc["publish_mono_ns"] - first) / 1e9
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            sent = self.pub.alert(
                doc["kind"],
                doc["state"],
                doc["priority"],
                alert_id=ids.get(doc["alert_id"]),
                frame=doc.get("frame"),
                message=doc.get("message"),
            )
            ids.setdefault(doc["alert_id"], sent["alert_id"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.pub.close()


def load_log(path: Path) -> list[dict[str, Any]]:
    events = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err})") from None
        if doc.get("type") == "alert" and not all(
            k in doc for k in ("alert_id", "kind", "state", "priority", "publish_mono_ns")
        ):
            raise ValueError(f"{path}:{n}: alert lacks alert_id/kind/state/priority/publish_mono_ns")
        events.append(doc)
    if not any(e.get("type") == "alert" for e in events):
        raise ValueError(f"{path}: no alert messages to replay")
    return events


def reserve_endpoint(ctx: zmq.Context) -> tuple[str, zmq.Socket]:
    """A PUB bound to a free loopback port, kept bound: the replay publishes on it, or it is
    closed for the service to bind the port (which it does after a second of start-up; a
    ZeroMQ close is asynchronous, so re-binding at once could find the port still taken).

    Below Linux's ephemeral range (32768+) on purpose: the bridge and the demo connect to it
    before guidance binds, and a TCP connect to a free *ephemeral* port can, rarely, get that
    same port as its own source port and connect to itself, stealing the port."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    port = sock.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=32000, max_tries=200)
    return f"tcp://127.0.0.1:{port}", sock


def start_service(endpoint: str, watch: GuidanceWatch, clock: Clock, extra_args: list[str]) -> subprocess.Popen | str:
    """`guidance run` as its own process on `endpoint`; returns it once its first heartbeat
    is heard (by `watch`, subscribed already), or the reason it could not start."""
    # 10 fps unless told: the bundled loop's leak comes near its end (frame ~62 of 90), and the
    # operator's ack must land while guidance still runs (a stopped guidance is a hold)
    pace = [] if "--fps" in extra_args else ["--fps", "10"]
    cmd = [sys.executable, "-m", "guidance", "run", "--address", endpoint, *pace, *extra_args]
    service = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    clock.say(f"guidance service: {shlex.join(['guidance', *cmd[3:]])} (pid {service.pid})")
    deadline = time.monotonic() + 60.0
    while watch.heartbeat is None and time.monotonic() < deadline:
        watch.pump(0.1)
        if service.poll() is not None:
            err = (service.stderr.read() if service.stderr else "").strip().splitlines()
            return f"exited with {service.returncode}: {err[-1] if err else 'no message'}"
    if watch.heartbeat is None:
        stop_process(service)
        return "no heartbeat within 60 s"
    return service


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_demo(
    replay: str | None = None,
    record: str | None = None,
    use_service: bool = True,
    guidance_args: list[str] | None = None,
) -> int:
    clock = Clock()
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="bridge-demo-")
    sim = FirmwareSimulator(link_dir=tmp).start()
    clock.say(f"simulated injector on {sim.port} -> {sim.pty_name}, injecting at {sim.model.demand_ml_per_min} mL/min")
    service: subprocess.Popen | None = None
    source: ReplayGuidance | None = None
    watch: GuidanceWatch | None = None
    tap: BridgeTap | None = None
    bt: BridgeThread | None = None
    reserved: zmq.Socket | None = None
    try:
        # the guidance endpoint, and everyone on it before guidance binds it (ZeroMQ connects
        # when it appears): the bridge hears the very first alert, as in the room
        endpoint, reserved = reserve_endpoint(ctx)
        watch = GuidanceWatch(ctx, endpoint, record)
        bt = BridgeThread(SerialInjectorLink(sim.port), endpoint, ctx, guidance_startup_s=STARTUP_GRACE_S)
        tap = BridgeTap(ctx, bt.bridge.pub_address)
        bt.start()
        clock.say(
            f"bridge up: SUB {endpoint} (guidance may take {STARTUP_GRACE_S:.0f} s to "
            f"come up, then 1 s heartbeat watchdog), ack REP {bt.bridge.ack_address}, "
            f"PUB {bt.bridge.pub_address}"
        )
        if replay is None and use_service:
            reserved.close()  # the service binds it
            reserved = None
            started = start_service(endpoint, watch, clock, guidance_args or [])
            if isinstance(started, str):
                clock.say(
                    f"guidance service could not run ({started}); falling back to the "
                    f"recorded guidance alert log {RECORDED_LOG.name}"
                )
                replay = str(RECORDED_LOG)
            else:
                service = started
                assert watch.heartbeat is not None
                clock.say(
                    f"guidance service up (session {watch.heartbeat['session']}, "
                    f"heartbeat every {watch.heartbeat['period_ms']} ms)"
                )
        if service is None:
            path = Path(replay or RECORDED_LOG)
            try:
                events = load_log(path)
            except (OSError, ValueError) as err:
                clock.say(f"cannot replay {path}: {err}")
                return 1
            source = ReplayGuidance(ctx, events, endpoint, reserved)
            reserved = None  # the replay owns it now
            clock.say(f"guidance: replaying recorded alert log {path} ({len(source.events)} alerts) on {endpoint}")
            source.start()

        # 1. the first high-priority leak alert from guidance
        deadline = time.monotonic() + 60.0
        while watch.first_leak() is None and time.monotonic() < deadline:
            watch.pump(0.05)
            tap.pump(0)
            if service and service.poll() is not None and watch.first_leak() is None:
                clock.say(f"guidance service ended ({service.returncode}) with no leak alert")
                return 1
        alert = watch.first_leak()
        if alert is None:
            clock.say("no high-priority leak alert from guidance within 60 s")
            return 1
        clock.say(
            f"GUIDANCE ALERT: {alert['kind']} {alert['state']} priority "
            f"{alert['priority']} frame {alert.get('frame')} id {alert['alert_id']}: "
            f"{alert.get('message', '')}"
        )

        # 2. the HOLD on the wire, as the firmware read it
        if not sim.wait_for(
            lambda r: any(x.frame.type == MsgType.HOLD and x.frame.payload[0] == HoldReason.CLINICAL_ALERT for x in r),
            5.0,
        ):
            clock.say("no HOLD reached the injector")
            return 1
        hold = next(x for x in sim.commands(MsgType.HOLD) if x.frame.payload[0] == HoldReason.CLINICAL_ALERT)
        if alert["publish_mono_ns"] is None:
            when = "(the raise predates the bridge: learned from guidance's heartbeat)"
        else:
            delay_ms = (hold.rx_mono_ns - alert["publish_mono_ns"]) / 1e6
            when = f"{delay_ms:.2f} ms after guidance published the alert" + (
                ""
                if delay_ms < 50
                else " (the bridge was still joining when the alert went "
                "out: it learned the raise from the next guidance heartbeat's active_alerts)"
            )
        clock.say(
            f"HOLD on the wire: seq {hold.frame.seq}, read by the firmware {when}; "
            f"firmware ACK {hold.status.name if hold.status is not None else '-'}"
        )
        held = tap.wait_for(lambda t, d: t == "telemetry" and d["injector_state"] == "held", 3)
        if not held:
            clock.say("the injector never reported held")
            return 1
        clock.say(
            f"INJECTOR: state {held['injector_state']}, delivered "
            f"{held['delivered_volume_ml']:.3f} mL, pressure {held['pressure_kpa']:.0f} "
            f"kPa, flow {held['flow_ml_per_min']:.1f} mL/min, hold_latched "
            f"{held['hold_latched']}"
        )

        # 3. the hold stays, whatever guidance does meanwhile
        until = time.monotonic() + HOLD_SHOWN_S
        while time.monotonic() < until:
            watch.pump(0.05)
            tap.pump(0)
        later = []
        for a in watch.alerts:
            if a is alert:
                continue
            text = f"{a['kind']} {a['state']} (frame {a.get('frame')})"
            if a["kind"] in LEAKS and a["state"] == "raised" and a["priority"] == "high" and a.get("publish_mono_ns"):
                rehold = next((x for x in sim.commands(MsgType.HOLD) if x.rx_mono_ns > a["publish_mono_ns"]), None)
                if rehold:  # every new raise goes to the wire, even while latched
                    text += (
                        f" -> HOLD re-sent, on the wire {(rehold.rx_mono_ns - a['publish_mono_ns']) / 1e6:.2f} ms later"
                    )
            later.append(text)
        last = tap.of("telemetry")[-1]
        clock.say(
            f"{HOLD_SHOWN_S:.0f} s later: guidance since: {', '.join(later) or 'nothing new'}; injector "
            f"{last['injector_state']}, delivered {last['delivered_volume_ml']:.3f} mL"
        )
        # checked, not asserted by the narration: before any ack no RELEASE reached the
        # firmware, its plunger is still held, the bridge still latches and no cement moved
        broken = []
        if released := sim.commands(MsgType.RELEASE):
            broken.append(f"RELEASE seq {released[0].frame.seq} reached the firmware")
        if sim.state is not InjectorState.HELD:
            broken.append(f"firmware state {sim.state.name}")
        if last["injector_state"] != "held" or not last["hold_latched"]:
            broken.append(f"telemetry {last['injector_state']}, hold_latched {last['hold_latched']}")
        if last["delivered_volume_ml"] != held["delivered_volume_ml"]:
            broken.append(
                f"delivered {held['delivered_volume_ml']:.3f} -> {last['delivered_volume_ml']:.3f} mL while held"
            )
        if broken:
            clock.say(f"HOLD NOT KEPT before any operator ack: {'; '.join(broken)}")
            return 1
        clock.say(
            "checked before the ack: no RELEASE sent, firmware still HELD, hold latched, delivered volume unchanged"
        )

        # 4. the operator acknowledges: RELEASE
        mark = len(tap.messages)
        reply = send_ack(ctx, bt.bridge.ack_address, "*", operator="demo-operator")
        clock.say(f"OPERATOR ACK (demo-operator, all holds): accepted {reply['accepted']}: {reply['reason']}")
        if not reply["accepted"]:
            return 1
        if not sim.wait_for(lambda r: any(x.frame.type == MsgType.RELEASE for x in r), 3.0):
            clock.say("no RELEASE reached the injector")
            return 1
        release = sim.commands(MsgType.RELEASE)[0]
        clock.say(
            f"RELEASE on the wire: seq {release.frame.seq}, firmware ACK "
            f"{release.status.name if release.status is not None else '-'}"
        )
        moving = tap.wait_for(
            lambda t, d: t == "telemetry" and d["injector_state"] in ("injecting", "idle"), 3, since=mark
        )
        if moving:
            clock.say(
                f"INJECTOR: state {moving['injector_state']}, delivered "
                f"{moving['delivered_volume_ml']:.3f} mL, hold_latched "
                f"{moving['hold_latched']}"
            )
        bridge_alerts = [f"{d['kind']} {d['state']}" for t, d in tap.messages if t == "alert"]
        clock.say(f"bridge alerts published: {', '.join(bridge_alerts)}")
        return 0
    finally:
        if bt:
            with contextlib.suppress(Exception):
                bt.stop()
        for part in (tap, watch, source, reserved):
            if part:
                part.close()
        if service:
            stop_process(service)
        sim.stop()
        ctx.destroy(linger=0)  # never hang the exit on a socket left open
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m firmware_bridge.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument(
        "--guidance-args",
        default="",
        metavar="ARGS",
        help="extra arguments for `guidance run` (one shell-quoted string)",
    )
    ap.add_argument(
        "--recorded", action="store_true", help="replay the bundled recorded alert log instead of running the service"
    )
    ap.add_argument("--replay", metavar="LOG", help="replay this alert log (JSONL)")
    ap.add_argument("--record", metavar="LOG", help="also record what guidance sent (JSONL)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="           bridge log: %(message)s")
    replay = args.replay or (str(RECORDED_LOG) if args.recorded else None)
    if replay:
        try:
            load_log(Path(replay))
        except (OSError, ValueError) as err:
            print(f"demo: error: --replay: {err}", file=sys.stderr)
            return 2
    try:
        return run_demo(replay, args.record, guidance_args=shlex.split(args.guidance_args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
