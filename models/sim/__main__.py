"""python -m models.sim OUTDIR --count N --seed S [options]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from models.sim.loop import FORMATS, LEAK_KINDS, LoopConfig, frame_count_for, simulate, write_loop

LEAK_MIXES = {
    "none": [frozenset()],
    "posterior": [frozenset({"posterior"})],
    "venous": [frozenset({"venous"})],
    "both": [frozenset(LEAK_KINDS)],
}
# default mix: a quarter clean, the rest posterior, venous or both
MIX = [frozenset(), frozenset({"posterior"}), frozenset({"venous"}), frozenset(LEAK_KINDS)]
MIX_P = [0.25, 0.3, 0.3, 0.15]


def parse_size(text: str) -> tuple[int, int]:
    try:
        if "x" in text:
            w, h = (int(v) for v in text.lower().split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or WxH") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.sim", description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--count", type=int, default=1, help="number of loops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=parse_size, default=None, help="N or WxH (default: random 512..1024)")
    p.add_argument("--fps", type=float, default=None, help="default: random of 7.5, 15, 30")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--leaks", choices=["mix", *LEAK_MIXES], default="mix")
    p.add_argument("--view", choices=["lateral", "ap", "mix"], default="lateral", help="mix: a quarter of the loops AP")
    p.add_argument("--format", choices=[*FORMATS, "mix"], default="mp4")
    p.add_argument("--bit-depth", type=int, default=8, help="8..16 (mp4/avi store 8)")
    p.add_argument("--no-masks", action="store_true")
    p.add_argument("--prefix", default="sim")
    args = p.parse_args(argv)

    problems = []
    if args.count < 1:
        problems.append(f"--count {args.count}: must be at least 1")
    if args.seconds <= 0 or args.seconds > 600:
        problems.append(f"--seconds {args.seconds}: must be within (0, 600]")
    if args.size and not all(64 <= v <= 4096 for v in args.size):
        problems.append(f"--size {args.size[1]}x{args.size[0]}: each side must be within 64..4096 px")
    if args.fps is not None and not 1 <= args.fps <= 120:
        problems.append(f"--fps {args.fps}: must be within 1..120")
    if not 8 <= args.bit_depth <= 16:
        problems.append(f"--bit-depth {args.bit_depth}: must be within 8..16")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        problems.append(f"{args.out_dir}: exists and is not a folder")
    if problems:
        print(f"models.sim: error: {problems[0]}", file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed)
    for k in range(args.count):
        leaks = LEAK_MIXES[args.leaks][0] if args.leaks != "mix" else MIX[rng.choice(len(MIX), p=MIX_P)]
        if args.size:
            h, w = args.size
        else:
            h = int(rng.choice([512, 768, 1024]))
            w = int(rng.choice([h, int(h * 4 / 3) // 8 * 8]))
        fps = args.fps or float(rng.choice([7.5, 15.0, 30.0]))
        fmt = args.format if args.format != "mix" else str(rng.choice(FORMATS))
        view = args.view if args.view != "mix" else str(rng.choice(["lateral", "ap"], p=[0.75, 0.25]))
        config = LoopConfig(
            height=h,
            width=w,
            fps=fps,
            frames=frame_count_for(args.seconds, fps),
            leaks=leaks,
            view=view,
            bit_depth=args.bit_depth if fmt in ("dcm", "png") else 8,
        )
        loop = simulate(np.random.default_rng([args.seed, k]), config)
        name = f"{args.prefix}_{args.seed}_{k:04d}"
        path = write_loop(loop, args.out_dir, name, fmt, with_masks=not args.no_masks)
        kinds = ",".join(f"{e['kind']}@{e['onset_frame']}" for e in loop.events) or "clean"
        print(f"{path}  {view} {w}x{h} {fps:g} fps {len(loop.frames)} frames  {kinds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
