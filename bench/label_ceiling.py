"""What the training labels' downsampling costs before any model is trained (a measurement,
not a test): held-out simulated class maps are taken down to the model plane by a rule,
brought back to frame resolution as the evaluation brings a model's output back (each class
plane resized bilinearly, argmax), and compared with the frame-resolution truth. The Dice
printed is that of a perfect model of those labels: the ceiling the rule puts on a trained one.
Hard rules give one class per model pixel (one-hot planes); soft targets give each class's
share of the pixel (letterbox_shares), which a perfect model outputs as its class planes.

    python bench/label_ceiling.py [--loops 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guidance.segmentation.preprocess import (  # noqa: E402
    CLASS_NAMES,
    LetterboxGeometry,
    letterbox_labels,
    letterbox_shares,
)
from models.evaluate import TEST_SEED_BASE, held_out_config, labels_at_frame_resolution  # noqa: E402
from models.sim import simulate  # noqa: E402


def nearest(labels: np.ndarray, g: LetterboxGeometry) -> np.ndarray:
    """The rule the models up to 0.3.0 were trained with: cv2.INTER_NEAREST (top-left sample),
    padded into the model plane as letterbox_labels pads."""
    h, w = g.inner_shape
    out = np.zeros((g.size, g.size), labels.dtype)
    out[g.pad_y : g.pad_y + h, g.pad_x : g.pad_x + w] = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
    return out


def back_to_frame(plane: np.ndarray, g: LetterboxGeometry) -> np.ndarray:
    """A model-plane class map read as a perfect model's logits (one-hot), brought back to the
    frame by the evaluation's own code."""
    one_hot = (np.arange(len(CLASS_NAMES))[:, None, None] == plane).astype(np.float32)
    return labels_at_frame_resolution(one_hot, g)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", type=int, default=16, help="held-out loops (the seeds models.evaluate uses)")
    p.add_argument("--size", type=int, default=256, help="model plane side")
    args = p.parse_args(argv)
    rules = {
        "INTER_NEAREST (to 0.3.0)": lambda t, g: back_to_frame(nearest(t, g), g),
        "area majority (letterbox_labels)": lambda t, g: back_to_frame(letterbox_labels(t, g), g),
        # stored as training stores them (255ths); their log as logits changes nothing here
        "area shares (soft targets)": lambda t, g: labels_at_frame_resolution(
            np.rint(letterbox_shares(t, g) * 255).astype(np.float32), g
        ),
    }
    inter = {r: np.zeros(len(CLASS_NAMES)) for r in rules}
    total = {r: np.zeros(len(CLASS_NAMES)) for r in rules}
    for seed in range(TEST_SEED_BASE, TEST_SEED_BASE + args.loops):
        rng = np.random.default_rng(seed)
        loop = simulate(rng, held_out_config(rng, {}, 0))
        for truth in loop.labels:
            g = LetterboxGeometry.fit(truth.shape[0], truth.shape[1], args.size)
            for name, rule in rules.items():
                pred = rule(truth, g)
                for c in range(1, len(CLASS_NAMES)):
                    inter[name][c] += np.count_nonzero((pred == c) & (truth == c))
                    total[name][c] += np.count_nonzero(pred == c) + np.count_nonzero(truth == c)
    print(f"Dice of a perfect model of the labels, {args.loops} held-out loops, frames 512-1024 px:")
    for name in rules:
        dice = {
            CLASS_NAMES[c]: round(float(2 * inter[name][c] / total[name][c]), 4) for c in range(1, len(CLASS_NAMES))
        }
        print(f"  {name:34s} {dice}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
