"""A simulated C-arm: a lateral vertebra, a transpedicular needle and cement that spreads,
leaking posteriorly or into a vein at a chosen frame. numpy + OpenCV only; for demos,
tests and benchmarks where no recorded loop is at hand. Frames are paced like a grabber."""

from __future__ import annotations

import time

import cv2
import numpy as np

from guidance.capture.base import Frame, Source, SourceInfo

# grey levels (8 bit) of the simulated scene: soft tissue, bone, needle, cement
TISSUE, BONE, NEEDLE, CEMENT = 20, 120, 180, 240


def draw_scene(
    size: tuple[int, int],
    t: int,
    leak: str | None,
    onset: int,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Frame `t` of the scene -> (uint8 image, uint8 label map 0..3). The posterior side is
    the right of the image; the needle enters from there."""
    h, w = size
    image = np.full((h, w), TISSUE, np.uint8)
    labels = np.zeros((h, w), np.uint8)
    x0, x1, y0, y1 = int(0.30 * w), int(0.62 * w), int(0.32 * h), int(0.68 * h)
    cv2.rectangle(image, (x0, y0), (x1, y1), BONE, -1)
    cv2.rectangle(labels, (x0, y0), (x1, y1), 1, -1)
    cy = (y0 + y1) // 2
    # cement grows inside the body from the needle tip
    radius = max(1, int(min(h, w) * min(0.14, 0.09 + 0.002 * t)))
    tip = (int(0.46 * w), cy)
    cv2.circle(image, tip, radius, CEMENT, -1)
    cv2.circle(labels, tip, radius, 2, -1)
    if leak and t >= onset:
        grow = 1 + (t - onset)
        if leak == "posterior":  # behind the posterior wall (image right), in the canal
            centre = (x1 + max(3, int(0.06 * w)), int(0.40 * h))
        else:  # venous: in front of the anterior wall
            centre = (x0 - max(6, int(0.10 * w)), int(0.60 * h))
        r = max(1, int(min(h, w) * min(0.06, 0.01 * grow)))
        cv2.circle(image, centre, r, CEMENT, -1)
        cv2.circle(labels, centre, r, 2, -1)
    # needle from the posterior (right) edge to the tip, drawn last: it occludes
    cv2.line(image, (w - 1, int(0.75 * h)), tip, NEEDLE, max(1, w // 64))
    cv2.line(labels, (w - 1, int(0.75 * h)), tip, 3, max(1, w // 64))
    if rng is not None:
        noise = rng.normal(0.0, 3.0, (h, w))
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return image, labels


class SimulatedSource(Source):
    def __init__(
        self,
        size: tuple[int, int] = (256, 256),
        fps: float = 15.0,
        count: int = 60,
        leak: str | None = "posterior",
        onset: int = 20,
        pace: bool = True,
        pixel_spacing_mm: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(lossy=pace)
        self.size, self.fps, self.count, self.leak, self.onset = size, fps, count, leak, onset
        self.pace = pace
        self.seed = seed
        self.pixel_spacing_mm = pixel_spacing_mm

    def connect(self) -> SourceInfo:
        self.connected = True
        self.info = SourceInfo(
            name=f"simulated:{self.leak or 'clean'}",
            kind="simulated",
            fps=self.fps,
            width=self.size[1],
            height=self.size[0],
            pixel_spacing_mm=self.pixel_spacing_mm,
            posterior_side="right",
            view="lateral",  # the scene it draws is a lateral one
            frame_count=self.count,
        )
        return self.info

    def _run(self) -> None:
        rng = np.random.default_rng(self.seed)
        period_ns = int(1e9 / self.fps) if self.pace else 0
        t0 = time.monotonic_ns()
        for index in range(self.count):
            image, _ = draw_scene(self.size, index, self.leak, self.onset, rng)
            if period_ns:
                due = t0 + index * period_ns
                while (now := time.monotonic_ns()) < due:
                    if self._stop.wait((due - now) / 1e9):
                        return
            if self._stop.is_set():
                return
            self._deliver(Frame(index, time.monotonic_ns(), image, self.info))
