"""Benchmark: distortion correction of 1024x1024 frames on one core.

Calibrates a rendered 1024x1024 bead phantom (known pincushion + S-distortion), then times
`Calibration.undistort` at full size (float32 maps; `guidance undistort`, and the service with
`calibration.full_resolution`), at half size (`undistort(reduce=2)`: what the service runs on a
1024 px frame for its 256 px model), each also with the model's letterbox resize to 256 px after
it (all the pixel work before the model), and cv2.remap with the same maps in fixed-point form
(cv2.convertMaps) and with the textbook -1 for "outside", side by side (interleaved frame by
frame, the order rotating so that no variant always reads a new frame first), for 8-bit,
12-bit-in-16 and float frames.

    python bench/undistort.py [--frames 300] [--threads 1]

Prints per-frame percentiles (ms), ratios to the service path, and the one-off cost of loading a
calibration (validation + map building). A benchmark, not a test: nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import load_calibration  # noqa: E402
from calibration.fit import calibrate_image  # noqa: E402
from calibration.phantom import PhantomSpec, render_phantom  # noqa: E402
from calibration.store import write_angulation  # noqa: E402


def percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    return (
        f"min {a.min():6.3f}  p50 {np.percentile(a, 50):6.3f}  p99 {np.percentile(a, 99):6.3f}  max {a.max():6.3f} ms"
    )


def phantom_calibration(path: Path, size: int = 1024):
    """A "lateral" calibration of size x size frames from a rendered bead phantom (pincushion +
    S-distortion, circular field) -> (path, phantom image, fit report, (rendered, fitted) times)."""
    spec = PhantomSpec(
        size=(size, size),
        pitch_mm=5.0,
        spacing_mm=0.2,
        fov_center_xy=(size / 2 - 0.5, size / 2 + 8 * size / 1024),
        fov_radius_px=490.0 * size / 1024,
        noise_sigma=0.02,
        seed=1,
    )
    image, _ = render_phantom(spec)
    rendered = time.perf_counter()
    report = calibrate_image(image, spec.pitch_mm)
    fitted = time.perf_counter()
    write_angulation(path, "lateral", report.entry)
    return path, image, report, (rendered, fitted)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads (1 = one core)")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path, image, report, (t1, t2) = phantom_calibration(Path(d) / "calib.json", 1024)
        t3 = time.perf_counter()
        cal = load_calibration(path, "lateral")
        t4 = time.perf_counter()
    e = report.entry
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, OpenCV {cv2.__version__}, "
        f"numpy {np.__version__}, cv2 threads {cv2.getNumThreads()}"
    )
    print(
        f"phantom 1024x1024 render {t1 - t0:.2f} s; calibrate {t2 - t1:.2f} s "
        f"({e['phantom']['beads_used']} beads, RMS {e['residuals']['rms_px']:.3f} px, "
        f"{e['pixel_spacing_mm']:.4f} mm/px vs 0.2 at the distortion centre); "
        f"load + build maps {1000 * (t4 - t3):.0f} ms"
    )

    w, h = cal.image_size
    mx, my = cal.distorted_from_ideal.evaluate_grid(np.arange(w), np.arange(h))
    outside = ~cal.fov_mask((h, w))
    mx1, my1 = mx.copy(), my.copy()
    mx1[outside] = -1.0  # the textbook "no source" value: partial-border slow path
    my1[outside] = -1.0
    f1, f2 = cv2.convertMaps(*cal.maps(), cv2.CV_16SC2)  # fixed-point version of the service maps

    def to_model(img: np.ndarray) -> np.ndarray:  # the letterbox resize the model's input takes
        return cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)

    alternatives = {
        "half size (service)": lambda f: cal.undistort(f, reduce=2),
        "full size + to 256 px": lambda f: to_model(cal.undistort(f)),
        "half size + to 256 px": lambda f: to_model(cal.undistort(f, reduce=2)),
        "fixed-point maps": lambda f: cv2.remap(f, f1, f2, cv2.INTER_LINEAR),
        "float maps, -1 outside": lambda f: cv2.remap(f, mx1, my1, cv2.INTER_LINEAR),
    }
    rng = np.random.default_rng(0)
    base = image.astype(np.float32) / 4095.0
    kinds = {
        "uint8": [np.clip(base * 255 + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8) for _ in range(8)],
        "uint16 (12-bit)": [
            np.clip(base * 4095 + rng.normal(0, 20, base.shape), 0, 4095).astype(np.uint16) for _ in range(8)
        ],
        "float32": [(base + rng.normal(0, 0.01, base.shape)).astype(np.float32) for _ in range(8)],
    }
    print(f"{args.frames} frames each, 1024x1024, INTER_LINEAR, per frame:")
    for name, pool in kinds.items():
        frames = [pool[i % len(pool)] for i in range(args.frames)]
        # interleave the variants frame by frame so machine load hits them alike
        fns = {"full size": cal.undistort, **alternatives}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for f in frames[:5]:
            for fn in fns.values():
                fn(f)
        order = list(fns)
        for i, f in enumerate(frames):
            # the first variant to read a new frame pays for bringing it into the cache:
            # rotate which one that is, frame by frame, so none always pays it
            for k in order[i % len(order) :] + order[: i % len(order)]:
                t0 = time.perf_counter_ns()
                fns[k](f)
                times[k].append((time.perf_counter_ns() - t0) / 1e6)
        ref = np.median(times["full size"])
        for k, ms in times.items():
            print(f"  {name:16s} {k:24s} {percentiles(ms)}   x{np.median(ms) / ref:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
