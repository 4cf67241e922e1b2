"""Training and validation frames from the simulator, preprocessed exactly as the runtime does.

No torch here: the same frames feed training (`models.train`) and the ONNX evaluation
(`models.evaluate`). Train and validation sets come from disjoint seed ranges.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guidance.segmentation.preprocess import (
    DEFAULT_NORMALIZATION,
    letterbox_labels,
    letterbox_shares,
    majority_labels,
    preprocess,
)
from models.sim.loop import LEAK_KINDS, LoopConfig, simulate

FRAMES_PER_LOOP = 10
MIX = [frozenset(), frozenset({"posterior"}), frozenset({"venous"}), frozenset(LEAK_KINDS)]


@dataclass
class FrameSet:
    images: np.ndarray  # [n, size, size] float16, normalised model input
    labels: np.ndarray  # [n, size, size] uint8 at model resolution
    seeds: list[int]
    # [n, classes, size, size] uint8: each class's share of the pixel (letterbox_shares) in
    # 255ths, the soft training targets; None unless asked for (4x the labels' memory)
    shares: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def first_frames(self, which: slice = slice(None)) -> np.ndarray:
        """For every frame (of `which`), the first frame of its loop (frames are stored loop by
        loop)."""
        first = (np.arange(len(self))[which] // FRAMES_PER_LOOP) * FRAMES_PER_LOOP
        return self.images[first]


def loop_fps(rng: np.random.Generator, frames: int) -> float:
    """A frame rate that spreads `frames` over 0.7-10 s of injection: the frames a model sees
    beside its reference (the first) come at any phase of breathing, as in a loop of several
    seconds, not from the same half second."""
    return float(np.clip(frames / rng.uniform(0.7, 10.0), 1.0, 15.0))


def _loop_config(rng: np.random.Generator, big: bool, spread: bool) -> LoopConfig:
    h = int(rng.choice([512, 768, 1024])) if big else int(rng.integers(20, 49) * 16)
    aspect = float(rng.choice([1.0, 1.0, 4 / 3, 5 / 4, 3 / 4]))
    w = max(64, int(h * aspect) // 16 * 16)
    return LoopConfig(
        height=h,
        width=w,
        frames=FRAMES_PER_LOOP,
        fps=loop_fps(rng, FRAMES_PER_LOOP) if spread else 15.0,
        view=str(rng.choice(["lateral", "ap"], p=[0.75, 0.25])),
        leaks=MIX[int(rng.choice(4, p=[0.25, 0.3, 0.3, 0.15]))],
        bit_depth=int(rng.choice([8, 8, 12, 16])),
        jpeg=bool(rng.random() < 0.4),
    )


# How frame-resolution class maps become the model plane's labels (written into the model's
# metadata): each model pixel takes the class covering most of its block of frame pixels;
# soft targets are those shares themselves. Models up to 0.3.0 were trained on
# cv2.INTER_NEAREST's top-left sample instead.
LABEL_RULE = "area_majority"
SOFT_LABEL_RULE = "area_shares"


def render_seed(args: tuple[int, int, bool, bool, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One simulated loop -> its frames preprocessed to the model plane, their labels and,
    with `with_shares`, their class shares (uint8, 255ths). `spread`: its frames span
    0.7-10 s (loop_fps); otherwise 15 fps (0.7 s)."""
    seed, size, big, spread, with_shares = args
    rng = np.random.default_rng(seed)
    loop = simulate(rng, _loop_config(rng, big, spread))
    images, labels, shares = [], [], []
    for frame, lab in zip(loop.frames, loop.labels, strict=True):
        x, geometry = preprocess(frame, size, DEFAULT_NORMALIZATION)
        images.append(x[0, 0].astype(np.float16))
        if with_shares:  # the labels are the shares' majority: take both from one pass
            share = letterbox_shares(lab, geometry)
            labels.append(majority_labels(share, lab.dtype))
            shares.append(np.rint(share * 255).astype(np.uint8))
        else:
            labels.append(letterbox_labels(lab, geometry))
    return np.stack(images), np.stack(labels), np.stack(shares) if with_shares else None


def renders_big(seed: int, big_share: float) -> bool:
    """Whether a loop is rendered at 512-1024 px (the held-out test's sizes) rather than
    320-768 px: a fixed share of the seeds, picked by a hash of the seed (not its random
    stream, so every other draw of the loop stays what it was)."""
    return (seed * 2654435761) % 1000 < round(big_share * 1000)


def build(
    seeds: range | list[int],
    size: int = 256,
    workers: int = 2,
    progress: bool = True,
    spread: bool = False,
    big_share: float = 0.0,
    shares: bool = False,
) -> FrameSet:
    """`big_share` of the loops at 512-1024 px (renders_big; 1.0: all), the rest 320-768 px;
    `shares`: keep the class shares too (soft targets)."""
    jobs = [(int(s), size, renders_big(int(s), big_share), spread, shares) for s in seeds]
    results = []
    with mp.get_context("spawn").Pool(workers) as pool:
        for k, res in enumerate(pool.imap(render_seed, jobs, chunksize=4)):
            results.append(res)
            if progress and (k + 1) % 50 == 0:
                print(f"  rendered {k + 1}/{len(jobs)} loops", flush=True)
    images = np.concatenate([r[0] for r in results])
    labels = np.concatenate([r[1] for r in results])
    kept = np.concatenate([r[2] for r in results]) if shares else None
    return FrameSet(images, labels, [int(s) for s in seeds], kept)


def build_cached(
    seeds: range,
    size: int,
    workers: int,
    cache: Path | None,
    progress: bool = True,
    spread: bool = False,
    big_share: float = 0.0,
    shares: bool = False,
) -> FrameSet:
    """build(), kept in `cache` (a folder) as one .npz per seed range, size, time spread and
    share of big frames, so runs that differ only in training settings render their data once."""
    if cache is None:
        return build(seeds, size, workers=workers, progress=progress, spread=spread, big_share=big_share, shares=shares)
    # "arealabels": labels by area majority (letterbox_labels), older caches sampled nearest;
    # "_shares": the class shares too
    kind = (
        f"{size}_{FRAMES_PER_LOOP}_arealabels"
        + ("_shares" if shares else "")
        + ("_spread" if spread else "")
        + (f"_big{big_share:g}" if big_share else "")
    )
    path = cache / f"frames_{seeds.start}_{seeds.stop}_{kind}.npz"
    # the same range, or a longer one from the same first seed: its first frames are these
    for found in sorted(cache.glob(f"frames_{seeds.start}_*_{kind}.npz")):
        if int(found.name.split("_")[2]) >= seeds.stop:
            n = len(seeds) * FRAMES_PER_LOOP
            with np.load(found) as data:
                kept = data["shares"][:n] if shares else None
                return FrameSet(data["images"][:n], data["labels"][:n], [int(s) for s in seeds], kept)
    frames = build(seeds, size, workers=workers, progress=progress, spread=spread, big_share=big_share, shares=shares)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    arrays = {"images": frames.images, "labels": frames.labels}
    if shares:
        arrays["shares"] = frames.shares
    np.savez(partial, **arrays)
    partial.replace(path)  # whole or absent: a killed run leaves no half file behind
    return frames


__all__ = ["FrameSet", "build", "build_cached"]
