"""Bead (or hole) grid phantom: find the beads and give each its integer lattice coordinates.

Detection: grid pitch in pixels from the autocorrelation of the field centre; bead polarity
from the skew of the high-passed image; background removed by a morphological opening wider
than a bead; beads are the compact components above a noise-aware threshold; centres are
response-weighted centroids. Beads cut by the edge of the field are dropped (their centroid
would be biased).

Indexing: grown outward from the bead nearest the field centre, where distortion is least.
Each neighbour's position is predicted from a local affine fit of the beads already indexed
around it, so the growth follows pincushion stretch and S-twist and steps around missing beads.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import cv2
import numpy as np

from calibration.intensity import circle_mask, estimate_fov, to_float_grey
from guidance.errors import CalibrationError


@dataclass(frozen=True)
class BeadDetection:
    xy: np.ndarray  # (N, 2) bead centres, distorted pixels
    polarity: str  # "bright" or "dark"
    pitch_px: float  # lattice pitch near the field centre
    fov: tuple[float, float, float] | None  # (cx, cy, r) of the raw frame, None if none
    center_xy: tuple[float, float]  # where indexing starts (field centre, else frame centre)
    dropped_at_edge: int


def estimate_pitch_px(grey: np.ndarray, center_xy: tuple[float, float], half: int) -> float:
    """Distance to the nearest off-centre peak of the autocorrelation of a central patch."""
    h, w = grey.shape
    cx, cy = round(center_xy[0]), round(center_xy[1])
    half = max(16, min(half, cx, cy, w - 1 - cx, h - 1 - cy))
    patch = grey[cy - half : cy + half, cx - half : cx + half].astype(np.float64)
    patch = patch - cv2.GaussianBlur(patch, (0, 0), half / 4)
    win = np.outer(np.hanning(patch.shape[0]), np.hanning(patch.shape[1]))
    spec = np.fft.fft2(patch * win)
    ac = np.fft.fftshift(np.real(np.fft.ifft2(np.abs(spec) ** 2)))
    n = ac.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    rr = np.hypot(xx - n // 2, yy - n // 2)
    # radial max profile: falls off the central lobe, rises to the first lattice ring
    rmax = int(n // 2 * 0.7)
    prof = np.array([ac[(rr >= r - 0.5) & (rr < r + 0.5)].max() for r in range(rmax)])
    r = 1
    while r < rmax - 1 and prof[r + 1] <= prof[r]:
        r += 1
    if r >= rmax - 2:
        raise CalibrationError("no regular bead grid found: the image shows no periodic pattern")
    # the nearest strong peak: farther lattice peaks can be as high (a grid that is not
    # exactly periodic under the window), the nearest one is the pitch
    rest = prof[r:]
    strong = 0.6 * float(rest.max()) if rest.max() > 0 else 0.0
    peak = next(
        (k for k in range(r + 1, rmax - 1) if prof[k] >= prof[k - 1] and prof[k] >= prof[k + 1] and prof[k] >= strong),
        None,
    )
    if peak is None or prof[peak] <= 0:
        raise CalibrationError("no regular bead grid found: the image shows no periodic pattern")
    ring = (rr > peak - 1.5) & (rr < peak + 1.5)
    k = np.argmax(np.where(ring, ac, -np.inf))
    py, px = divmod(int(k), n)
    return float(math.hypot(px - n // 2, py - n // 2))


def detect_beads(
    image: np.ndarray,
    polarity: str = "auto",
    fov: tuple[float, float, float] | None | str = "auto",
) -> BeadDetection:
    grey = to_float_grey(image)
    h, w = grey.shape
    if fov == "auto":
        fov = estimate_fov(grey)
    if fov is not None:
        cx, cy, rf = fov  # type: ignore[misc]
        center = (cx, cy)
        inside = circle_mask(grey.shape, cx, cy, rf - 2.0)
        fill = float(np.median(grey[inside])) if inside.any() else float(grey.mean())
        work = np.where(inside, grey, fill).astype(np.float32)
        half = int(0.6 * rf)
    else:
        center = ((w - 1) / 2, (h - 1) / 2)
        inside = np.ones(grey.shape, dtype=bool)
        work = grey
        half = int(0.3 * min(h, w))
    if not inside.any():
        raise CalibrationError("the field of view is empty")
    pitch = estimate_pitch_px(work, center, min(half, 128))
    if pitch < 6.0:
        raise CalibrationError(f"bead grid pitch of {pitch:.1f} px is too fine to locate beads (need >= 6 px)")
    # polarity: beads are a minority of the field, so the tail of the high-passed image
    # points toward the beads
    hp = work - cv2.GaussianBlur(work, (0, 0), 2 * pitch)
    vals = hp[inside]
    p1, p50, p99 = np.percentile(vals, [1, 50, 99])
    if polarity == "auto":
        polarity = "bright" if (p99 - p50) >= (p50 - p1) else "dark"
    if polarity not in ("bright", "dark"):
        raise CalibrationError(f"bead polarity must be bright, dark or auto, got {polarity!r}")
    img = work if polarity == "bright" else -work
    k = int(round(pitch)) | 1
    opened = cv2.morphologyEx(img, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    resp = cv2.GaussianBlur(img - opened, (0, 0), max(0.7, pitch / 16))
    resp[~inside] = 0.0
    rv = resp[inside]
    # background level and noise from the lower part of the distribution: beads may cover
    # up to about half the field, so the median can already sit on the beads
    p5, p25, top = (float(v) for v in np.percentile(rv, [5, 25, 99.5]))
    noise = max((p25 - p5) / 0.97, 1e-6)  # Gaussian: p25 - p5 = 0.97 sigma
    thr = max(p25 + 0.35 * (top - p25), p25 + 4.0 * noise)
    cand = (resp > thr).astype(np.uint8)
    n, labels, st, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)
    if n <= 1:
        raise CalibrationError("no beads found in the image")
    areas = st[1:, cv2.CC_STAT_AREA].astype(np.float64)
    med_area = float(np.median(areas[areas >= 3])) if (areas >= 3).any() else 0.0
    weights = np.clip(resp - 0.5 * thr, 0.0, None)
    centres: list[tuple[float, float]] = []
    dropped = 0
    for i in range(1, n):
        x, y, bw, bh, area = st[i]
        if area < max(3, 0.3 * med_area) or area > 3.0 * med_area:
            continue
        if bw > 2.5 * bh or bh > 2.5 * bw:
            continue
        x0, y0 = max(0, x - 2), max(0, y - 2)
        x1, y1 = min(w, x + bw + 2), min(h, y + bh + 2)
        own = labels[y0:y1, x0:x1] == i
        own = cv2.dilate(own.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        wgt = np.where(own, weights[y0:y1, x0:x1], 0.0)
        m = cv2.moments(wgt.astype(np.float64))
        if m["m00"] <= 0:
            continue
        bx, by = x0 + m["m10"] / m["m00"], y0 + m["m01"] / m["m00"]
        req = math.sqrt(area / math.pi)
        if fov is not None:
            if math.hypot(bx - fov[0], by - fov[1]) + req + 3.0 > fov[2]:  # type: ignore[index]
                dropped += 1
                continue
        elif x <= 1 or y <= 1 or x + bw >= w - 1 or y + bh >= h - 1:
            dropped += 1
            continue
        centres.append((bx, by))
    xy = np.array(centres, dtype=np.float64).reshape(-1, 2)
    return BeadDetection(xy, polarity, pitch, fov, center, dropped)  # type: ignore[arg-type]


def _seed_vectors(xy: np.ndarray, seed: int, pitch: float) -> np.ndarray:
    """Lattice vectors (2x2, columns a1 a2) near the seed, for a square grid."""
    near = np.nonzero(np.hypot(*(xy - xy[seed]).T) < 4.0 * pitch)[0]
    vecs = []
    for i in near:
        d = xy - xy[i]
        dist = np.hypot(d[:, 0], d[:, 1])
        nb = np.nonzero((dist > 0.6 * pitch) & (dist < 1.4 * pitch))[0]
        vecs.extend(d[nb])
    if len(vecs) < 4:
        raise CalibrationError("too few beads near the field centre to find the grid directions")
    v = np.array(vecs)
    ang = np.arctan2(v[:, 1], v[:, 0])
    theta = float(np.angle(np.mean(np.exp(4j * ang)))) / 4  # square lattice: fold by 90 degrees
    length = float(np.median(np.hypot(v[:, 0], v[:, 1])))
    a1 = length * np.array([math.cos(theta), math.sin(theta)])
    a2 = length * np.array([-math.sin(theta), math.cos(theta)])
    return np.column_stack([a1, a2])


def index_grid(
    xy: np.ndarray, center_xy: tuple[float, float], pitch_px: float, tolerance: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Integer lattice coordinates for the beads reachable from the central one.

    Returns (ij (M, 2) int, index (M,) into xy). Beads not on the grid are left out.
    """
    if len(xy) < 5:
        raise CalibrationError(f"too few beads found ({len(xy)}) to index a grid")
    seed = int(np.argmin(np.hypot(xy[:, 0] - center_xy[0], xy[:, 1] - center_xy[1])))
    basis = _seed_vectors(xy, seed, pitch_px)
    assigned: dict[tuple[int, int], int] = {(0, 0): seed}
    taken = {seed}
    heap: list[tuple[float, int, int]] = [(0.0, 0, 0)]
    steps = ((1, 0), (-1, 0), (0, 1), (0, -1))
    while heap:
        _, i, j = heapq.heappop(heap)
        p = xy[assigned[(i, j)]]
        for di, dj in steps:
            target = (i + di, j + dj)
            if target in assigned:
                continue
            pred = _predict(assigned, xy, target)
            if pred is None:
                pred = p + basis @ np.array([di, dj], dtype=np.float64)
            local = _local_pitch(assigned, xy, (i, j), pitch_px)
            dist = np.hypot(xy[:, 0] - pred[0], xy[:, 1] - pred[1])
            k = int(np.argmin(dist))
            if dist[k] > tolerance * local or k in taken:
                continue
            assigned[target] = k
            taken.add(k)
            heapq.heappush(heap, (math.hypot(*(xy[k] - xy[seed])), *target))
    ij = np.array(list(assigned.keys()), dtype=np.int64)
    idx = np.array(list(assigned.values()), dtype=np.int64)
    return ij, idx


def _predict(assigned: dict, xy: np.ndarray, target: tuple[int, int]) -> np.ndarray | None:
    """Local affine (i, j) -> (x, y) from indexed beads within 2 lattice steps of target."""
    ti, tj = target
    rows, pts = [], []
    for di in range(-2, 3):
        for dj in range(-2, 3):
            k = assigned.get((ti + di, tj + dj))
            if k is not None:
                rows.append((ti + di, tj + dj, 1.0))
                pts.append(xy[k])
    if len(rows) < 4:
        return None
    a = np.array(rows, dtype=np.float64)
    c = a[:, :2] - a[:, :2].mean(axis=0)
    if np.linalg.det(c.T @ c) < 1e-6:  # all on one line: the affine fit is degenerate
        return None
    coef, *_ = np.linalg.lstsq(a, np.array(pts), rcond=None)
    return np.array([ti, tj, 1.0]) @ coef


def _local_pitch(assigned: dict, xy: np.ndarray, ij: tuple[int, int], fallback: float) -> float:
    i, j = ij
    p = xy[assigned[ij]]
    ds = [
        float(np.hypot(*(xy[assigned[n]] - p)))
        for n in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1))
        if n in assigned
    ]
    return float(np.median(ds)) if ds else fallback
