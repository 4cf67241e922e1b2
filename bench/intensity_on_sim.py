"""How the intensity heuristics do on the team simulator's frames (models.sim).

    python bench/intensity_on_sim.py [--n 40] [--size 256]

Polarity: frames with bone-dark/bone-bright forced, views and bit depths mixed, fields random.
Field of view: frames with a known forced field (2 in 3) or none (1 in 3); a field counts as
found when centre and radius are within 2 px.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.intensity import detect_polarity, estimate_fov  # noqa: E402
from models.sim.loop import LoopConfig, simulate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    s = args.size
    ok = 0
    wrong = []
    for seed in range(args.n):
        rng = np.random.default_rng(seed)
        bone_dark = bool(seed % 2)
        cfg = LoopConfig(
            height=s,
            width=s,
            frames=3,
            imaging={"bone_dark": bone_dark},
            view="lateral" if seed % 3 else "ap",
            bit_depth=8 if seed % 4 else 12,
            leaks=frozenset({"posterior"}) if seed % 5 == 0 else frozenset(),
        )
        got = detect_polarity(simulate(rng, cfg).frames[-1])
        truth = "bone_dark" if bone_dark else "bone_bright"
        ok += got == truth
        if got != truth:
            wrong.append(seed)
    print(f"polarity: {ok}/{args.n} right (wrong seeds: {wrong})")
    found = n_fov = invented = n_none = 0
    errors = []
    for seed in range(args.n):
        rng = np.random.default_rng(100 + seed)
        radius = rng.uniform(0.44, 0.62) * s
        fov = (s / 2 + rng.uniform(-8, 8), s / 2 + rng.uniform(-8, 8), radius) if seed % 3 else None
        cfg = LoopConfig(
            height=s,
            width=s,
            frames=2,
            imaging={"fov": fov, "fov_fill": 0.0} if fov else {"fov": None},
        )
        est = estimate_fov(simulate(rng, cfg).frames[-1])
        if fov is None:
            n_none += 1
            invented += est is not None
            continue
        n_fov += 1
        if est is not None:
            c, r = float(np.hypot(est[0] - fov[0], est[1] - fov[1])), est[2] - fov[2]
            errors.append((c, r))
            found += c < 2.0 and abs(r) < 2.0
    e = np.array(errors) if errors else np.zeros((0, 2))
    print(
        f"field of view: {found}/{n_fov} found within 2 px, {invented}/{n_none} invented; "
        f"centre error median {np.median(e[:, 0]):.2f} px, radius error median "
        f"{np.median(e[:, 1]):+.2f} px"
    )
    from calibration.intensity import text_mask

    taken = crit = 0
    share = []
    for seed in range(args.n):
        rng = np.random.default_rng(500 + seed)
        cfg = LoopConfig(
            height=s, width=s, frames=2, leaks=frozenset({"posterior", "venous"}) if seed % 2 else frozenset()
        )
        loop = simulate(rng, cfg)
        m = text_mask(loop.frames[-1])
        c = (loop.labels[-1] == 2) | (loop.labels[-1] == 3)
        taken += int((m & c).sum())
        crit += int(c.sum())
        share.append(float(m.mean()))
    print(
        f"text mask: {taken} of {crit} cement/needle pixels masked; mask covers "
        f"median {100 * np.median(share):.2f} %, max {100 * max(share):.2f} % of the frame"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
