"""The tracker: a pure function (class map, geometry, previous state) -> (status, state).

No sockets, files or clocks: the same inputs always give the same status, so it is tested
frame by frame with synthetic class maps.

Lateral view. Posterior spread = extravertebral cement behind the line of the posterior
vertebral wall (a robust line fit to the body's posterior boundary); venous spread =
extravertebral cement elsewhere, except on or around the needle. "Extravertebral" = outside
the body's convex hull grown by a tolerance (~1 mm) so the wall's own edge pixels are not
called a leak. Temporal logic: a kind is raised after `raise_frames` consecutive frames over
the area threshold whose leak masks overlap (so one noisy frame, or noise that jumps around,
raises nothing) and cleared after `clear_frames` consecutive frames without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from guidance.segmentation.preprocess import CEMENT, NEEDLE, VERTEBRAL_BODY

KINDS = ("posterior", "venous")


@dataclass(frozen=True)
class TrackerConfig:
    raise_frames: int = 2  # consecutive frames over threshold before raising
    clear_frames: int = 15  # consecutive frames under threshold before clearing
    area_threshold_mm2: float = 1.0  # the spec's onset: 1 mm^2 of extravertebral cement
    area_threshold_px: float = 4.0  # the same in frame pixels^2 when the spacing is unknown
    hull_tolerance_mm: float = 1.0
    hull_tolerance_px: float = 4.0  # frame pixels, when the spacing is unknown
    needle_margin_mm: float = 2.0  # cement this close to the needle is backflow, not venous
    needle_margin_px: float = 8.0
    min_body_px: int = 30  # smaller body blobs (model pixels) are noise


@dataclass(frozen=True)
class TrackGeometry:
    """How the class map relates to the frame and the patient.

    frame_per_px: frame pixels per class-map pixel (1/letterbox scale).
    origin_xy: class-map pixel (0, 0) in frame pixels minus half a pixel bookkeeping, i.e.
        x_frame = (x + 0.5) * frame_per_px - 0.5 + origin_x (origin is 0 for a cropped map).
    mm_per_frame_px: pixel spacing at the vertebra, None when unknown (then units are px).
    posterior_side: "left"/"right" from configuration, or None to infer it from the needle.
    """

    frame_per_px: float = 1.0
    mm_per_frame_px: float | None = None
    posterior_side: str | None = None
    origin_xy: tuple[float, float] = (0.0, 0.0)

    @property
    def units(self) -> str:
        return "mm" if self.mm_per_frame_px else "px"

    @property
    def unit_per_px(self) -> float:
        """Length of one class-map pixel in output units (mm, or frame pixels)."""
        return self.frame_per_px * (self.mm_per_frame_px or 1.0)

    def to_frame(self, x: float, y: float) -> tuple[float, float]:
        f = self.frame_per_px
        return (x + 0.5) * f - 0.5 + self.origin_xy[0], (y + 0.5) * f - 0.5 + self.origin_xy[1]


@dataclass(frozen=True)
class Evidence:
    area: float
    depth: float
    centroid: tuple[float, float]
    box: tuple[float, float, float, float]
    units: str

    def as_dict(self) -> dict:
        return {
            "area": round(self.area, 3),
            "depth": round(self.depth, 3),
            "centroid": [round(c, 1) for c in self.centroid],
            "box": [round(b, 1) for b in self.box],
            "units": self.units,
        }


@dataclass(frozen=True)
class KindState:
    active: bool = False
    over: int = 0  # consecutive frames over threshold
    under: int = 0  # consecutive frames under threshold while active
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class TrackerState:
    posterior: KindState = KindState()
    venous: KindState = KindState()
    posterior_side: str | None = None  # last side inferred from the needle (sticky)


@dataclass(frozen=True)
class TrackStatus:
    """One frame's verdict. `posterior`/`venous` are alert-grade flags after temporal logic;
    `candidate` says what this frame alone shows; `events` lists (kind, "raised"|"cleared")."""

    posterior: bool
    venous: bool
    areas: dict[str, float]  # cement, posterior, venous in units^2
    posterior_depth: float
    units: str
    candidate: dict[str, bool]
    evidence: dict[str, Evidence | None]
    events: tuple[tuple[str, str], ...]
    body_found: bool
    posterior_side: str | None
    wall: tuple[float, float, float, float] | None  # (vx, vy, x0, y0) in class-map pixels


_OPEN_KERNEL = np.ones((3, 3), np.uint8)


def _disk(radius_px: float) -> np.ndarray | None:
    r = int(round(radius_px))
    if r < 1:
        return None
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    kernel = _disk(radius_px)
    if kernel is None:
        return mask
    return cv2.dilate(mask.view(np.uint8), kernel).astype(bool)


def _main_needles(needle: np.ndarray) -> np.ndarray:
    """The cannula(s): needle blobs at least a quarter the size of the largest. Stray needle
    pixels on bright edges must not shield a leak from the venous check."""
    count, comp, stats, _ = cv2.connectedComponentsWithStats(needle.view(np.uint8), connectivity=8)
    if count <= 2:
        return needle
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= max(4, 0.25 * areas.max())) + 1
    return np.isin(comp, keep)


def _treated_body(body: np.ndarray, hint: np.ndarray, min_px: int) -> np.ndarray | None:
    """The vertebral body the needle/cement is in (largest blob touching them, else largest)."""
    count, comp, stats, _ = cv2.connectedComponentsWithStats(body.view(np.uint8), connectivity=8)
    if count <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    candidates = [i + 1 for i in np.argsort(areas)[::-1] if areas[i] >= min_px]
    if not candidates:
        return None
    if hint.any():
        touched = set(np.unique(comp[hint]).tolist())
        for i in candidates:
            if i in touched:
                return comp == i
    return comp == candidates[0]


def _infer_side(needle: np.ndarray, body_centroid_x: float, hull: np.ndarray) -> str | None:
    """The needle enters from the posterior side: where its extravertebral part lies."""
    outside = needle & ~hull
    if outside.sum() < 3:
        return None
    xs = np.nonzero(outside)[1]
    return "right" if xs.mean() > body_centroid_x else "left"


def _wall_line(filled: np.ndarray, side: str) -> tuple[float, float, float, float] | None:
    """Robust (Huber) line through the posterior boundary, the middle 80 % of the body's
    height (the endplate corners round off)."""
    rows = np.nonzero(filled.any(axis=1))[0]
    if rows.size < 4:
        return None
    lo, hi = np.percentile(rows, [10, 90])
    pts = []
    for y in rows[(rows >= lo) & (rows <= hi)]:
        xs = np.flatnonzero(filled[y])
        pts.append((xs.max() if side == "right" else xs.min(), y))
    if len(pts) < 3:
        return None
    vx, vy, x0, y0 = cv2.fitLine(np.asarray(pts, np.float32), cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
    return float(vx), float(vy), float(x0), float(y0)


def _evidence(mask: np.ndarray, depth: float, geo: TrackGeometry) -> Evidence:
    ys, xs = np.nonzero(mask)
    cx, cy = geo.to_frame(float(xs.mean()), float(ys.mean()))
    x0, y0 = geo.to_frame(float(xs.min()) - 0.5, float(ys.min()) - 0.5)
    x1, y1 = geo.to_frame(float(xs.max()) + 0.5, float(ys.max()) + 0.5)
    area = float(mask.sum()) * geo.unit_per_px**2
    return Evidence(area, depth, (cx, cy), (x0, y0, x1, y1), geo.units)


def _step(prev: KindState, over: bool, mask: np.ndarray, cfg: TrackerConfig) -> KindState:
    if over:
        # persistence: the leak must overlap (within a pixel) what was there the frame before
        persists = (
            prev.over > 0 and prev.mask is not None and bool((_dilate(prev.mask, 1) & mask).any())
        )
        run = prev.over + 1 if persists else 1
        active = prev.active or run >= cfg.raise_frames
        return KindState(active, run, 0, mask)
    under = prev.under + 1 if prev.active else 0
    active = prev.active and under < cfg.clear_frames
    return KindState(active, 0, under if active else 0, None)


def track(
    labels: np.ndarray,
    geo: TrackGeometry,
    prev: TrackerState | None = None,
    cfg: TrackerConfig = TrackerConfig(),
    valid: np.ndarray | None = None,
) -> tuple[TrackStatus, TrackerState]:
    """labels: uint8 class map (H, W) covering the frame; valid: optional bool mask of the
    field of view / not-burned-in-text at the same size (cement outside it is ignored)."""
    prev = prev or TrackerState()
    body = labels == VERTEBRAL_BODY
    cement = labels == CEMENT
    needle = labels == NEEDLE
    if valid is not None:
        cement &= valid
    unit = geo.unit_per_px  # output units per class-map pixel
    # tolerances and thresholds in class-map pixels
    px_per_unit_len = 1.0 / unit
    if geo.mm_per_frame_px:
        tol = cfg.hull_tolerance_mm * px_per_unit_len
        margin = cfg.needle_margin_mm * px_per_unit_len
        threshold = cfg.area_threshold_mm2
    else:
        tol = cfg.hull_tolerance_px * px_per_unit_len
        margin = cfg.needle_margin_px * px_per_unit_len
        threshold = cfg.area_threshold_px
    cement_area = float(cement.sum()) * unit**2

    empty = np.zeros_like(body)
    posterior_mask, venous_mask, depth = empty, empty, 0.0
    side, wall = geo.posterior_side or prev.posterior_side, None
    # opening drops 1-px rims and bridges the segmentation leaves along bright edges, which
    # would otherwise pull a nearby leak into the body's hull
    body = cv2.morphologyEx(body.view(np.uint8), cv2.MORPH_OPEN, _OPEN_KERNEL).astype(bool)
    needle = _main_needles(needle)
    chosen = _treated_body(body, cement | needle, cfg.min_body_px)
    if chosen is not None:
        pts = cv2.findNonZero(chosen.view(np.uint8))
        hull = np.zeros(labels.shape, np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(pts), 1)
        hull = hull.astype(bool)
        ys, xs = np.nonzero(chosen)
        if geo.posterior_side is None:
            side = _infer_side(needle, float(xs.mean()), hull) or side
        extra = cement & ~_dilate(hull, tol)
        if side in ("left", "right"):
            wall = _wall_line(chosen | (hull & cement), side)
        if wall is not None and extra.any():
            vx, vy, x0, y0 = wall
            nx, ny = vy, -vx  # normal to the wall; orient it towards the posterior side
            if (nx > 0) != (side == "right"):
                nx, ny = -nx, -ny
            ey, ex = np.nonzero(extra)
            dist = (ex - x0) * nx + (ey - y0) * ny  # >0: behind the wall
            behind = dist > 0
            posterior_mask = empty.copy()
            posterior_mask[ey[behind], ex[behind]] = True
            if behind.any():
                depth = float(dist[behind].max()) * unit
        venous_mask = extra & ~posterior_mask
        if needle.any():
            venous_mask &= ~_dilate(needle, margin)

    areas = {
        "cement": cement_area,
        "posterior": float(posterior_mask.sum()) * unit**2,
        "venous": float(venous_mask.sum()) * unit**2,
    }
    masks = {"posterior": posterior_mask, "venous": venous_mask}
    states = {}
    events = []
    evidence: dict[str, Evidence | None] = {}
    for kind in KINDS:
        before: KindState = getattr(prev, kind)
        over = areas[kind] >= threshold and areas[kind] > 0
        after = _step(before, over, masks[kind], cfg)
        states[kind] = after
        if after.active != before.active:
            events.append((kind, "raised" if after.active else "cleared"))
        evidence[kind] = (
            _evidence(masks[kind], depth if kind == "posterior" else 0.0, geo)
            if masks[kind].any()
            else None
        )
    status = TrackStatus(
        posterior=states["posterior"].active,
        venous=states["venous"].active,
        areas=areas,
        posterior_depth=depth,
        units=geo.units,
        candidate={k: states[k].over > 0 for k in KINDS},
        evidence=evidence,
        events=tuple(events),
        body_found=chosen is not None,
        posterior_side=side,
        wall=wall,
    )
    state = replace(
        prev, posterior=states["posterior"], venous=states["venous"], posterior_side=side
    )
    return status, state
