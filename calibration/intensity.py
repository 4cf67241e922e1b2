"""Intensity side of calibration: field of view, polarity, burned-in text, 8-16 bit -> float.

All functions take a raw frame (H, W) or (H, W, C), any integer depth or float, and never
modify it. They are heuristics built for image-intensifier and flat-panel fluoroscopy:
- the circular field of view of an image intensifier is surrounded by a flat (usually black)
  region, possibly cut by the frame edges, possibly with text in the corners;
- burned-in text is made of small, sharp, extreme-valued glyphs in horizontal rows;
- the vertebra sits near the centre of the field; bone, cement and the needle are the
  high-attenuation minority of the pixels.
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np

Polarity = Literal["bone_bright", "bone_dark"]

# Work at most at this size for whole-frame heuristics: cheap, and the features are large.
_WORK_SIZE = 512
_TEXT_WORK_SIZE = 640  # text strokes of a 1024 px frame stay >= 1 px; ~3x cheaper than full size


def to_float_grey(frame: np.ndarray) -> np.ndarray:
    """Grey float32 copy-free where possible; BGR/BGRA -> grey. Intensity range kept."""
    arr = np.asarray(frame)
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[2] == 1 else cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2GRAY)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D grey or 3-channel frame, got shape {np.shape(frame)}")
    return arr.astype(np.float32, copy=False)


def infer_bits_stored(frame: np.ndarray) -> int:
    """Bit depth of the data: 8 for uint8; for wider integers the smallest of 10/12/14/16 that
    holds the frame's maximum (a lower bound from one frame: pass DICOM BitsStored when known)."""
    arr = np.asarray(frame)
    if arr.dtype == np.uint8:
        return 8
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"bit depth only applies to integer frames, got {arr.dtype}")
    top = int(arr.max()) if arr.size else 0
    for bits in (8, 10, 12, 14, 16):
        if top < (1 << bits):
            return bits
    raise ValueError(f"values up to {top} do not fit 16 bits")


