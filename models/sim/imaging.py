"""Image formation: line integrals on the scene grid -> what a C-arm's video output shows.

Beer-Lambert transmission under automatic exposure control, scatter, quantum (Poisson)
noise at a dose drawn per loop, detector blur, vignetting, the image intensifier's
pincushion and S-distortion with its circular field of view, log display with a random
window and gamma, bone-bright or bone-dark polarity, burned-in text, quantisation.
The same geometric warps are applied to the label map (nearest neighbour).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Imaging:
    """One loop's imaging chain (all random choices drawn once, so frames are consistent)."""

    height: int
    width: int
    photons: float  # mean detected quanta per pixel: sets quantum noise
    scatter_fraction: float
    blur_px: float
    vignetting: float
    gamma: float
    window: tuple[float, float]  # display window in percentiles of the log image
    bone_dark: bool
    distortion_k: float  # pincushion strength (relative displacement at the field edge)
    s_distortion: float  # radians of twist at the field edge
    fov: tuple[float, float, float] | None  # centre x, centre y, radius (px) of the II field
    fov_fill: float
    text: list[tuple[str, tuple[int, int], float, int]]
    text_value: float
    bit_depth: int
    jpeg_quality: int | None

    @classmethod
    def sample(
        cls, rng: np.random.Generator, height: int, width: int, bit_depth: int = 8, jpeg: bool = False
    ) -> Imaging:
        image_intensifier = rng.random() < 0.6
        fov = None
        if image_intensifier and rng.random() < 0.85:
            r = min(height, width) * rng.uniform(0.44, 0.62)
            fov = (width / 2 + rng.uniform(-0.03, 0.03) * width, height / 2 + rng.uniform(-0.03, 0.03) * height, r)
        text = []
        if rng.random() < 0.7:
            for _ in range(rng.integers(1, 6)):
                words = "".join(
                    rng.choice(list(string.ascii_uppercase + string.digits + " :./-"), size=rng.integers(4, 18))
                )
                pos = (
                    int(rng.uniform(0.01, 0.75) * width),
                    int(rng.choice([rng.uniform(0.03, 0.12), rng.uniform(0.88, 0.98)]) * height),
                )
                text.append((words, pos, float(rng.uniform(0.4, 1.4) * width / 700), int(rng.integers(1, 3))))
        return cls(
            height=height,
            width=width,
            photons=float(math.exp(rng.uniform(math.log(60), math.log(3000)))),
            scatter_fraction=float(rng.uniform(0.1, 0.6)),
            blur_px=float(rng.uniform(0.3, 1.6) * max(height, width) / 1024 + 0.2),
            vignetting=float(rng.uniform(0.0, 0.35)),
            gamma=float(rng.uniform(0.6, 1.6)),
            window=(float(rng.uniform(0.0, 3.0)), float(rng.uniform(97.0, 100.0))),
            bone_dark=bool(rng.random() < 0.5),
            distortion_k=float(rng.uniform(0.01, 0.08)) if image_intensifier else 0.0,
            s_distortion=float(rng.uniform(-0.03, 0.03)) if image_intensifier else 0.0,
            fov=fov,
            fov_fill=float(rng.choice([0.0, rng.uniform(0.0, 0.15), 1.0], p=[0.7, 0.2, 0.1])),
            text=text,
            text_value=float(rng.choice([1.0, 0.0, rng.uniform(0.6, 1.0)], p=[0.6, 0.2, 0.2])),
            bit_depth=bit_depth,
            jpeg_quality=int(rng.uniform(35, 95)) if jpeg else None,
        )

    # -------------------------------------------------------------- geometry
    def distortion_maps(self) -> tuple[np.ndarray, np.ndarray] | None:
        """For each output (distorted) pixel, where it samples the ideal image."""
        if self.distortion_k == 0.0 and self.s_distortion == 0.0:
            return None
        h, w = self.height, self.width
        cx, cy = w / 2.0, h / 2.0
        rmax = math.hypot(cx, cy)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        dx, dy = xs - cx, ys - cy
        r = np.sqrt(dx * dx + dy * dy) / rmax
        # pincushion: the output at radius r shows ideal content from a smaller radius
        scale = 1.0 / (1.0 + self.distortion_k * r * r)
        theta = self.s_distortion * r
        c, s = np.cos(theta), np.sin(theta)
        sx = cx + (dx * c - dy * s) * scale
        sy = cy + (dx * s + dy * c) * scale
        return sx.astype(np.float32), sy.astype(np.float32)

    def fov_mask(self) -> np.ndarray | None:
        if self.fov is None:
            return None
        cx, cy, r = self.fov
        ys, xs = np.ogrid[0 : self.height, 0 : self.width]
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r

    # -------------------------------------------------------------- intensity
    def form(
        self,
        integral: np.ndarray,
        rng: np.random.Generator,
        maps: tuple[np.ndarray, np.ndarray] | None,
        fov: np.ndarray | None,
        bone: np.ndarray | None = None,
    ) -> np.ndarray:
        """Line integral on the output grid (ideal geometry) -> displayed frame (uint8/uint16).

        `bone` (output grid, after distortion): the vertebral bodies without cement or needle.
        The display window never clips them: a C-arm's exposure and display curve are set so
        the operator sees the bone the cement goes into; cement, denser, may clip above it."""
        ref = float(np.median(integral))  # automatic exposure control
        quanta = self.photons * np.exp(-(integral - ref))
        small = cv2.resize(quanta, (max(8, self.width // 16), max(8, self.height // 16)), interpolation=cv2.INTER_AREA)
        scatter = cv2.resize(
            cv2.GaussianBlur(small, (0, 0), 3.0), (self.width, self.height), interpolation=cv2.INTER_LINEAR
        )
        quanta = quanta + self.scatter_fraction * scatter
        if self.vignetting:
            ys, xs = np.ogrid[0 : self.height, 0 : self.width]
            rr = ((xs - self.width / 2) ** 2 + (ys - self.height / 2) ** 2) / (
                (self.width / 2) ** 2 + (self.height / 2) ** 2
            )
            quanta = quanta * (1.0 - self.vignetting * rr).astype(np.float32)
        # quantum noise: Poisson, by its normal approximation above a few quanta
        noisy = quanta + np.sqrt(np.maximum(quanta, 1e-3)) * rng.standard_normal(quanta.shape).astype(np.float32)
        noisy = np.maximum(noisy, 0.5)
        noisy = cv2.GaussianBlur(noisy, (0, 0), self.blur_px)
        log_image = -np.log(noisy / self.photons)  # bright = more attenuation (bone bright)
        if maps is not None:
            log_image = cv2.remap(log_image, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        sample = log_image[fov] if fov is not None else log_image
        sample = sample[:: max(1, sample.size // 50000)] if sample.ndim == 1 else sample[::4, ::4]
        lo, hi = np.percentile(sample, self.window)
        if bone is not None and np.count_nonzero(bone) > 16:
            bone_lo, bone_hi = np.percentile(log_image[bone], [0.5, 99.5])
            hi = max(hi, bone_hi + 0.08 * max(bone_hi - lo, 1e-6))  # headroom above the bone
            lo = min(lo, bone_lo - 0.02 * max(hi - bone_lo, 1e-6))
        unit = np.clip((log_image - lo) / max(hi - lo, 1e-6), 0, 1) ** self.gamma
        if self.bone_dark:
            unit = 1.0 - unit
        if fov is not None:
            unit = np.where(fov, unit, self.fov_fill)
        if self.text:  # burned-in annotations (OpenCV draws text on 8-bit planes only)
            alpha = np.zeros((self.height, self.width), np.uint8)
            for words, pos, scale, thick in self.text:
                cv2.putText(alpha, words, pos, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
            a = alpha.astype(np.float32) / 255.0
            unit = unit * (1 - a) + self.text_value * a
        top = (1 << self.bit_depth) - 1
        frame = np.round(unit * top)
        frame = frame.astype(np.uint8 if self.bit_depth <= 8 else np.uint16)
        if self.jpeg_quality is not None and frame.dtype == np.uint8:
            ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            frame = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
        return frame

    def warp_labels(
        self, labels: np.ndarray, maps: tuple[np.ndarray, np.ndarray] | None, fov: np.ndarray | None
    ) -> np.ndarray:
        if maps is not None:
            labels = cv2.remap(labels, maps[0], maps[1], cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
        if fov is not None:
            labels = np.where(fov, labels, 0).astype(np.uint8)
        return labels
