"""`guidance bridge` / `python -m firmware_bridge`: run the bridge (or its demo)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from urllib.parse import urlsplit

from guidance.errors import BadInputError, GuidanceError

LOOPBACK_NAMES = {"localhost"}


def check_endpoint(name: str, endpoint: str, allow_remote: bool) -> str:
    """A ZeroMQ endpoint we accept: tcp (loopback unless allowed), ipc or inproc."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc") and rest:
        return endpoint
    if scheme != "tcp" or not rest:
        raise BadInputError(f"{name} {endpoint!r}: expected tcp://HOST:PORT (or ipc://PATH)")
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None and not rest.endswith(":*"):
        raise BadInputError(f"{name} {endpoint!r}: port missing or not a number")
    if not allow_remote and host not in LOOPBACK_NAMES:
        try:
            loop = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loop = False
        if not loop:
            raise BadInputError(f"{name} {endpoint!r} is not loopback; pass --allow-remote to use another host")
    return endpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--guidance",
        default="tcp://127.0.0.1:5556",
        metavar="ENDPOINT",
        help="guidance PUB to subscribe to (default %(default)s)",
    )
    parser.add_argument(
        "--ack",
        default="tcp://127.0.0.1:5557",
        metavar="ENDPOINT",
        help="operator ack REP to bind (default %(default)s)",
    )
    parser.add_argument(
        "--pub",
        default="tcp://127.0.0.1:5558",
        metavar="ENDPOINT",
        help="telemetry/alert PUB to bind (default %(default)s)",
    )
    parser.add_argument(
        "--injector",
        default="sim",
        metavar="PORT",
        help="serial port of the injector (/dev/ttyACM0, a pty path) or 'sim' "
        "for the built-in simulated injector (default %(default)s)",
    )
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument(
        "--wait-for-device", action="store_true", help="start even if PORT does not exist yet (it is retried)"
    )
    parser.add_argument(
        "--guidance-timeout",
        type=float,
        default=1.0,
        metavar="S",
        help="hold when no guidance heartbeat for S seconds (default 1.0)",
    )
    parser.add_argument(
        "--guidance-startup",
        type=float,
        default=None,
        metavar="S",
        help="before guidance is first heard, wait up to S seconds for it "
        "(boot, model load) before holding (default: --guidance-timeout)",
    )
    parser.add_argument(
        "--injector-timeout",
        type=float,
        default=0.5,
        metavar="S",
        help="alert when the firmware is silent for S seconds (default 0.5)",
    )
    parser.add_argument("--allow-remote", action="store_true", help="allow non-loopback endpoints")
    parser.add_argument(
        "--demo", action="store_true", help="run guidance + bridge + simulated injector and show a hold"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bridge",
        help="bridge guidance alerts to the injector firmware (hold the plunger)",
        description="Subscribe to guidance alerts, hold the injector on a high-priority leak "
        "alert until an operator ack, republish injector telemetry.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.demo:
        from firmware_bridge import demo

        return demo.run_demo()  # the service if present, else the scripted alert
    # imported here so `guidance --help` does not pay for pyserial
    from firmware_bridge.bridge import Bridge, BridgeConfig
    from firmware_bridge.link import make_link

    endpoints = {
        name: check_endpoint(f"--{name}", getattr(args, name), args.allow_remote) for name in ("guidance", "ack", "pub")
    }
    if args.injector != "sim" and not args.wait_for_device and not os.path.exists(args.injector):
        raise BadInputError(
            f"--injector {args.injector!r}: no such port (plug the injector in, or pass --wait-for-device)"
        )
    if args.baud <= 0:
        raise BadInputError(f"--baud {args.baud}: must be positive")
    config = BridgeConfig(
        guidance_endpoint=endpoints["guidance"],
        ack_endpoint=endpoints["ack"],
        pub_endpoint=endpoints["pub"],
        guidance_timeout_s=args.guidance_timeout,
        guidance_startup_s=args.guidance_startup,
        injector_timeout_s=args.injector_timeout,
    )
    try:
        config.validate()
    except ValueError as err:
        raise BadInputError(str(err)) from None
    link = make_link(args.injector, args.baud)
    bridge = Bridge(config, link)
    try:
        bridge.open()
    except OSError as err:
        _close_link(link)
        raise BadInputError(str(err)) from None
    stop = bridge.stop_event

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    print(
        f"bridge: session {bridge.session} pub {bridge.pub_address} ack {bridge.ack_address} "
        f"guidance {config.guidance_endpoint} injector {link.name}",
        flush=True,
    )
    try:
        bridge.run()
    finally:
        bridge.close()
        _close_link(link)
    return 0


def _close_link(link: object) -> None:
    closer = getattr(link, "close_simulator", None)
    if closer:
        closer()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_bridge",
        description=(
            "Bridge guidance alerts to the injector firmware. Advisory software, not a certified medical device."
        ),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except GuidanceError as err:
        print(f"firmware_bridge: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
