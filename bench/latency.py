"""Latency benchmark of the guidance loop (a benchmark, not a test: it measures, never asserts).

Replays 1024x1024 loops paced at 15 and 30 fps through the real pipeline (OpenCV decode ->
calibrate -> onnxruntime -> tracker -> ZeroMQ PUB on loopback) and prints, per rate:
capture-to-publish latency p50/p99/max, sustained fps, dropped frames, per-stage medians, the
bare model inference time (session.run alone, same session, measured right before and right
after the pipeline run: side by side) and the overhead ratio = pipeline p50 / bare p50;
then the process's peak resident memory.

Keep-warm (the loop's pass that re-runs the last frame just before the next is due): each
rate runs with it and without, alternating within every round (`--keep-warm on off`, the
default), so the two are compared under the same load.

Host control, side by side: before each round a fixed single-thread job (numpy arithmetic on a
1024x1024 plane, about as long as the pipeline's median frame) runs at the loop's frame period. Its
p99/p50 is what the machine alone does to a constant job's timing (a shared VM preempts); the
pipeline's own p99/p50 is printed beside it.

    taskset -c 0,1 python3 bench/latency.py                    # shipped model
    taskset -c 0,1 python3 bench/latency.py --model M.onnx --sha256sums SUMS --seconds 10
    taskset -c 0,1 python3 bench/latency.py --calibration phantom   # with distortion correction

`--calibration FILE` runs the pipeline with that calibration (made for the loop's frame size);
`--calibration phantom` first calibrates a rendered bead phantom of that size (the loop itself is
not distorted: this measures what the correction costs, not what it corrects).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
BENCH = Path(__file__).resolve().parent

from guidance.alerts import EventPublisher  # noqa: E402
from guidance.capture import open_source  # noqa: E402
from guidance.capture.simulated import draw_scene  # noqa: E402
from guidance.pipeline import GuidanceLoop  # noqa: E402
from guidance.segmentation.model import Model  # noqa: E402
from guidance.settings import Settings  # noqa: E402


def write_loop(path: Path, size: int, frames: int, fps: float) -> Path:
    """A lateral injection with a posterior leak, as an MP4 like a recorder would write."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    rng = np.random.default_rng(0)
    for t in range(frames):
        image, _ = draw_scene((size, size), t, "posterior", frames // 2, rng)
        writer.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def bare_inference(
    model: Model, frame: np.ndarray, runs: int, before_each: Callable[[], object] | None = None
) -> np.ndarray:
    """`runs` timed session.run calls (ms) on the frame's model input; `before_each`, untimed,
    runs before each of them (bench/idle_gap.py's idle gaps)."""
    x, _ = model.preprocess(frame)
    x = model.feed(x, x)  # the graph alone: its input is ready
    times = []
    for _ in range(runs):
        if before_each is not None:
            before_each()
        t0 = time.perf_counter()
        model.session.run([model.info.output_name], {model.info.input_name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(times)


def host_jitter(seconds: float, period_s: float, work_ms: float) -> tuple[np.ndarray, float]:
    """A constant job, timed: numpy arithmetic on a 1024x1024 float plane (one thread),
    repeated to about `work_ms`, started every `period_s` for `seconds`. Returns the times (ms)
    and the job's calibrated size (ms). Nothing in it varies but the machine."""
    plane = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    out = np.empty_like(plane)

    def job(reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            np.multiply(plane, 1.5, out=out)
            np.add(out, plane, out=out)
        return (time.perf_counter() - t0) * 1e3

    one = float(np.median([job(1) for _ in range(9)]))
    reps = max(1, round(work_ms / max(one, 1e-3)))
    times = []
    start = next_start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        times.append(job(reps))
        next_start += period_s
        time.sleep(max(0.0, next_start - time.perf_counter()))
    return np.asarray(times), one * reps


def rss_mb() -> tuple[float, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    now = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 1024.0
    return now, peak


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        name = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
            platform.processor(),
        )
    except (OSError, subprocess.SubprocessError, StopIteration):
        name = platform.processor()
    cpus = sorted(os.sched_getaffinity(0))
    return f"{name}; {len(cpus)} CPU(s) usable {cpus}; load avg {os.getloadavg()[0]:.2f} at start"


def run_rate(
    model: Model,
    loop: Path,
    fps: float,
    bare_runs: int,
    frame: np.ndarray,
    rounds: int,
    jitter_s: float = 2.0,
    calibration: Path | None = None,
    keep_warm_modes: tuple[bool, ...] = (True, False),
) -> list[dict]:
    """`rounds` x (bare inference block, host control job, the whole paced loop through the
    pipeline once per keep-warm mode, their order alternating between rounds), so all of them
    see the same machine load: side by side, not hours apart. One result per mode."""
    bare_blocks: list[np.ndarray] = []
    control: list[np.ndarray] = []
    control_ms = work_ms = 0.0
    runs: dict[bool, list] = {mode: [] for mode in keep_warm_modes}
    back_to_back: list[float] = []  # processing ms per frame, unpaced
    # the process's CPU time (all threads) during the runs, less the paired measurements'
    cpu_s: dict[bool, float] = {mode: 0.0 for mode in keep_warm_modes}
    paired: dict[bool, list[float]] = {mode: [] for mode in keep_warm_modes}
    every = 1 if fps <= 15 else 3  # leave the loop its idle time at higher rates

    def paired_bare(result) -> None:
        """Right after a frame is published, in the loop's idle time before the next one
        (the replay decodes only once the loop waits again): one bare inference on that very
        frame, under the same machine load. Only without keep-warm: it would take the slot the
        loop's own pass runs in (and warm the next frame itself)."""
        if result.index % every:
            return
        cpu0 = time.process_time()
        paired[False].extend(bare_inference(model, result.image, 1))
        cpu_s[False] -= time.process_time() - cpu0  # the loop's CPU, not this measurement's

    for round_index in range(rounds):
        bare_blocks.append(bare_inference(model, frame, max(10, bare_runs // rounds)))
        if jitter_s > 0:  # one size for every round: the pipeline's median frame is ~2.5 bare runs
            work_ms = work_ms or 2.5 * float(np.median(bare_blocks[0]))
            times, control_ms = host_jitter(jitter_s, 1.0 / fps, work_ms)
            control.append(times)
        order = keep_warm_modes if round_index % 2 == 0 else keep_warm_modes[::-1]
        for keep_warm in order:
            settings = Settings().replace(
                alerts={"address": "tcp://127.0.0.1:*"},
                capture={"pace": True, "fps": fps},
                loop={"latency_budget_ms": None, "keep_warm": keep_warm},
                calibration={"file": str(calibration) if calibration else None},
            )
            source = open_source(str(loop), pace=True, fps=fps)
            publisher = EventPublisher("tcp://127.0.0.1:*").open()
            publisher.start_heartbeat()
            try:
                on_result = None if keep_warm else paired_bare
                cpu0 = time.process_time()
                runs[keep_warm].append(GuidanceLoop(settings, source, model, publisher, on_result=on_result).run())
                cpu_s[keep_warm] += time.process_time() - cpu0
            finally:
                publisher.close()
        back_to_back += unpaced_processing_ms(model, loop, fps, calibration)
    bare_blocks.append(bare_inference(model, frame, max(10, bare_runs // rounds)))
    bare = np.concatenate(bare_blocks)
    bare_summary = {
        "p50": round(float(np.percentile(bare, 50)), 2),
        "p99": round(float(np.percentile(bare, 99)), 2),
        "block_p50s": [round(float(np.median(b)), 2) for b in bare_blocks],
    }
    control_summary = _control_summary(control, control_ms)
    b2b = float(np.median(back_to_back))
    b2b_summary = {
        "processing_p50_ms": round(b2b, 2),
        "frames": len(back_to_back),
        "overhead_ratio": round(b2b / bare_summary["p50"], 3),
    }
    return [
        {
            **_mode_result(
                fps,
                rounds,
                keep_warm,
                runs[keep_warm],
                paired[keep_warm],
                bare_summary,
                control_summary,
                cpu_s[keep_warm],
            ),
            "back_to_back": b2b_summary,
        }
        for keep_warm in keep_warm_modes
    ]


def unpaced_processing_ms(model: Model, loop: Path, fps: float, calibration: Path | None) -> list[float]:
    """The loop run through the same pipeline unpaced and decoded inline (a frame is decoded
    when the loop asks for it, then processed at once): each frame's capture-to-publish less
    its capture wait, i.e. the pipeline's own work with no idle gap before it."""
    settings = Settings().replace(
        alerts={"address": None},
        capture={"pace": False, "fps": fps},
        loop={"latency_budget_ms": None},
        calibration={"file": str(calibration) if calibration else None},
    )
    source = open_source(str(loop), pace=False, fps=fps, inline=True)
    publisher = EventPublisher("tcp://127.0.0.1:*").open()  # sent as in the paced runs
    try:
        summary = GuidanceLoop(settings, source, model, publisher).run()
    finally:
        publisher.close()
    c2p, capture = summary.latency_ms["capture_to_publish"], summary.latency_ms["capture"]
    return [total - wait for total, wait in zip(c2p, capture, strict=True)]


def _mode_result(
    fps: float,
    rounds: int,
    keep_warm: bool,
    summaries: list,
    paired: list[float],
    bare: dict,
    control: dict | None,
    cpu_s: float,
) -> dict:
    """One keep-warm mode's runs of a rate, pooled."""
    latency: list[float] = []
    stages: dict[str, list[float]] = {}
    slowest: list[dict[str, float]] = []  # every frame's stages, trimmed to the slowest below
    for summary in summaries:
        per_frame = summary.latency_ms["capture_to_publish"]
        aligned = {k: v for k, v in summary.latency_ms.items() if len(v) == len(per_frame)}
        slowest += [{k: round(float(v[i]), 2) for k, v in aligned.items()} for i in range(len(per_frame))]
        latency += per_frame
        for k, v in summary.latency_ms.items():
            stages.setdefault(k, []).extend(v)
    lat = np.asarray(latency)
    p50 = float(np.percentile(lat, 50))
    wall = sum(s.wall_s for s in summaries)
    processed = sum(s.frames_processed for s in summaries)
    return {
        "fps_target": fps,
        "keep_warm": keep_warm,
        "rehearsals": sum(s.rehearsals for s in summaries),
        "rehearsal_overlaps": sum(s.rehearsal_overlaps for s in summaries),
        "rounds": rounds,
        "frames_in_loop": sum(s.frames_read for s in summaries),
        "frames_processed": processed,
        "dropped_frames": sum(s.dropped_frames for s in summaries),
        "sustained_fps": round(processed / wall, 2) if wall else 0.0,
        "cpu_ms_per_frame": round(1e3 * cpu_s / processed, 2) if processed else None,
        "capture_to_publish_ms": {
            "p50": round(p50, 2),
            "p99": round(float(np.percentile(lat, 99)), 2),
            "max": round(float(lat.max()), 2),
        },
        "stage_median_ms": {k: round(float(np.median(v)), 2) for k, v in stages.items() if v},
        "bare_inference_ms": bare,
        "overhead_ratio": round(p50 / bare["p50"], 3),
        "paired_bare_inference_ms": {
            "p50": round(float(np.median(paired)), 2) if paired else None,
            "samples": len(paired),
        },
        "overhead_ratio_paired": round(p50 / float(np.median(paired)), 3) if paired else None,
        "host_control_ms": control,
        "slowest_frames_ms": sorted(slowest, key=lambda f: -f["capture_to_publish"])[:3],
        "alerts": [(m["kind"], m["state"], m["frame"]) for s in summaries for m in s.alerts],
    }


def _control_summary(blocks: list[np.ndarray], job_ms: float) -> dict | None:
    if not blocks:
        return None
    t = np.concatenate(blocks)
    p50 = float(np.percentile(t, 50))
    return {
        "job_ms": round(job_ms, 2),
        "runs": int(t.size),
        "p50": round(p50, 2),
        "p99": round(float(np.percentile(t, 99)), 2),
        "max": round(float(t.max()), 2),
        "p99_over_p50": round(float(np.percentile(t, 99)) / p50, 2),
    }


def report(r: dict, shape: tuple[int, ...], rounds: int) -> None:
    lat, bare = r["capture_to_publish_ms"], r["bare_inference_ms"]
    warm = f"keep-warm on ({r['rehearsals']} passes, {r['rehearsal_overlaps']} frames came during one)"
    print(
        f"\n{r['fps_target']:g} fps, {shape[1]}x{shape[0]}, {r['frames_in_loop']} frames in {rounds} rounds, "
        + (warm if r["keep_warm"] else "keep-warm off")
        + ":"
    )
    print(f"  capture-to-publish  p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  max {lat['max']:.1f} ms")
    print(
        f"  sustained {r['sustained_fps']:.1f} fps, dropped {r['dropped_frames']} frames, "
        f"processed {r['frames_processed']}, CPU {r['cpu_ms_per_frame']:.1f} ms a frame (all threads)"
    )
    print(f"  bare inference p50 {bare['p50']:.1f} ms (blocks {bare['block_p50s']}), p99 {bare['p99']:.1f} ms")
    pb = r["paired_bare_inference_ms"]
    if pb["samples"]:
        print(
            f"  bare inference paired with frames (loop idle time, same load): p50 {pb['p50']} ms "
            f"over {pb['samples']} frames -> overhead ratio {r['overhead_ratio_paired']}"
        )
    hc = r["host_control_ms"]
    if hc:
        print(
            f"  host control (a constant {hc['job_ms']:.1f} ms job at the frame period, same rounds): "
            f"p50 {hc['p50']:.1f} p99 {hc['p99']:.1f} max {hc['max']:.1f} ms, p99/p50 "
            f"{hc['p99_over_p50']:.2f}; pipeline p99/p50 {lat['p99'] / lat['p50']:.2f}"
        )
    for f in r["slowest_frames_ms"]:
        print("  a slowest frame (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in f.items()))
    print(
        f"  overhead ratio {r['overhead_ratio']:.2f}  stages (median ms) "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["stage_median_ms"].items())
    )
    b2b = r["back_to_back"]
    print(
        f"  back to back (same loop unpaced, same rounds): processing p50 {b2b['processing_p50_ms']:.1f} ms "
        f"over {b2b['frames']} frames -> overhead ratio {b2b['overhead_ratio']:.2f} (1.3 would be "
        f"{1.3 * bare['p50']:.1f} ms)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="ONNX model (default: the shipped one)")
    p.add_argument("--sha256sums", default=None)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=10.0, help="loop length per rate")
    p.add_argument("--rates", type=float, nargs="+", default=[15.0, 30.0])
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    p.add_argument("--bare-runs", type=int, default=150)
    p.add_argument("--spinning", action="store_true", help="let onnxruntime's threads spin-wait")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternate bare-inference blocks and pipeline runs this many times"
    )
    p.add_argument("--loop", type=Path, default=None, help="use this loop instead of a synthetic one")
    p.add_argument(
        "--control-seconds",
        type=float,
        default=2.0,
        help="host control job per round (0: none): a constant job's timing on this machine",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="FILE|phantom",
        help="correct every frame with this calibration ('phantom': one made from a rendered bead grid)",
    )
    p.add_argument(
        "--keep-warm",
        nargs="+",
        choices=["on", "off"],
        default=["on", "off"],
        help="the loop's keep-warm pass; both (default): each rate runs with it and without, side by side",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    model_path = args.model or Settings().model_path
    model = Model(model_path, args.sha256sums, threads=args.threads, spinning=args.spinning)
    model.warm_up(5)
    print(f"machine: {machine()}")
    print(f"model:   {model.describe()}, intra-op threads {args.threads or 'default'}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(args.calibration) if args.calibration else None
        if args.calibration == "phantom":
            # in a child process: fitting a phantom takes far more memory than the service
            # does, and this process's peak resident memory is reported below
            calibration = Path(tmp) / "calib.json"
            make = "from undistort import phantom_calibration; import sys, pathlib; "
            make += "phantom_calibration(pathlib.Path(sys.argv[1]), int(sys.argv[2]))"
            subprocess.run([sys.executable, "-c", make, str(calibration), str(args.size)], cwd=BENCH, check=True)
        if calibration:
            print(f"calibration: {calibration} (every frame corrected before segmentation)")
        for fps in args.rates:
            frames = int(round(args.seconds * fps / args.rounds))
            loop = args.loop or write_loop(Path(tmp) / f"loop_{int(fps)}.mp4", args.size, frames, fps)
            cap = cv2.VideoCapture(str(loop))
            ok, frame = cap.read()
            cap.release()
            assert ok, f"cannot read {loop}"
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            modes = tuple(dict.fromkeys(mode == "on" for mode in args.keep_warm))
            for r in run_rate(
                model, loop, fps, args.bare_runs, frame, args.rounds, args.control_seconds, calibration, modes
            ):
                r["frame_size"] = list(frame.shape)
                results.append(r)
                report(r, frame.shape, args.rounds)
    now, peak = rss_mb()
    print(f"\nresident memory: {now:.0f} MB now, {peak:.0f} MB peak (whole benchmark process)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "model": model.describe(),
                    "calibration": str(calibration) if calibration else None,
                    "results": results,
                    "rss_mb": {"now": now, "peak": peak},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
