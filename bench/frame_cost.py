"""What one frame of `guidance evaluate` costs, part by part, on one thread (a benchmark, not a
timed test).

    python bench/frame_cost.py [LOOP.mp4] [--seconds 4] [--repeats 2]

Each part the evaluation does per frame is timed alone on the same loop: decoding (the replay
source's own path), preprocessing, the reference's registration, inference (one thread),
tracker, reading the frame's labelled mask, Dice, overlay render and its video encoding. The
process is pinned to one CPU. With no loop, the simulated 1024x1024 15 fps loop of
bench/evaluate_speed.py is made. 3x real time at 15 fps leaves 22.2 ms for all of it.
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

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("loop", nargs="?", type=Path, help="a loop with labels and masks beside it")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of the simulated loop")
    ap.add_argument("--size", type=int, default=1024, help="side of the simulated loop")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the loop (the first is not timed)")
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    sys.path.insert(0, str(ROOT / "bench"))
    from evaluate_speed import make_loops

    from guidance.capture import open_source
    from guidance.evaluation import overlay
    from guidance.evaluation.labels import MaskStream, load_labels
    from guidance.evaluation.scoring import DiceCounter
    from guidance.pipeline import load_model
    from guidance.segmentation.reference import ReferenceFrame
    from guidance.settings import load_settings
    from guidance.tracking import TrackerConfig, TrackerState, TrackGeometry, track

    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        loop = args.loop or make_loops(Path(tmp), 1, args.seconds, args.size)[0]
        labels_path = loop.with_name(loop.stem + ".labels.json")
        if not labels_path.is_file():
            print(f"error: {loop}: no labels file beside it ({labels_path.name})", file=sys.stderr)
            return 2
        labels = load_labels(labels_path)
        if labels.masks_path is None:
            print(f"error: {labels_path}: the labels name no masks (Dice is part of the cost)", file=sys.stderr)
            return 2
        times: dict[str, list[float]] = {}

        def tick(part: str, t0: float) -> float:
            now = time.perf_counter()
            if timed:
                times.setdefault(part, []).append((now - t0) * 1e3)
            return now

        source = open_source(str(loop), pace=False, inline=True)
        source.start()
        images = []
        timed = True
        t = time.perf_counter()
        while (frame := source.read()) is not None:
            t = tick("decode", t)
            images.append(frame.image)
        source.stop()
        settings = load_settings(overrides={"segmentation": {"threads": 1}})
        model = load_model(settings)
        model.warm_up(3)
        for rep in range(max(2, args.repeats)):
            timed = rep > 0
            reference, state, config = ReferenceFrame(), TrackerState(), TrackerConfig()
            masks, dice = MaskStream(labels), DiceCounter()
            video = overlay.OverlayVideo(Path(tmp) / f"overlay{rep}.mp4", labels.fps or 15.0, 512)
            for i, image in enumerate(images):
                t = time.perf_counter()
                x, geometry = model.preprocess(image)
                t = tick("preprocess", t)
                ref = reference.for_frame(x, image.shape[:2], i) if model.takes_reference else None
                t = tick("reference registration", t)
                plane = geometry.crop(model.infer(x, ref))
                t = tick("inference (1 thread)", t)
                # as the service's track operator calls it: the registration's scene shift and
                # the frame as the model read it (the density checks), in grey window units
                scale = geometry.frame_pixels_per_model_pixel()
                shift = reference.scene_shift if model.takes_reference else None
                geo = TrackGeometry(frame_per_px=scale, mm_per_frame_px=labels.pixel_spacing_mm, scene_shift=shift)
                status, state = track(plane, geo, state, config, None, model.window_units(x, geometry))
                t = tick("tracker", t)
                truth = masks.frame(i)
                t = tick("mask read", t)
                dice.add_model_plane(plane, truth)
                t = tick("Dice", t)
                size = overlay.fit_size(*image.shape[:2], 512)
                flags = {"posterior": status.posterior, "venous": status.venous}
                bgr = overlay.render(image, plane, size, flags, [(f"frame {i}", overlay.WHITE)], status)
                t = tick("overlay render", t)
                video.write(bgr)
                tick("overlay encode", t)
            video.close()
            masks.close()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs (pinned to one), load average "
        f"{os.getloadavg()[0]:.2f}, Python {platform.python_version()}, OpenCV {cv2.__version__}"
    )
    print(f"{loop.name}: {len(images)} frames {images[0].shape[1]}x{images[0].shape[0]}, {model.describe()}")
    total = 0.0
    for part, ms in times.items():
        p50 = float(np.percentile(ms, 50))
        total += p50
        print(f"  {part:24s} p50 {p50:6.2f} ms  p90 {np.percentile(ms, 90):6.2f} ms")
    fps = labels.fps or 15.0
    print(f"  {'sum of the p50s':24s}     {total:6.2f} ms  -> {1000 / fps / total:.2f}x real time at {fps:g} fps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
