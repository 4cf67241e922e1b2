"""Inference time after an idle gap (a benchmark, not a timed test): back to back, after a
sleep, after busy work on the calling thread; onnxruntime spin-waiting off (as the service
runs it) or on.

    python bench/idle_gap.py            # spin-waiting off
    python bench/idle_gap.py --spinning
    python bench/idle_gap.py --threads 1   # no thread pool: is it the pool waking, or the caches?

On a VM whose host deschedules idle vCPUs, the first run after a sleep is slower than back to
back: the guidance loop idles between frames, so its in-loop inference is slower than bare.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from latency import bare_inference  # noqa: E402

from guidance.capture.simulated import draw_scene  # noqa: E402
from guidance.segmentation.model import Model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "segmenter.onnx"))
    ap.add_argument("--spinning", action="store_true", help="let onnxruntime's threads spin-wait")
    ap.add_argument("--gap-ms", type=float, default=40.0, help="idle time before each timed run")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (1: no thread pool to wake)")
    args = ap.parse_args()
    model = Model(args.model, threads=args.threads, spinning=args.spinning)
    image, _ = draw_scene((1024, 1024), 30, "posterior", 20, np.random.default_rng(0))
    bare_inference(model, image, 20)  # warm-up

    def busy() -> None:
        end = time.perf_counter() + args.gap_ms / 1e3
        while time.perf_counter() < end:
            pass

    gaps = {
        "back to back": lambda: None,
        "after a sleep": lambda: time.sleep(args.gap_ms / 1e3),
        "after busy work": busy,
    }
    spin = "on" if args.spinning else "off"
    print(f"{model.describe()}, {args.threads} thread(s), spin-waiting {spin}, gap {args.gap_ms:g} ms")
    for name, gap in gaps.items():
        times = bare_inference(model, image, args.runs, before_each=gap)
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        print(f"  {name:16s} p50 {p50:5.2f}  p90 {p90:5.2f}  p99 {p99:5.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
