"""A minimal operator console for the bridge, for bench work and demos (the real injector
console is its own product): acknowledge a hold, or watch what the bridge publishes.

    python -m firmware_bridge.console ack --operator dr-smith [--alert-id ID|*]
    python -m firmware_bridge.console watch [--count N] [--telemetry]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import zmq

from firmware_bridge.harness import send_ack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m firmware_bridge.console", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ack = sub.add_parser("ack", help="acknowledge a latched hold (releases it when it is the last)")
    ack.add_argument("--operator", required=True, help="who acknowledges (logged by the bridge)")
    ack.add_argument("--alert-id", default="*", help="the hold's alert id, or * for all")
    ack.add_argument("--endpoint", default="tcp://127.0.0.1:5557")
    ack.add_argument("--timeout", type=float, default=3.0, metavar="S")
    watch = sub.add_parser("watch", help="print the bridge's alerts and heartbeats")
    watch.add_argument("--endpoint", default="tcp://127.0.0.1:5558")
    watch.add_argument("--telemetry", action="store_true", help="print telemetry too")
    watch.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    args = ap.parse_args(argv)
    ctx = zmq.Context()
    try:
        if args.cmd == "ack":
            if not args.operator.strip():
                print("console: error: --operator must name someone", file=sys.stderr)
                return 2
            try:
                reply = send_ack(ctx, args.endpoint, args.alert_id, args.operator, timeout_s=args.timeout)
            except TimeoutError as err:
                print(f"console: error: {err}", file=sys.stderr)
                return 1
            print(f"accepted {reply.get('accepted')}: {reply.get('reason')} (hold_latched {reply.get('hold_latched')})")
            return 0 if reply.get("accepted") else 1
        return _watch(ctx, args.endpoint, args.telemetry, args.count)
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.destroy(linger=0)


def _watch(ctx: zmq.Context, endpoint: str, telemetry: bool, count: int) -> int:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for topic in (b"alert", b"heartbeat") + ((b"telemetry",) if telemetry else ()):
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    seen = 0
    while not count or seen < count:
        topic, payload = sock.recv_multipart()
        doc = json.loads(payload)
        stamp = time.strftime("%H:%M:%S")
        if topic == b"alert":
            line = f"ALERT {doc['kind']} {doc['state']} [{doc['priority']}] {doc['alert_id']}: {doc['message']}"
        elif topic == b"heartbeat":
            line = (
                f"heartbeat link {doc['link']} injector {doc['injector_state']} "
                f"hold_latched {doc['hold_latched']} {doc['latched_alerts']}"
            )
        else:
            line = (
                f"telemetry {doc['injector_state']} {doc['delivered_volume_ml']:.3f} mL "
                f"{doc['pressure_kpa']:.0f} kPa {doc['flow_ml_per_min']:.2f} mL/min"
            )
        print(f"{stamp} {line}", flush=True)
        seen += 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
