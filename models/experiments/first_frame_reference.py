"""Experiment, not shipped: does a second input channel holding the loop's first frame help
cement Dice? The same rendered data, the same crops and steps, LeakUNet with one input channel
(the frame) against two (the frame and the loop's first frame); validation Dice at model
resolution, over all frames and over frames 1-9 (frame 0 is its own reference).

    python -m models.experiments.first_frame_reference ref 2000 runs/exp_ref.json [TRAIN_LOOPS VAL_LOOPS]
    python -m models.experiments.first_frame_reference single 2000 runs/exp_single.json

The runtime does not take two-channel models yet (models/CARD.md, "next step").
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from models import dataset
from models.train import (
    TRAIN_SEED_BASE,
    VAL_SEED_BASE,
    ConvBNReLU,
    LeakUNet,
    augment,
    crop_windows,
    dice_loss,
    dice_per_class,
)

CROP, BATCH = 128, 16


def first_frames(frames: dataset.FrameSet) -> np.ndarray:
    """For every frame, the first frame of its loop (frames are stored loop by loop)."""
    per_loop = dataset.FRAMES_PER_LOOP
    return frames.images[(np.arange(len(frames)) // per_loop) * per_loop]


def build_model(channels: int) -> LeakUNet:
    model = LeakUNet()
    if channels == 2:  # the two layers that read the image take the reference too
        model.full = ConvBNReLU(2, 8)
        model.stem[0] = ConvBNReLU(2, 16, stride=2)
    return model


def sample(images, refs, labels, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops as models.train samples them, the same crop of the reference stacked as a second
    channel."""
    windows = crop_windows(labels, BATCH, CROP, gen)
    xs = [torch.stack([images[i, rows, cols], refs[i, rows, cols]]) for i, rows, cols in windows]
    ys = [labels[i, rows, cols] for i, rows, cols in windows]
    return augment(torch.stack(xs).float(), torch.stack(ys), gen)  # same flips and gain for both


def main(argv: list[str]) -> int:
    mode, steps, out = argv[0], int(argv[1]), argv[2]
    train_loops, val_loops = (int(argv[3]), int(argv[4])) if len(argv) >= 5 else (300, 40)
    if mode not in ("ref", "single"):
        raise SystemExit("mode must be 'ref' or 'single'")
    channels = 2 if mode == "ref" else 1
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = dataset.build(range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + train_loops), 256, workers=1, progress=False)
    val = dataset.build(range(VAL_SEED_BASE, VAL_SEED_BASE + val_loops), 256, workers=1, progress=False)
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    refs = torch.from_numpy(first_frames(train))
    freq = np.bincount(train.labels.ravel(), minlength=4).astype(np.float64)
    weights = torch.tensor((freq.sum() / np.maximum(freq, 1)) ** 0.35, dtype=torch.float32)
    weights = weights / weights.mean()
    model = build_model(channels)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    t0 = time.monotonic()
    model.train()
    for _ in range(steps):
        x, y = sample(images, refs, labels, gen)
        logits = model(x[:, :channels])
        loss = F.cross_entropy(logits, y.long(), weight=weights) + dice_loss(logits, y.long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    val_refs = first_frames(val)
    preds = []
    with torch.no_grad():
        for i in range(0, len(val), 32):
            x = np.stack([val.images[i : i + 32], val_refs[i : i + 32]], 1).astype(np.float32)
            preds.append(model(torch.from_numpy(x[:, :channels])).argmax(1).numpy().astype(np.uint8))
    pred = np.concatenate(preds)
    later = np.arange(len(val)) % dataset.FRAMES_PER_LOOP > 0
    result = {
        "mode": mode,
        "steps": steps,
        "train_s": round(time.monotonic() - t0),
        "val_dice": dice_per_class(pred, val.labels),
        "val_dice_frames_1_to_9": dice_per_class(pred[later], val.labels[later]),
    }
    with open(out, "w") as fh:
        json.dump(result, fh)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
