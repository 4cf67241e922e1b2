"""Synthetic bead-grid phantom images with a known distortion (tests, benchmarks, practice).

The image is rendered by inverse mapping, as an image intensifier forms it: every pixel of the
distorted frame is traced back through the known distortion to the phantom plane, where the
bead pattern is evaluated (2x2 supersampled). So bead centres land where the distortion puts
them, with the slight elliptical deformation a real pincushion gives.

Distortion model (ground truth), about a distortion centre c in pixels, radius in units of R:
- pincushion: r_d = r * (1 + k1 r^2 + k2 r^4)
- S-distortion (the Earth's field twisting the electron optics): angle_d = angle + s * r^2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from calibration.transforms import Similarity2D


@dataclass(frozen=True)
class PhantomSpec:
    size: tuple[int, int] = (512, 512)  # (height, width)
    pitch_mm: float = 5.0
    spacing_mm: float = 0.25  # mm per pixel at the distortion centre (the truth the test checks)
    grid_angle_deg: float = 4.0
    grid_offset_mm: tuple[float, float] = (1.1, -0.7)
    bead_radius_mm: float = 1.0
    bead_polarity: str = "bright"  # bright or dark beads
    distortion_center_xy: tuple[float, float] | None = None  # default: a bit off the frame centre
    distortion_radius_px: float | None = None  # R: default the FOV radius
    k1: float = 0.06  # pincushion at r = R: +6 % radially
    k2: float = 0.01
    s_twist_rad: float = 0.04  # S-distortion at r = R (2.3 degrees)
    fov_center_xy: tuple[float, float] | None = None  # None: no circular FOV (flat panel)
    fov_radius_px: float | None = None
    background: float = 0.55  # fraction of full scale inside the field
    contrast: float = 0.3  # bead contrast, fraction of full scale
    vignetting: float = 0.15  # brightness fall-off at the rim of the field
    noise_sigma: float = 0.01  # fraction of full scale
    missing_fraction: float = 0.03
    grid_radius_mm: float | None = None  # beads only within this radius (a small phantom)
    dtype: str = "uint16"
    seed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PhantomTruth:
    """Known geometry of a rendered phantom."""

    spec: PhantomSpec
    center_xy: tuple[float, float]
    radius_px: float
    phantom_from_undistorted: Similarity2D  # undistorted px -> phantom mm (lattice frame)
    missing: frozenset[tuple[int, int]]

    def distorted_from_undistorted(self, xy: np.ndarray) -> np.ndarray:
        s = self.spec
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        dx, dy = pts[:, 0] - self.center_xy[0], pts[:, 1] - self.center_xy[1]
        r = np.hypot(dx, dy) / self.radius_px
        ang = np.arctan2(dy, dx) + s.s_twist_rad * r**2
        rd = r * (1 + s.k1 * r**2 + s.k2 * r**4) * self.radius_px
        return np.column_stack([self.center_xy[0] + rd * np.cos(ang), self.center_xy[1] + rd * np.sin(ang)])

    def undistorted_from_distorted(self, xy: np.ndarray) -> np.ndarray:
        s = self.spec
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        dx, dy = pts[:, 0] - self.center_xy[0], pts[:, 1] - self.center_xy[1]
        rd = np.hypot(dx, dy) / self.radius_px
        r = rd.copy()
        for _ in range(20):  # Newton on r (1 + k1 r^2 + k2 r^4) = rd; monotone for small k
            g = r * (1 + s.k1 * r**2 + s.k2 * r**4) - rd
            dg = 1 + 3 * s.k1 * r**2 + 5 * s.k2 * r**4
            r -= g / dg
            if float(np.max(np.abs(g))) < 1e-12:
                break
        ang = np.arctan2(dy, dx) - s.s_twist_rad * r**2
        ru = r * self.radius_px
        return np.column_stack([self.center_xy[0] + ru * np.cos(ang), self.center_xy[1] + ru * np.sin(ang)])

    def phantom_from_distorted(self, xy: np.ndarray) -> np.ndarray:
        return self.phantom_from_undistorted(self.undistorted_from_distorted(xy))

    def distorted_from_phantom(self, xy_mm: np.ndarray) -> np.ndarray:
        return self.distorted_from_undistorted(self.phantom_from_undistorted.inverse()(xy_mm))

    def spacing_mm_at(self, xy: tuple[float, float], eps: float = 0.5) -> float:
        """True local pixel spacing (mm/px, the area scale) at distorted pixel xy: the square
        root of the Jacobian determinant of phantom_from_distorted, by central differences."""
        ref = np.array([xy], dtype=np.float64)
        f = self.phantom_from_distorted
        jac = np.column_stack([(f(ref + [eps, 0]) - f(ref - [eps, 0]))[0], (f(ref + [0, eps]) - f(ref - [0, eps]))[0]])
        return math.sqrt(abs(np.linalg.det(jac / (2 * eps))))


def _phantom_mm_grid(truth: PhantomTruth, hs: int, ws: int, ss: int, k: int = 4) -> np.ndarray:
    """Phantom-plane mm of every supersampled pixel, (hs*ws, 2). The map is smooth, so it is
    traced exactly on every k-th sample and interpolated bilinearly in between (error
    ~1e-3 px), which makes rendering ~10x cheaper."""
    import cv2

    hc, wc = -(-hs // k), -(-ws // k)
    # coarse sample j sits at fine index j*k + (k-1)/2: cv2.resize's pixel-centre convention
    cy = np.arange(hc) * k + (k - 1) / 2
    cx = np.arange(wc) * k + (k - 1) / 2
    xx, yy = np.meshgrid((cx + 0.5) / ss - 0.5, (cy + 0.5) / ss - 0.5)
    coarse = truth.phantom_from_distorted(np.column_stack([xx.ravel(), yy.ravel()]))
    planes = [
        cv2.resize(coarse[:, c].reshape(hc, wc), (wc * k, hc * k), interpolation=cv2.INTER_LINEAR)[:hs, :ws]
        for c in (0, 1)
    ]
    return np.column_stack([planes[0].ravel(), planes[1].ravel()])


def render_phantom(spec: PhantomSpec) -> tuple[np.ndarray, PhantomTruth]:
    h, w = spec.size
    rng = np.random.default_rng(spec.seed)
    center = spec.distortion_center_xy or (w / 2 - 0.5 + 0.03 * w, h / 2 - 0.5 - 0.02 * h)
    radius = spec.distortion_radius_px or spec.fov_radius_px or 0.5 * math.hypot(h, w)
    # undistorted px -> phantom mm: scale = spacing, rotated by the grid angle, offset
    ang = math.radians(spec.grid_angle_deg)
    to_mm = Similarity2D(spec.spacing_mm, ang, (0.0, 0.0))
    t = -to_mm(np.array([center]))[0] + np.asarray(spec.grid_offset_mm)
    phantom_from_undistorted = Similarity2D(spec.spacing_mm, ang, (float(t[0]), float(t[1])))
    # a few beads missing (broken phantom, dirt), never the central one
    extent = int(math.ceil(math.hypot(h, w) * spec.spacing_mm / spec.pitch_mm)) + 2
    idx = [(i, j) for i in range(-extent, extent + 1) for j in range(-extent, extent + 1)]
    missing = {ij for ij in idx if rng.random() < spec.missing_fraction and ij != (0, 0)}
    truth = PhantomTruth(spec, center, radius, phantom_from_undistorted, frozenset(missing))

    ss = 2  # supersampling
    mm = _phantom_mm_grid(truth, h * ss, w * ss, ss)
    gi = np.round(mm / spec.pitch_mm)
    d = np.hypot(mm[:, 0] - gi[:, 0] * spec.pitch_mm, mm[:, 1] - gi[:, 1] * spec.pitch_mm)
    # soft bead edge over ~1 undistorted pixel
    bead = np.clip((spec.bead_radius_mm - d) / spec.spacing_mm + 0.5, 0.0, 1.0)
    if missing:
        miss = np.array(sorted(missing))
        key = gi[:, 0] * 100003 + gi[:, 1]
        bead[np.isin(key, miss[:, 0] * 100003 + miss[:, 1])] = 0.0
    if spec.grid_radius_mm is not None:
        bead[np.hypot(gi[:, 0], gi[:, 1]) * spec.pitch_mm > spec.grid_radius_mm] = 0.0
    bead = bead.reshape(h, ss, w, ss).mean(axis=(1, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sign = 1.0 if spec.bead_polarity == "bright" else -1.0
    img = spec.background + sign * spec.contrast * bead
    if spec.fov_center_xy is not None and spec.fov_radius_px is not None:
        fr = np.hypot(xx - spec.fov_center_xy[0], yy - spec.fov_center_xy[1]) / spec.fov_radius_px
        img *= 1.0 - spec.vignetting * np.clip(fr, 0, 1) ** 2
        img = np.where(fr <= 1.0, img, 0.02)
        # soft rim of the field (the intensifier's output phosphor edge)
        img = np.where(np.abs(fr - 1.0) * spec.fov_radius_px < 1.0, 0.5 * img + 0.01, img)
    img = img + rng.normal(0.0, spec.noise_sigma, img.shape)
    full = 255.0 if spec.dtype == "uint8" else 4095.0  # 12 bits stored in uint16
    out = np.clip(np.round(img * full), 0, full).astype(spec.dtype)
    return out, truth


@dataclass(frozen=True)
class FluoroSpec:
    """A crude lateral-spine fluoroscopy frame: enough anatomy for the intensity heuristics."""

    size: tuple[int, int] = (512, 512)  # (height, width)
    polarity: str = "bone_bright"  # or "bone_dark" (raw intensifier output: bone dark)
    fov: bool = True  # circular intensifier field, black outside
    fov_radius_frac: float = 0.48  # of the shorter side; > 0.5 cuts the circle at the edges
    text: tuple[tuple[str, tuple[int, int]], ...] = (
        ("L3 LAT 72kV 2.1mA", (10, 24)),
        ("12:41:07", (10, 500)),
    )
    text_value: float = 1.0  # fraction of full scale (1.0: saturated white)
    noise_sigma: float = 0.015
    cement: bool = True
    needle: bool = True
    dtype: str = "uint8"
    seed: int = 0


@dataclass(frozen=True)
class FluoroTruth:
    fov: tuple[float, float, float] | None
    text: np.ndarray  # bool: pixels drawn by the text overlay
    cement: np.ndarray  # bool
    needle: np.ndarray  # bool


def render_fluoro(spec: FluoroSpec) -> tuple[np.ndarray, FluoroTruth]:
    import cv2

    h, w = spec.size
    rng = np.random.default_rng(spec.seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = w / 2 + rng.uniform(-0.03, 0.03) * w, h / 2 + rng.uniform(-0.03, 0.03) * h
    mu = 1.2 + 0.5 * np.cos((xx - cx) / w * np.pi)  # soft tissue, thicker in the middle
    # vertebral bodies stacked vertically, discs between; the central one is treated
    vb_w, vb_h = 0.30 * w, 0.17 * h
    for k in (-2, -1, 0, 1, 2):
        yc = cy + k * (vb_h * 1.35)
        body = (np.abs(xx - cx) / (vb_w / 2)) ** 4 + (np.abs(yy - yc) / (vb_h / 2)) ** 4 <= 1
        rim = body & ~((np.abs(xx - cx) / (vb_w / 2 - 4)) ** 4 + (np.abs(yy - yc) / (vb_h / 2 - 4)) ** 4 <= 1)
        mu += 0.9 * body + 0.5 * rim
        # pedicle / posterior elements to the right
        post = ((xx - cx - 0.26 * w) / (0.08 * w)) ** 2 + ((yy - yc) / (0.05 * h)) ** 2 <= 1
        mu += 0.6 * post
    cement = ((xx - cx + 0.02 * w) / (0.06 * w)) ** 2 + ((yy - cy) / (0.045 * h)) ** 2 <= 1
    cement &= spec.cement
    needle = np.zeros((h, w), dtype=np.uint8)
    if spec.needle:
        cv2.line(needle, (int(cx), int(cy)), (int(cx + 0.45 * w), int(cy - 0.2 * h)), 1, 5)
    needle_b = needle.astype(bool)
    mu += 3.0 * cement + 4.0 * needle_b
    mu = cv2.GaussianBlur(mu.astype(np.float32), (0, 0), 1.5).astype(np.float64)
    raw = np.exp(-0.8 * (mu - 1.0))  # transmitted fraction (bone dark)
    if spec.fov:
        r = spec.fov_radius_frac * min(h, w)
        fcx, fcy = w / 2 - 0.5, h / 2 - 0.5
        fr = np.hypot(xx - fcx, yy - fcy) / r
        raw *= 1.0 - 0.2 * np.clip(fr, 0, 1) ** 2
        fov: tuple[float, float, float] | None = (fcx, fcy, r)
    else:
        fr = np.zeros((h, w))
        fov = None
    shown = np.clip(raw, 0, 1) ** 0.6
    if spec.polarity == "bone_bright":
        shown = 1.0 - shown
    elif spec.polarity != "bone_dark":
        raise ValueError(f"polarity must be bone_bright or bone_dark, got {spec.polarity!r}")
    shown = 0.1 + 0.8 * shown + rng.normal(0.0, spec.noise_sigma, (h, w))
    if spec.fov:
        shown = np.where(fr <= 1.0, shown, 0.0)
    text = np.zeros((h, w), dtype=np.uint8)
    scale = max(h, w) / 512
    for s, (x, y) in spec.text:
        org = (int(x * scale), int(y * scale))
        cv2.putText(
            text,
            s,
            org,
            cv2.FONT_HERSHEY_SIMPLEX,
            0.6 * scale,
            255,
            max(1, round(scale)),
            cv2.LINE_AA,
        )
    alpha = text.astype(np.float64) / 255.0
    shown = shown * (1 - alpha) + spec.text_value * alpha
    full = 255.0 if spec.dtype == "uint8" else 4095.0
    out = np.clip(np.round(shown * full), 0, full).astype(spec.dtype)
    return out, FluoroTruth(fov, alpha > 0.5, cement, needle_b)
