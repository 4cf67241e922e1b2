"""Benchmark for `guidance evaluate` (issue 4, "Must reach"), not a timed test:

1. one core: a 15 fps 1024x1024 loop evaluated by one worker pinned to one CPU; the
   real-time factor is loop duration / processing time (target >= 3).
2. scaling: the same set of loops evaluated with --workers 1 on one core and --workers N on N
   cores, side by side in this run (alternating, repeated); speed-up = wall(1) / wall(N)
   (target >= 0.8 N).

    python bench/evaluate_speed.py [--workers N] [--seconds 4] [--repeats 2] [--model PATH] [--format dcm]

Everything runs through the CLI as a user runs it (`python -m guidance evaluate`), overlay
videos and Dice included. Prints the numbers and the machine; they go into README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_loops(folder: Path, count: int, seconds: float, size: int, form: str = "mp4") -> list[Path]:
    """One simulated 15 fps loop (posterior and venous leak, masks), copied `count` times:
    8-bit MP4, or 16-bit multi-frame DICOM (`form` "dcm", as archives hold them)."""
    src = folder / "src"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "models.sim",
            str(src),
            "--count",
            "1",
            "--seed",
            "7",
            "--size",
            str(size),
            "--fps",
            "15",
            "--seconds",
            str(seconds),
            "--format",
            form,
            *(["--bit-depth", "16"] if form == "dcm" else []),
            "--leaks",
            "both",
            "--prefix",
            "bench",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    video = next(src.glob(f"*.{form}"))
    stem = video.stem
    out = folder / "loops"
    out.mkdir()
    for i in range(count):
        name = f"loop{i:02d}"
        shutil.copy(video, out / f"{name}.{form}")
        labels = json.loads((src / f"{stem}.labels.json").read_text())
        labels["masks"] = f"{name}.masks.npz"
        (out / f"{name}.labels.json").write_text(json.dumps(labels))
        shutil.copy(src / f"{stem}.masks.npz", out / f"{name}.masks.npz")
    return sorted(out.glob(f"*.{form}"))


def run_eval(
    paths: list[Path], out: Path, workers: int, cpus: list[int], model: str | None, extra: list[str]
) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "guidance",
        "evaluate",
        *map(str, paths),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--threads-per-worker",
        "1",
        "-q",
        *extra,
    ]
    if model:
        cmd += ["--model", model]
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus)
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the whole command and every process it started (workers, manager)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"evaluate failed ({proc.returncode}): {proc.stderr.strip()}")
    summary = json.loads((out / "summary.json").read_text())
    failed = [r for r in summary["loops"] if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"a loop failed: {failed[0]['reason']}")
    summary["_command_cpu_s"] = cpu
    return wall, summary


def bare_inference_ms(model_path: str | None, cpus: list[int]) -> float:
    """The model alone on one thread, pinned like the one-core run, for context."""
    code = (
        "import os, sys, time, numpy as np\n"
        f"os.sched_setaffinity(0, {cpus!r})\n"
        "from guidance.settings import load_settings\n"
        "from guidance.pipeline import load_model\n"
        "s = load_settings(overrides={'segmentation': {'model': sys.argv[1] or None, 'threads': 1}})\n"
        "m = load_model(s); m.warm_up(3)\n"
        "x = np.random.default_rng(0).normal(size=(1, 1, m.size, m.size)).astype(np.float32)\n"
        "ts = []\n"
        "for _ in range(50):\n"
        "    t0 = time.perf_counter(); m.infer(x); ts.append((time.perf_counter() - t0) * 1e3)\n"
        "print(float(np.median(ts)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, model_path or ""], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    available = sorted(os.sched_getaffinity(0))
    ap.add_argument("--workers", type=int, default=len(available))
    ap.add_argument("--seconds", type=float, default=4.0, help="loop length (default 4 s)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--loops-per-worker", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", help="default: the shipped model")
    ap.add_argument("--no-video", action="store_true", help="also skip overlay videos")
    ap.add_argument(
        "--format", choices=["mp4", "dcm"], default="mp4", help="8-bit MP4 (default) or 16-bit multi-frame DICOM"
    )
    args = ap.parse_args()
    n = min(args.workers, len(available))
    extra = ["--no-video"] if args.no_video else []
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs "
        f"({len(available)} usable), load average {os.getloadavg()[0]:.2f}, Python "
        f"{platform.python_version()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp_path = Path(tmp)
        loops = make_loops(tmp_path, n * args.loops_per_worker, args.seconds, args.size, args.format)
        one_core = [available[0]]
        n_cores = available[:n]

        # 1. one loop, one core
        factors, fps, cpu_factors = [], [], []
        for r in range(args.repeats):
            _, s = run_eval(loops[:1], tmp_path / f"one{r}", 1, one_core, args.model, extra)
            row = s["loops"][0]
            factors.append(row["realtime_factor"])
            fps.append(row["frames"] / row["wall_s"])
            cpu_factors.append(row["frames"] / row["fps"] / row["cpu_s"])
        row = s["loops"][0]
        print(
            f"\n1) one {args.size}x{args.size} {row['fps']:g} fps loop "
            f"({'16-bit DICOM' if args.format == 'dcm' else '8-bit MP4'}), {row['frames']} frames, "
            f"one core (CPU {one_core[0]}), --threads-per-worker 1"
            f"{', no video' if args.no_video else ', overlay video and Dice included'}"
        )
        print(
            f"   processing {statistics.median(fps):.1f} frames/s, real-time factor "
            f"{statistics.median(factors):.2f}x (runs: {', '.join(f'{f:.2f}' for f in factors)}; "
            f"target >= 3)"
        )
        print(
            f"   by CPU time (loop duration / CPU seconds the worker used; steadier than wall "
            f"time on a shared machine): {statistics.median(cpu_factors):.2f}x"
        )
        stages = row["latency_ms"].get("stages_p50", {})
        print("   per-frame pipeline p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
        if not args.no_video:
            lean = []
            for r in range(args.repeats):
                _, s2 = run_eval(loops[:1], tmp_path / f"lean{r}", 1, one_core, args.model, ["--no-video"])
                lean.append(s2["loops"][0]["realtime_factor"])
            print(f"   same without overlay video: real-time factor {statistics.median(lean):.2f}x")
        print(
            f"   bare inference, 1 thread, one core: {bare_inference_ms(args.model, one_core):.1f} ms"
            " per frame (median of 50)"
        )

        # 2. scaling, side by side: alternate 1 worker / N workers
        walls: dict[int, list[float]] = {1: [], n: []}
        cpus_used: dict[int, list[float]] = {1: [], n: []}
        loop_stats: dict[int, list[tuple[float, float]]] = {1: [], n: []}
        for r in range(args.repeats):
            for workers, cpus in ((1, one_core), (n, n_cores)):
                wall, s = run_eval(loops, tmp_path / f"scale{workers}_{r}", workers, cpus, args.model, extra)
                walls[workers].append(wall)
                cpus_used[workers].append(s["_command_cpu_s"])
                loop_stats[workers] += [(x["wall_s"], x["cpu_s"]) for x in s["loops"]]
        w1, wn = statistics.median(walls[1]), statistics.median(walls[n])
        print(f"\n2) {len(loops)} loops, whole command (process start, model load included)")
        print(f"   --workers 1 on 1 core: {w1:.2f} s; --workers {n} on {n} cores: {wn:.2f} s")
        print(
            f"   speed-up {w1 / wn:.2f}x for {n} workers = {w1 / wn / n:.2f} x N "
            f"(target >= 0.8 x N); runs 1: {', '.join(f'{x:.2f}' for x in walls[1])}; "
            f"runs {n}: {', '.join(f'{x:.2f}' for x in walls[n])}"
        )
        for w in (1, n):
            lw = statistics.median(x[0] for x in loop_stats[w])
            lc = statistics.median(x[1] for x in loop_stats[w])
            print(f"   per loop with {w} worker(s): wall {lw:.2f} s, CPU {lc:.2f} s (median)")
        c1, cn = statistics.median(cpus_used[1]), statistics.median(cpus_used[n])
        print(
            f"   CPU seconds of the whole command: {c1:.1f} (1 worker) vs {cn:.1f} ({n} workers): "
            f"parallel overhead {cn / c1 - 1:+.0%}; on {n} otherwise idle cores the speed-up would be "
            f"about {n * c1 / cn:.2f}x = {c1 / cn:.2f} x N (estimate)"
        )
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
