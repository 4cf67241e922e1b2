"""Alert publish -> HOLD on the wire: latency of the bridge, end to end.

A guidance-shaped PUB in this process publishes a high-priority leak alert; the bridge runs as
its own process (`python -m firmware_bridge`) on a real pseudo-terminal; the simulated
firmware in this process timestamps (time.monotonic_ns) the read that delivered the HOLD bytes.
Latency = HOLD read time - the alert's publish_mono_ns (CLOCK_MONOTONIC is shared by the
processes of one host). Each cycle is alert -> HOLD -> alert cleared -> operator ack ->
RELEASE, so every HOLD is measured from the released state, the path that matters.

    python bench/bridge_latency.py --alerts 200
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firmware_bridge.harness import BridgeTap, GuidancePublisher, send_ack  # noqa: E402
from firmware_bridge.simulator import FirmwareSimulator  # noqa: E402
from firmware_bridge.wire import MsgType  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alerts", type=int, default=200)
    ap.add_argument("--bridge-log", help="write the bridge's log here (default: discarded)")
    args = ap.parse_args()
    if args.alerts < 1:
        print("bridge_latency: error: --alerts must be >= 1", file=sys.stderr)
        return 2
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="bridge-bench-")
    sim = FirmwareSimulator(link_dir=tmp).start()
    # heartbeats every 100 ms and per-frame status at 15 fps, like the service on its loop
    guidance = GuidancePublisher(ctx).start_heartbeats(0.1).start_status(15.0)
    log = open(args.bridge_log, "w") if args.bridge_log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_bridge",
            "--injector",
            sim.port,
            "--guidance",
            guidance.endpoint,
            "--pub",
            "tcp://127.0.0.1:*",
            "--ack",
            "tcp://127.0.0.1:*",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    tap = None
    latencies_ms: list[float] = []
    try:
        m = re.search(r"pub (\S+) ack (\S+)", proc.stdout.readline())
        if not m:
            print("bridge_latency: error: the bridge did not start", file=sys.stderr)
            return 1
        pub, ack = m.groups()
        tap = BridgeTap(ctx, pub)
        if not tap.wait_for(
            lambda t, d: t == "heartbeat" and d["link"] == "connected" and d["guidance"]["session"] == guidance.session,
            10.0,
        ):
            print("bridge_latency: error: the bridge never heard guidance", file=sys.stderr)
            return 1
        for i in range(args.alerts):
            alert = guidance.alert("posterior_leak" if i % 2 else "venous_leak")
            if not sim.wait_for(
                lambda r, n=i + 1: len([x for x in r if x.frame.type == MsgType.HOLD and x.status is not None]) >= n,
                5.0,
            ):
                print(f"bridge_latency: error: no HOLD for alert {i}", file=sys.stderr)
                return 1
            hold = sim.commands(MsgType.HOLD)[i]
            latencies_ms.append((hold.rx_mono_ns - alert["publish_mono_ns"]) / 1e6)
            # the leak resolves (guidance clears it), then the operator acknowledges
            guidance.alert(alert["kind"], state="cleared", alert_id=alert["alert_id"])
            reply = send_ack(ctx, ack, alert["alert_id"], operator="bench")
            if not reply["accepted"] or not sim.wait_for(
                lambda r, n=i + 1: sum(1 for x in r if x.frame.type == MsgType.RELEASE) >= n, 5.0
            ):
                print(f"bridge_latency: error: release {i} failed: {reply}", file=sys.stderr)
                return 1
            tap.pump(0)
            del tap.messages[:]  # keep memory flat; only the latency matters here
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if tap:
            tap.close()
        guidance.close()
        sim.stop()
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)
        if log is not subprocess.DEVNULL:
            log.close()
    load = os.getloadavg()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, load avg {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}; Python {platform.python_version()}, pyzmq "
        f"{zmq.__version__}"
    )
    print(
        f"alert publish -> HOLD read on the pty, n={len(latencies_ms)}: "
        f"p50 {percentile(latencies_ms, 0.5):.2f} ms, p99 {percentile(latencies_ms, 0.99):.2f}"
        f" ms, max {max(latencies_ms):.2f} ms, mean {statistics.fmean(latencies_ms):.2f} ms"
    )
    print(
        f"budget 50 ms: {sum(1 for v in latencies_ms if v > 50)} over; max gap between this "
        f"process's guidance heartbeats {guidance.max_heartbeat_gap_ns / 1e6:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
