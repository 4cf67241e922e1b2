"""Write the bundled demo loops (models/demo/), made by the simulator.

    python -m models.make_demos            # rewrites models/demo/

Each demo is a 512 x 512 lateral loop at 15 fps, 6 s: `posterior_leak`, `venous_leak` and
`clean`. Seeds are searched deterministically from a fixed start until a loop shows its leak
in the middle third (so the run shows the injection before and after the onset).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.sim.loop import LoopConfig, simulate, write_loop

DEMO_DIR = Path(__file__).with_name("demo")
DEMOS = {
    "posterior_leak": frozenset({"posterior"}),
    "venous_leak": frozenset({"venous"}),
    "clean": frozenset(),
}
START_SEED = 20_261_129


def find_demo(kind: frozenset[str], frames: int, start: int) -> tuple[int, object]:
    for seed in range(start, start + 200):
        rng = np.random.default_rng(seed)
        loop = simulate(rng, LoopConfig(height=512, width=512, fps=15.0, frames=frames, leaks=kind))
        onsets = {e["kind"]: e["onset_frame"] for e in loop.events}
        if set(onsets) != set(kind):
            continue
        if all(frames // 3 <= f <= 2 * frames // 3 for f in onsets.values()):
            return seed, loop
    raise RuntimeError(f"no demo seed for {sorted(kind)} in 200 tries from {start}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.make_demos", description=__doc__)
    p.add_argument("--out", type=Path, default=DEMO_DIR)
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args(argv)
    frames = int(args.seconds * 15)
    for i, (name, kind) in enumerate(DEMOS.items()):
        seed, loop = find_demo(kind, frames, START_SEED + 1000 * i)
        path = write_loop(loop, args.out, name, "mp4")
        print(f"{path}: seed {seed}, events {loop.events}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
