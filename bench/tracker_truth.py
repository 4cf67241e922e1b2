"""The tracker alone against the simulator's truth (a benchmark: it measures, never asserts).

Simulates lateral loops with `models.sim` (clean, posterior, venous, both), letterboxes their
ground-truth label masks to the model's input size as a perfect segmenter would deliver them,
runs the pure tracker frame by frame and scores its raised alerts with the spec's rules
(../shared/spec/recorded-loops.md: detected when raised within ceil(1 s * fps) frames after
the onset; a raise of a kind the loop lacks, or before its onset, is a false alert). It
isolates the tracker's geometry and temporal logic from the model's errors.

    python3 bench/tracker_truth.py --loops 16 --seed 5 --size 512
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guidance.segmentation.preprocess import LetterboxGeometry, letterbox_labels  # noqa: E402
from guidance.tracking import TrackerConfig, TrackerState, TrackGeometry, track  # noqa: E402

MIXES = [set(), {"posterior"}, {"venous"}, {"posterior", "venous"}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", type=int, default=16)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=75)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--model-size", type=int, default=256)
    p.add_argument("--save", type=Path, default=None, help="pickle the loops' labels here")
    p.add_argument("--only", type=int, nargs="*", default=None, help="score only these loops")
    p.add_argument(
        "--side",
        choices=("label", "auto"),
        default="auto",
        help="posterior side from the labels, or inferred from the needle",
    )
    args = p.parse_args(argv)

    from models.sim import LoopConfig, simulate  # the simulator is a dev/bench dependency

    rng = np.random.default_rng(args.seed)
    detected = events = false = 0
    delays: list[int] = []
    track_ms: list[float] = []
    saved = []
    for j in range(args.loops):
        leaks = frozenset(MIXES[j % len(MIXES)])
        loop = simulate(
            rng,
            LoopConfig(
                height=args.size, width=args.size, fps=args.fps, frames=args.frames, view="lateral", leaks=leaks
            ),
        )
        if args.only is not None and j not in args.only:
            continue
        if args.save:
            saved.append(
                {
                    "labels": loop.labels,
                    "spacing": loop.spacing_mm,
                    "fps": loop.fps,
                    "side": loop.posterior_side,
                    "events": loop.events,
                    "extra": loop.extravertebral_mm2,
                }
            )
        g = LetterboxGeometry.fit(args.size, args.size, args.model_size)
        geo = TrackGeometry(
            frame_per_px=1 / g.scale,
            mm_per_frame_px=loop.spacing_mm,
            posterior_side=loop.posterior_side if args.side == "label" else None,
        )
        state, raised = TrackerState(), {}
        for i, labels in enumerate(loop.labels):
            small = g.crop(letterbox_labels(labels, g))
            t0 = time.perf_counter()
            status, state = track(small, geo, state, TrackerConfig())
            track_ms.append((time.perf_counter() - t0) * 1e3)
            for kind, what in status.events:
                if what == "raised":
                    raised.setdefault(kind, i)
        onsets = {e["kind"]: e["onset_frame"] for e in loop.events}
        window = math.ceil(loop.fps)
        notes = []
        for kind in ("posterior", "venous"):
            f = raised.get(kind)
            if kind in onsets:
                events += 1
                ok = f is not None and onsets[kind] <= f <= onsets[kind] + window
                detected += ok
                false += f is not None and f < onsets[kind]
                delays += [f - onsets[kind]] if ok else []
                notes.append(f"{kind} onset {onsets[kind]} raised {f} {'ok' if ok else 'MISSED'}")
            elif f is not None:
                false += 1
                notes.append(f"{kind} FALSE at {f}")
        print(
            f"loop {j:2d} ({loop.posterior_side:5s}, {loop.spacing_mm:.3f} mm/px): "
            + ("; ".join(notes) or "clean, nothing raised")
        )
    if args.save:
        import pickle

        args.save.write_bytes(pickle.dumps(saved))
    minutes = args.loops * args.frames / args.fps / 60
    print(
        f"\ndetected {detected}/{events} events, delay median "
        f"{np.median(delays) if delays else float('nan'):.0f} frames (max "
        f"{max(delays) if delays else float('nan')}), {false} false alerts "
        f"({false / minutes:.2f}/min), tracker {np.median(track_ms):.2f} ms/frame median"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