def to_unit_float(frame: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
    """Integer frame of 8-16 stored bits -> float32 grey in [0, 1] (full scale of the stored
    bits; no windowing, so the same anatomy has the same value in every frame)."""
    arr = np.asarray(frame)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(to_float_grey(arr), 0.0, 1.0)
    bits = bits_stored if bits_stored is not None else infer_bits_stored(arr)
    if not 1 <= bits <= 16:
        raise ValueError(f"bits stored must be 1..16, got {bits}")
    return np.clip(to_float_grey(arr) / float((1 << bits) - 1), 0.0, 1.0)


def window_unit(frame: np.ndarray, valid: np.ndarray | None = None, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """Percentile window over the valid pixels -> float32 in [0, 1]; invalid pixels -> 0."""
    grey = to_float_grey(frame)
    values = grey[valid] if valid is not None and valid.any() else grey.ravel()
    lo, hi = np.percentile(values, [low, high])
    span = float(hi - lo) if hi > lo else 1.0
    out = np.clip((grey - lo) / span, 0.0, 1.0).astype(np.float32)
    if valid is not None:
        out[~valid] = 0.0
    return out


def to_bone_bright(unit: np.ndarray, polarity: Polarity) -> np.ndarray:
    """[0, 1] frame -> bone bright (inverted when the source shows bone dark)."""
    if polarity == "bone_bright":
        return unit
    if polarity == "bone_dark":
        return (1.0 - unit).astype(np.float32)
    raise ValueError(f"polarity must be 'bone_bright' or 'bone_dark', got {polarity!r}")


# ----------------------------------------------------------------------------- field of view


def _work_copy(grey: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = grey.shape
    f = max(1.0, max(h, w) / _WORK_SIZE)
    if f == 1.0:
        return grey, 1.0
    small = cv2.resize(grey, (round(w / f), round(h / f)), interpolation=cv2.INTER_AREA)
    return small, f


def _ransac_circle(pts: np.ndarray, tol: float, trials: int = 300, seed: int = 0) -> np.ndarray:
    """Inlier mask of the circle through 3 boundary points that most points agree with
    (outliers: text, anatomy touching the rim, the frame edge)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pts), (trials, 3))
    p1, p2, p3 = pts[idx[:, 0]], pts[idx[:, 1]], pts[idx[:, 2]]
    # circumcentre of each triple
    ax, ay, bx, by, qx, qy = p1[:, 0], p1[:, 1], p2[:, 0], p2[:, 1], p3[:, 0], p3[:, 1]
    d = 2 * (ax * (by - qy) + bx * (qy - ay) + qx * (ay - by))
    ok = np.abs(d) > 1e-6
    a2, b2, q2 = ax**2 + ay**2, bx**2 + by**2, qx**2 + qy**2
    with np.errstate(divide="ignore", invalid="ignore"):
        ux = (a2 * (by - qy) + b2 * (qy - ay) + q2 * (ay - by)) / d
        uy = (a2 * (qx - bx) + b2 * (ax - qx) + q2 * (bx - ax)) / d
    rr = np.hypot(ax - ux, ay - uy)
    best, best_count = None, -1
    sub = pts[:: max(1, len(pts) // 2000)]  # score on at most ~2000 points
    for k in np.flatnonzero(ok):
        res = np.abs(np.hypot(sub[:, 0] - ux[k], sub[:, 1] - uy[k]) - rr[k])
        count = int((res < tol).sum())
        if count > best_count:
            best, best_count = k, count
    if best is None:
        return np.ones(len(pts), dtype=bool)
    res = np.abs(np.hypot(pts[:, 0] - ux[best], pts[:, 1] - uy[best]) - rr[best])
    return res < tol


def fit_circle(
    xy: np.ndarray, iterations: int = 4, ransac_tol: float | None = None
) -> tuple[float, float, float, np.ndarray]:
    """Algebraic (Kasa) circle fit with trimming of outliers -> (cx, cy, r, inlier mask).
    With `ransac_tol` (px), start from a RANSAC consensus: many outliers allowed."""
    pts = np.asarray(xy, dtype=np.float64)
    keep = np.ones(len(pts), dtype=bool)
    if ransac_tol is not None and len(pts) >= 10:
        keep = _ransac_circle(pts, ransac_tol)
        if keep.sum() < 10:
            keep = np.ones(len(pts), dtype=bool)
    cx = cy = r = 0.0
    for _ in range(iterations):
        p = pts[keep]
        a = np.column_stack([p[:, 0], p[:, 1], np.ones(len(p))])
        b = p[:, 0] ** 2 + p[:, 1] ** 2
        sol, *_ = np.linalg.lstsq(a, b, rcond=None)
        cx, cy = sol[0] / 2, sol[1] / 2
        r = math.sqrt(max(sol[2] + cx * cx + cy * cy, 0.0))
        res = np.abs(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - r)
        mad = float(np.median(res[keep])) * 1.4826
        new_keep = res <= max(3.0 * mad, 1.0)
        if new_keep.sum() < 10 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return float(cx), float(cy), float(r), keep


def estimate_fov(frame: np.ndarray) -> tuple[float, float, float] | None:
    """Circular field of view (cx, cy, r) in pixels of `frame`, or None when the frame shows
    no circular field (flat panel, or content reaching every corner).

    The region outside the field is found from the frame corners (flat and alike); the edge of
    the field is the boundary of what differs from it, minus the frame edges; a circle is fitted
    to that boundary with outliers (text, dark anatomy at the edge) trimmed.
    """
    grey = to_float_grey(frame)
    small, f = _work_copy(grey)
    g = cv2.GaussianBlur(small, (0, 0), 1.5)
    h, w = g.shape
    k = max(4, min(h, w) // 20)
    corners = [g[:k, :k], g[:k, -k:], g[-k:, :k], g[-k:, -k:]]
    lo, hi = np.percentile(g, [0.5, 99.5])
    span = float(hi - lo)
    if span <= 0:
        return None
    stats = []
    for c in corners:
        med = float(np.median(c))
        mad = float(np.median(np.abs(c - med))) * 1.4826
        stats.append((med, mad))
    flat = [(m, s) for m, s in stats if s < 0.05 * span]
    if len(flat) < 2:
        return None
    meds = np.array([m for m, _ in flat])
    bg = float(np.median(meds))
    agree = np.abs(meds - bg) < 0.05 * span
    if agree.sum() < 2:
        return None
    sigma = max(float(np.median([s for (m, s), a in zip(flat, agree, strict=True) if a])), 1e-6)
    thr = max(5.0 * sigma, 0.04 * span)
    content = (np.abs(g - bg) > thr).astype(np.uint8)
    # opening drops text strokes and noise; closing bridges dark anatomy touching the edge
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    content = cv2.morphologyEx(content, cv2.MORPH_OPEN, kernel)
    n, labels, cc_stats, _ = cv2.connectedComponentsWithStats(content, connectivity=8)
    if n <= 1:
        return None
    biggest = 1 + int(np.argmax(cc_stats[1:, cv2.CC_STAT_AREA]))
    region = (labels == biggest).astype(np.uint8)
    if region.sum() < 0.1 * h * w:
        return None
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    boundary = np.concatenate([c[:, 0, :] for c in contours]).astype(np.float64)
    on_edge = (boundary[:, 0] <= 1) | (boundary[:, 1] <= 1) | (boundary[:, 0] >= w - 2) | (boundary[:, 1] >= h - 2)
    boundary = boundary[~on_edge]
    if len(boundary) < 30:
        return None
    cx, cy, r, keep = fit_circle(boundary, ransac_tol=1.5)
    # second pass at the half-way level between outside and the inside rim: the edge of the
    # field is soft (blur, vignetting), and the first threshold sits on its outer foot
    ring = circle_mask((h, w), cx, cy, max(r - 3.0, 1.0)) & ~circle_mask((h, w), cx, cy, max(r - 8.0, 0.0))
    ring &= region.astype(bool)
    if ring.sum() > 50:
        level = float(np.median(np.abs(g[ring] - bg)))
        half = (np.abs(g - bg) > 0.5 * level).astype(np.uint8)
        half = cv2.morphologyEx(half, cv2.MORPH_OPEN, kernel)
        near = circle_mask((h, w), cx, cy, r + 6.0) & ~circle_mask((h, w), cx, cy, max(r - 6.0, 0.0))
        edge = cv2.morphologyEx(half, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        ys, xs = np.nonzero(edge & near & (half == 0))  # outside pixels touching the inside
        pts = np.column_stack([xs, ys]).astype(np.float64)
        pts = pts[(pts[:, 0] > 1) & (pts[:, 1] > 1) & (pts[:, 0] < w - 2) & (pts[:, 1] < h - 2)]
        if len(pts) >= 30:
            cx2, cy2, r2, keep2 = fit_circle(pts, ransac_tol=1.5)
            if abs(r2 - r) < 6.0:
                boundary, cx, cy, r, keep = pts, cx2, cy2, r2 - 0.5, keep2
    # an arc too short to pin a circle, or a "circle" that is really a polygon/rectangle
    # (a field much wider than the frame shows only four short corner arcs: enough, as long
    # as the arcs are spread around the circle)
    angles = np.degrees(np.arctan2(boundary[keep, 1] - cy, boundary[keep, 0] - cx)) % 360.0
    covered = np.unique(np.floor(angles / 5.0).astype(int)).size * 5.0
    srt = np.sort(angles)
    largest_gap = float(np.max(np.diff(np.concatenate([srt, srt[:1] + 360.0])))) if srt.size else 360.0
    res = np.abs(np.hypot(boundary[keep, 0] - cx, boundary[keep, 1] - cy) - r)
    if covered < 40.0 or largest_gap > 270.0:
        return None
    if keep.mean() < 0.3 or float(np.median(res)) > 0.02 * r:
        return None
    if r < 0.2 * min(h, w):
        return None
    # a real field edge is a step all along its visible arc: flat background just outside,
    # signal just inside (dark anatomy may touch the rim in places)
    t = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    ct, st_ = np.cos(t), np.sin(t)
    ox, oy = cx + (r + 3) * ct, cy + (r + 3) * st_
    ix, iy = cx + (r - 4) * ct, cy + (r - 4) * st_
    seen = (ox >= 0) & (oy >= 0) & (ox <= w - 1) & (oy <= h - 1)
    if seen.sum() < 20:
        return None
    out_v = g[np.round(oy[seen]).astype(int), np.round(ox[seen]).astype(int)]
    in_v = g[
        np.clip(np.round(iy[seen]), 0, h - 1).astype(int),
        np.clip(np.round(ix[seen]), 0, w - 1).astype(int),
    ]
    flat_outside = float(np.mean(np.abs(out_v - bg) < thr))
    signal_inside = float(np.mean(np.abs(in_v - bg) > thr))
    if flat_outside < 0.8 or signal_inside < 0.3:
        return None
    # the contour of the thresholded region runs through the outermost inside pixels
    r += 0.5
    return (cx + 0.5) * f - 0.5, (cy + 0.5) * f - 0.5, r * f


def circle_mask(shape: tuple[int, ...], cx: float, cy: float, r: float) -> np.ndarray:
    h, w = shape[:2]
    yy, xx = np.ogrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


# ----------------------------------------------------------------------------- polarity


def detect_polarity(frame: np.ndarray, fov_mask: np.ndarray | None = None) -> Polarity:
    """'bone_bright' or 'bone_dark' for a fluoroscopy frame.

    Two cues, each in units of the frame's robust intensity spread:
    - skew of the histogram inside the field: bone, cement and metal are a minority of the
      pixels at the high-attenuation end, so the long tail points toward attenuation;
    - the field centre (where the vertebra is placed) against the rim of the field.
    Burned-in text and everything outside the field are ignored.
    """
    grey = to_float_grey(frame)
    small, f = _work_copy(grey)
    h, w = small.shape
    if fov_mask is None:
        fov = estimate_fov(grey)
        valid = circle_mask(small.shape, *_scaled(fov, f)) if fov else np.ones((h, w), bool)
    else:
        valid = cv2.resize(fov_mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    text = text_mask(small)
    valid &= ~text
    if valid.sum() < 100:
        raise ValueError("too few pixels inside the field of view to tell the polarity")
    ys, xs = np.nonzero(valid)
    cx, cy = xs.mean(), ys.mean()
    radius = math.sqrt(valid.sum() / math.pi)
    # fade out the rim itself: vignetting and the soft edge of the field live there
    dist = np.hypot(xs - cx, ys - cy) / radius
    vals = cv2.GaussianBlur(small, (0, 0), 2.0)[ys, xs]
    inner = vals[dist < 0.9]
    q05, q50, q95 = np.percentile(inner, [5, 50, 95])
    spread = max(float(q95 - q05), 1e-6)
    skew = (q95 + q05 - 2 * q50) / spread  # Bowley-like, in [-1, 1]
    centre = vals[dist < 0.35]
    rim = vals[(dist > 0.6) & (dist < 0.9)]
    contrast = 0.0
    if centre.size > 20 and rim.size > 20:
        contrast = float(np.median(centre) - np.median(rim)) / spread
    score = skew + contrast
    return "bone_bright" if score >= 0 else "bone_dark"


def _scaled(fov: tuple[float, float, float], f: float) -> tuple[float, float, float]:
    cx, cy, r = fov
    return (cx + 0.5) / f - 0.5, (cy + 0.5) / f - 0.5, r / f


# ----------------------------------------------------------------------------- burned-in text


def text_mask(frame: np.ndarray, max_glyph_px: int | None = None) -> np.ndarray:
    """Bool mask (frame's H, W) of burned-in text and small overlay glyphs.

    Burned-in text is drawn onto the image after it was formed: its strokes are thin, sharp,
    flat-valued (no quantum noise, no X-ray blur) and stand far out of the local noise, and
    glyphs sit side by side on a line. A candidate must show all of that. Long lines (the
    needle), blobs (cement, however bright or clipped), noise clusters and isolated dots are
    deliberately left alone: masking cement would hide a leak, which is worse than leaving a
    stray overlay in.
    """
    grey = to_float_grey(frame)
    h, w = grey.shape
    f = max(1.0, max(h, w) / _TEXT_WORK_SIZE)
    small = grey if f == 1.0 else cv2.resize(grey, (round(w / f), round(h / f)), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape
    span = max(float(small.max() - small.min()), 1e-6)
    glyph_max = max_glyph_px if max_glyph_px is not None else max(12, round(0.08 * max(sh, sw)))
    k = max(7, round(9 * max(sh, sw) / 512)) | 1  # strokes thinner than this survive the top-hat
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    mask_small = np.zeros((sh, sw), dtype=bool)
    noise_map = _noise_map(small, span)
    for sign in (1.0, -1.0):
        img = small if sign > 0 else -small
        hat = img - cv2.morphologyEx(img, cv2.MORPH_OPEN, kernel)
        cand = (hat > 0.15 * span).astype(np.uint8)
        n, labels, st, _ = cv2.connectedComponentsWithStats(cand, connectivity=8)
        if n <= 1:
            continue
        dist = cv2.distanceTransform(cand, cv2.DIST_L2, 3)
        around = cv2.dilate(cand, np.ones((3, 3), np.uint8)) > 0  # candidate pixels + 1 px rim
        glyphs = []
        for i in range(1, n):
            x, y, cw, ch, area = st[i]
            if area < 3 or ch < 3 or ch > glyph_max or cw > glyph_max:
                continue
            stroke = float(dist[y : y + ch, x : x + cw][labels[y : y + ch, x : x + cw] == i].max())
            if 2.0 * stroke > max(2.5, 0.5 * ch):  # a blob, not a stroke
                continue
            local_noise = float(noise_map[y + ch // 2, x + cw // 2])
            if _looks_burned_in(img, labels, around, i, (x, y, cw, ch), span, local_noise):
                glyphs.append((i, x, y, cw, ch))
        keep = _glyph_rows(glyphs)
        if keep:
            mask_small |= np.isin(labels, np.array(sorted(keep)))
    if not mask_small.any():
        return np.zeros((h, w), dtype=bool)
    if f != 1.0:
        mask_small = cv2.resize(mask_small.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    grow = max(3, 2 * round(f) + 3)  # anti-aliasing and compression ringing around strokes
    grown = cv2.dilate(mask_small.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_RECT, (grow, grow)))
    return grown > 0


def _noise_map(img: np.ndarray, span: float) -> np.ndarray:
    """Local noise sigma: median of |pixel - 3x3 mean| over a 31 px window (robust to the few
    stroke pixels in it), scaled for Gaussian noise."""
    d = np.abs(img - cv2.blur(img, (3, 3)))
    q = np.clip(d * (1024.0 / span), 0, 255).astype(np.uint8)
    med = cv2.medianBlur(q, 31).astype(np.float32) * (span / 1024.0)
    return med * 1.58  # median |d| = 0.674 * 0.94 sigma for Gaussian noise


def _looks_burned_in(
    img: np.ndarray,
    labels: np.ndarray,
    around: np.ndarray,
    i: int,
    box: tuple,
    span: float,
    local_noise: float = 0.0,
) -> bool:
    """Flat stroke cores far above the local background and its noise."""
    x, y, cw, ch = box
    m = 3
    y0, y1, x0, x1 = max(0, y - m), y + ch + m, max(0, x - m), x + cw + m
    win, lab, near = img[y0:y1, x0:x1], labels[y0:y1, x0:x1], around[y0:y1, x0:x1]
    vals = win[lab == i]
    core = vals[vals >= np.percentile(vals, 75)]  # fully covered stroke pixels (anti-aliasing)
    bg = win[~near]
    if bg.size < 8:
        return False
    bg_med = float(np.median(bg))
    noise = max(1.4826 * float(np.median(np.abs(bg - bg_med))), local_noise)
    level = float(np.median(core))
    flat = 1.4826 * float(np.median(np.abs(core - level)))
    contrast = level - bg_med
    if contrast < max(4.0 * noise, 0.15 * span) or flat > max(0.5 * noise, 0.04 * span):
        return False
    # clipped noise (a dark, noisy region crushed to black) is flat too, but its surroundings
    # share its level; a glyph's surroundings do not
    shared = float(np.mean(np.abs(bg - level) <= max(flat, 0.02 * span)))
    return shared < 0.05


def _glyph_rows(glyphs: list[tuple[int, int, int, int, int]], min_run: int = 3) -> set[int]:
    """Labels of glyphs in a run of at least `min_run` glyphs side by side on one text line
    (similar heights, overlapping rows, gaps under a glyph height)."""
    parent = list(range(len(glyphs)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    order = sorted(range(len(glyphs)), key=lambda k: glyphs[k][1])
    for pos, a in enumerate(order):
        _, xa, ya, wa, ha = glyphs[a]
        for b in order[pos + 1 :]:
            _, xb, yb, wb, hb = glyphs[b]
            if xb - (xa + wa) > 1.2 * max(ha, hb):
                break  # sorted by x: every later glyph is farther
            if max(ha, hb) > 3.0 * min(ha, hb):
                continue
            if min(ya + ha, yb + hb) - max(ya, yb) < 0.4 * min(ha, hb):
                continue
            parent[root(a)] = root(b)
    runs: dict[int, list[int]] = {}
    for k in range(len(glyphs)):
        runs.setdefault(root(k), []).append(glyphs[k][0])
    return {label for run in runs.values() if len(run) >= min_run for label in run}
