"""A coarse, heavily randomised projected anatomy of one treated vertebra and its neighbours.

Everything is built on the *scene grid*: a 2-D pixel grid at the detector's pixel spacing
(mm per pixel at the level of the treated vertebra), a margin larger than the output frame
so breathing motion can move it. Each structure contributes a line integral of attenuation
(mu [1/mm] x path length [mm]) through the patient along the beam, so the image follows
Beer-Lambert: I = I0 * exp(-sum(mu_i * t_i)).

Lateral view: image x runs anterior -> posterior (posterior on the `posterior_side`), image
y runs cranial -> caudal, the beam goes left -> right through the patient. The AP view uses
the same machinery with a different layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# Linear attenuation coefficients (1/mm) near 60 keV effective; ratios matter, not values.
MU_SOFT = 0.020
MU_CORTICAL = 0.055
MU_TRABECULAR = 0.028
MU_CEMENT = 0.12  # PMMA loaded with barium sulphate or zirconia: denser than cortex
MU_STEEL = 0.9
MU_AIR_MINUS_SOFT = -0.019


@dataclass
class Grid:
    """Scene grid: pixel (col, row) <-> mm (x, y) with the treated body's centre at `origin`."""

    height: int
    width: int
    spacing_mm: float
    origin_xy: tuple[float, float]  # pixel coordinates of the mm origin
    x_sign: int = 1  # -1 mirrors anatomy built with posterior = +x onto the image's left

    def mm_coords(self) -> tuple[np.ndarray, np.ndarray]:
        ys, xs = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        x_mm = (xs - self.origin_xy[0]) * self.spacing_mm * self.x_sign
        return x_mm, (ys - self.origin_xy[1]) * self.spacing_mm

    def px_from_mm(self, x_mm: float, y_mm: float) -> tuple[float, float]:
        return (self.x_sign * x_mm / self.spacing_mm + self.origin_xy[0], y_mm / self.spacing_mm + self.origin_xy[1])


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma_px: float, anisotropy: float = 1.0
) -> np.ndarray:
    """Zero-mean, unit-std band-limited noise (Gaussian-filtered white noise). Broad noise is
    made on a coarser grid and resized up: the same statistics at a fraction of the cost."""
    factor = max(1, int(min(sigma_px, sigma_px * anisotropy) / 3))
    small = shape if factor == 1 else (max(2, shape[0] // factor + 1), max(2, shape[1] // factor + 1))
    field_ = rng.standard_normal(small).astype(np.float32)
    sx = max(0.3, sigma_px / factor)
    sy = max(0.3, sigma_px * anisotropy / factor)
    field_ = cv2.GaussianBlur(field_, (0, 0), sigmaX=sx, sigmaY=sy)
    if factor > 1:
        field_ = cv2.resize(field_, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    field_ -= float(field_.mean())
    std = float(field_.std()) or 1.0
    return field_ / std


def window(x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float) -> tuple[slice, slice] | None:
    """Rows and columns of a regular mm grid within `radius` of (cx, cy): lets a local
    structure be drawn on its own bounding box instead of the whole frame."""
    xs, ys = x[0], y[:, 0]
    cols = np.flatnonzero(np.abs(xs - cx) <= radius)
    rows = np.flatnonzero(np.abs(ys - cy) <= radius)
    if cols.size == 0 or rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def rounded_box_mask(
    x: np.ndarray, y: np.ndarray, half_w: float, half_h: float, radius: float, top_profile: np.ndarray | None = None
) -> np.ndarray:
    """Rounded rectangle centred on 0 in (already rotated) body coordinates; `top_profile`
    lowers the cranial endplate per column (compression fracture)."""
    top = -half_h + (top_profile if top_profile is not None else 0.0)
    qx = np.abs(x) - (half_w - radius)
    cy = (top + half_h) / 2.0  # vertical centre moves when the top is lowered
    hh = (half_h - top) / 2.0
    qy = np.abs(y - cy) - (hh - radius)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    return outside - radius  # signed distance (mm): < 0 inside


def ellipse_sdf(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float = 0.0
) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipse; good enough for soft masks and rims."""
    c, s = np.cos(angle), np.sin(angle)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return (r - 1.0) * min(a, b)


def rim_chord(sdf: np.ndarray, shell_mm: float, tangent_mm: float) -> np.ndarray:
    """Projected cortical shell: a beam that grazes the shell travels a long way through it."""
    depth = np.clip(-sdf, 0, None)
    inside = (sdf < 0).astype(np.float32)
    graze = np.clip(1.0 - depth / max(shell_mm, 1e-3), 0, 1)
    return inside * (shell_mm * 2.0 + tangent_mm * np.sqrt(graze))


@dataclass
class Vertebra:
    """The treated vertebral body in its own frame (mm; +x posterior, +y caudal)."""

    half_depth: float
    half_height: float
    corner: float
    width_lr: float
    tilt: float
    anterior_collapse: float  # 0..0.45 of the height lost anteriorly
    centre_collapse: float
    defect_y: tuple[float, float] | None  # posterior-wall defect span (mm, body frame)
    lesions: list[tuple[float, float, float, float, float]] = field(default_factory=list)

    def to_body(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.tilt), np.sin(self.tilt)
        return x * c + y * s, -x * s + y * c

    def from_body(self, u: float, v: float) -> tuple[float, float]:
        c, s = np.cos(self.tilt), np.sin(self.tilt)
        return u * c - v * s, u * s + v * c

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = self.to_body(x, y)
        # height lost: linear toward the anterior wall plus a central endplate dip
        frac = np.clip((self.half_depth - u) / (2 * self.half_depth), 0, 1)
        dip = np.exp(-((u / (0.5 * self.half_depth)) ** 2))
        lower = 2 * self.half_height * (self.anterior_collapse * frac + self.centre_collapse * dip)
        return rounded_box_mask(u, v, self.half_depth, self.half_height, self.corner, lower)

    def behind_posterior_wall(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True beyond the line of the posterior wall (u > half_depth), on the canal's side."""
        u, _ = self.to_body(x, y)
        return u > self.half_depth
