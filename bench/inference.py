"""Bare inference of ONNX segmenters side by side (a benchmark, not a timed test).

    python bench/inference.py [MODEL.onnx ...] [--threads 1 2] [--runs 80]

Each model gets its own onnxruntime session with the service's options (CPU provider, all
graph optimisations, no spinning); runs alternate between the models, the order reversed on
every other round, so load on a shared machine hits them alike. Prints p50/p90 per model and
thread count, and each model's p50 as a ratio of the first one's. With no model: the shipped
one. To compare against an earlier release: `git show REV:models/segmenter.onnx > old.onnx`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path, default=[ROOT / "models" / "segmenter.onnx"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=80, help="timed runs per model and thread count")
    args = ap.parse_args()
    for path in args.models:
        if not path.is_file():
            print(f"error: {path}: no such model file", file=sys.stderr)
            return 2
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"Python {platform.python_version()}"
    )
    rng = np.random.default_rng(0)
    for threads in args.threads:
        sessions = [session(p, threads) for p in args.models]
        feeds = []
        for s in sessions:
            spec = s.get_inputs()[0]
            x = rng.normal(0, 1, [int(d) for d in spec.shape]).astype(np.float32)
            feeds.append({spec.name: x})
            for _ in range(5):  # warm-up
                s.run(None, feeds[-1])
        times: list[list[float]] = [[] for _ in sessions]
        for r in range(args.runs):
            order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
            for i in order:
                t0 = time.perf_counter()
                sessions[i].run(None, feeds[i])
                times[i].append((time.perf_counter() - t0) * 1e3)
        base = float(np.median(times[0]))
        print(f"{threads} intra-op thread(s), {args.runs} runs each, alternating:")
        for path, t in zip(args.models, times, strict=True):
            p50, p90 = np.percentile(t, [50, 90])
            print(f"  {path}: p50 {p50:.2f} ms  p90 {p90:.2f} ms  ratio {p50 / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
