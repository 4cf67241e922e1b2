"""`guidance run`: the headless service. With no arguments it replays the bundled demo loop
(a posterior leak) through the shipped model and publishes on tcp://127.0.0.1:5556."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from guidance import DISCLAIMER
from guidance.capture import open_source
from guidance.pipeline import FrameResult, GuidanceLoop, load_model, make_publisher
from guidance.settings import load_settings


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the guidance service (live or replay)",
        description="Capture -> calibrate -> segment -> track -> alerts over ZeroMQ. " + DISCLAIMER,
    )
    p.add_argument("--config", metavar="TOML", help="settings file (flags and GUIDANCE_* env win)")
    g = p.add_argument_group("capture")
    g.add_argument(
        "--source",
        help="device index, /dev/videoN, URL, DICOM, MP4/AVI/MKV, PNG "
        "folder or simulated[:posterior|venous|clean] (default: bundled demo loop)",
    )
    g.add_argument(
        "--kind",
        choices=("auto", "live", "replay", "simulated"),
        help="how to read the source (live: a file read as if it were a grabber)",
    )
    g.add_argument("--fps", type=float, help="override the source's frame rate")
    pace = g.add_mutually_exclusive_group()
    pace.add_argument(
        "--fast",
        dest="pace",
        action="store_const",
        const=False,
        help="replay as fast as possible (lossless) instead of at the loop's fps",
    )
    pace.add_argument(
        "--pace",
        dest="pace",
        action="store_const",
        const=True,
        help="replay at the loop's fps (default)",
    )
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", metavar="FILE", help="calibration file (see calibration/)")
    g.add_argument("--angulation", help="calibration angulation (when the file holds several)")
    g.add_argument("--pixel-spacing", type=float, metavar="MM", help="mm per pixel at the vertebra")
    g = p.add_argument_group("segmentation")
    g.add_argument("--model", help="ONNX model (default: the shipped models/segmenter.onnx)")
    g.add_argument("--sha256sums", help="checksum list (default: SHA256SUMS next to the model)")
    g.add_argument("--provider", choices=("cpu", "cuda", "auto"), help="execution provider")
    g.add_argument("--threads", type=int, help="onnxruntime intra-op threads (0: all cores)")
    g = p.add_argument_group("tracker")
    g.add_argument(
        "--posterior-side",
        choices=("auto", "left", "right"),
        help="image side of the spinal canal (auto: the source says, else the needle's entry)",
    )
    g.add_argument(
        "--view",
        choices=("auto", "lateral", "ap"),
        help="projection (auto: the source says, else lateral); posterior spread is judged in lateral only",
    )
    g = p.add_argument_group("alerts")
    g.add_argument("--address", help="PUB address (default tcp://127.0.0.1:5556; 'none': no socket)")
    g.add_argument("--alert-log", metavar="PATH", help="append every message as JSON lines")
    g.add_argument(
        "--injector-address",
        help="firmware_bridge telemetry PUB to show in each status (default tcp://127.0.0.1:5558; 'none')",
    )
    g.add_argument("--heartbeat-ms", type=int, help="heartbeat period (<= 1000)")
    g = p.add_argument_group("loop")
    g.add_argument("--max-frames", type=int, help="stop after this many frames")
    g.add_argument("--latency-budget-ms", type=float, help="latency_overrun threshold")
    g.add_argument("--quiet", action="store_true", help="print alerts only")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict:
    return {
        "capture": {"source": args.source, "kind": args.kind, "fps": args.fps, "pace": args.pace},
        "calibration": {
            "file": args.calibration,
            "angulation": args.angulation,
            "pixel_spacing_mm": args.pixel_spacing,
        },
        "segmentation": {
            "model": args.model,
            "sha256sums": args.sha256sums,
            "provider": args.provider,
            "threads": args.threads,
        },
        "tracker": {"posterior_side": args.posterior_side, "view": args.view},
        "alerts": {
            "address": args.address,
            "log": args.alert_log,
            "heartbeat_ms": args.heartbeat_ms,
        },
        "loop": {"max_frames": args.max_frames, "latency_budget_ms": args.latency_budget_ms},
    }


def _say(line: str) -> None:
    print(line, flush=True)


def _alert_line(msg: dict) -> str:
    frame = "-" if msg["frame"] is None else msg["frame"]
    return (
        f"ALERT {msg['state'].upper():7s} {msg['kind']} [{msg['priority']}] frame {frame} "
        f"seq {msg['seq']}: {msg['message']}"
    )


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, overrides=_overrides(args))
    model = load_model(settings)  # refuses a missing/corrupt/unlisted model before anything runs
    c = settings.capture
    source = open_source(settings.source_spec, c.kind, c.pace, c.fps, c.reconnect_s)
    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    publisher = make_publisher(settings)
    injector = None
    try:
        publisher.open()
        publisher.start_heartbeat()  # "starting" while the model warms up
        info = source.info
        _say(f"guidance: {DISCLAIMER}")
        # a recording paced at its own frame times says so (its fps is then their mean rate)
        timing = info.extra.get("timing", "fps") if c.pace else "fps"
        paced = f", paced at its {timing}" if timing not in ("fps", "") else ""
        _say(
            f"source {info.name} ({info.kind}, {info.width}x{info.height}, "
            f"{info.fps or '?'} fps{paced}, spacing {info.pixel_spacing_mm or '?'} mm)"
        )
        warm_ms = model.warm_up(settings.segmentation.warmup_runs)
        _say(f"model {model.describe()}, warm ({warm_ms:.1f} ms/run)")
        _say(
            f"publishing on {publisher.endpoint or 'no socket'}"
            + (f", alert log {settings.alerts.log}" if settings.alerts.log else "")
        )

        last = {"t": time.monotonic(), "n": 0}

        def on_result(r: FrameResult) -> None:
            now = time.monotonic()
            last["n"] += 1
            if args.quiet or now - last["t"] < settings.loop.print_every_s:
                return
            fps = last["n"] / (now - last["t"])
            st = r.status
            latency = r.latency_ms["capture_to_publish"]
            cement = st.areas["cement"]
            post, ven = ("YES" if f else "no" for f in (st.posterior, st.venous))
            flags = f"posterior {post}  venous {ven}"
            _say(
                f"frame {r.index:5d}  {fps:5.1f} fps  latency {latency:6.1f} ms"
                f"  dropped {publisher.dropped_frames}  cement {cement:.1f} {st.units}^2  {flags}"
            )
            last["t"], last["n"] = now, 0

        if settings.alerts.injector_address:
            from guidance.alerts.telemetry import InjectorListener

            injector = InjectorListener(settings.alerts.injector_address).start()
        loop = GuidanceLoop(
            settings,
            source,
            model,
            publisher,
            on_result=on_result,
            on_message=lambda m: _say(_alert_line(m)),
            stop=stop,
            injector=injector,
        )
        summary = loop.run()
    finally:
        if injector is not None:
            injector.stop()
        publisher.close()
        source.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    lat = summary.percentiles()
    _say(
        f"done ({summary.stopped_by}): {summary.frames_processed} frames processed, "
        f"{summary.frames_skipped} skipped, {summary.dropped_frames} dropped, "
        f"{summary.fps:.1f} fps, capture-to-publish p50 {lat['p50']:.1f} ms "
        f"p99 {lat['p99']:.1f} ms, "
        f"{len(summary.alerts)} alert messages, "
        f"{summary.rehearsals} keep-warm passes ({summary.rehearsal_overlaps} met a frame)"
    )
    sys.stdout.flush()
    return 0
