"""The service with distortion correction, on loops the simulator sees through its own
image-intensifier distortion (a benchmark and a check, not a test: it prints, never asserts).

For each loop: a bead grid is imaged through the very distortion the loop was rendered with and
calibrated (`calibration.fit.calibrate_image`), then the loop runs through `guidance run`'s
pipeline three ways, side by side: corrected at the model's working size (the default),
corrected at full size (`calibration.full_resolution`), and not corrected (the simulator's pixel
spacing only). It prints which alerts each raised at which frame, against the labelled onsets,
and the stage medians.

    python bench/calibrated_service.py [--loops 4] [--size 1024] [--frames 60]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.fit import calibrate_image  # noqa: E402
from calibration.phantom import PhantomSpec, render_phantom  # noqa: E402
from calibration.store import write_angulation  # noqa: E402
from guidance.pipeline import run_replay  # noqa: E402
from guidance.settings import Settings  # noqa: E402
from models.sim.loop import LoopConfig, SimulatedLoop, simulate, write_loop  # noqa: E402

STAGES = ("calibrate", "preprocess", "inference", "track")


def calibrate_like(loop: SimulatedLoop, path: Path) -> dict:
    """A bead grid (pitch 24 px) imaged through the loop's own distortion and field, calibrated."""
    size = loop.frames.shape[1:]
    pitch_mm = round(24 * loop.spacing_mm, 2)
    ideal, _ = render_phantom(
        PhantomSpec(
            size=(size[1], size[0]),
            k1=0.0,
            k2=0.0,
            s_twist_rad=0.0,
            spacing_mm=loop.spacing_mm,
            pitch_mm=pitch_mm,
            missing_fraction=0.0,
            noise_sigma=0.0,
        )
    )
    map_x, map_y = loop.warp.maps
    raw = cv2.remap(ideal.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    raw = np.where(loop.warp.fov, raw, 80.0) + np.random.default_rng(1).normal(0, 40, raw.shape)
    entry = calibrate_image(np.clip(raw, 0, 4095).astype(np.uint16), pitch_mm).entry
    write_angulation(path, "lateral", entry)
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    ways = {
        "working size": lambda cal, loop: {"file": str(cal)},
        "full size": lambda cal, loop: {"file": str(cal), "full_resolution": True},
        "no correction": lambda cal, loop: {"pixel_spacing_mm": loop.spacing_mm},
    }
    with tempfile.TemporaryDirectory(prefix="bench-calsvc-") as tmp:
        for i in range(args.loops):
            leak = ("posterior", "venous")[i % 2]
            config = LoopConfig(
                height=args.size,
                width=args.size,
                fps=15,
                frames=args.frames,
                leaks=frozenset({leak}),
                imaging={
                    "distortion_k": 0.07,
                    "s_distortion": 0.025,
                    "fov": (args.size / 2 + 7, args.size / 2 - 5, 0.47 * args.size),
                },
            )
            loop = simulate(np.random.default_rng(args.seed + i), config)
            calib = Path(tmp) / f"calib{i}.json"
            entry = calibrate_like(loop, calib)
            path = write_loop(loop, Path(tmp), f"loop{i}", "mp4", with_masks=False)
            onsets = ", ".join(f"{e['kind']} {e['onset_frame']}" for e in loop.events) or "none"
            print(
                f"loop {i} ({args.size} px, {args.frames} frames): labelled onsets {onsets}; spacing "
                f"{loop.spacing_mm:.4f} mm, calibrated {entry['pixel_spacing_mm']:.4f} mm, residual RMS "
                f"{entry['residuals']['rms_px']:.3f} px"
            )
            for name, calibration in ways.items():
                settings = Settings().replace(
                    alerts={"address": None}, capture={"pace": False}, calibration=calibration(calib, loop)
                )
                summary = run_replay(path, settings)
                raised = [f"{m['kind']} {m['frame']}" for m in summary.alerts if m["state"] == "raised"]
                medians = {k: float(np.median(v)) for k, v in summary.latency_ms.items() if k in STAGES and v}
                print(
                    f"  {name:14s} raised: {', '.join(raised) or 'nothing':40s} p50 ms: "
                    + ", ".join(f"{k} {medians[k]:.2f}" for k in STAGES if k in medians)
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
