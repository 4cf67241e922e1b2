"""The tracker: a pure function (class map, geometry, previous state) -> (status, state).

No sockets, files or clocks: the same inputs always give the same status, so it is tested
frame by frame with synthetic class maps.

Lateral view. Posterior spread = extravertebral cement behind the line of the posterior
vertebral wall (a robust line fit to the body's posterior boundary); venous spread =
extravertebral cement elsewhere, except on or around the needle. "Extravertebral" = outside
the body's convex hull grown by a tolerance (~1 mm) so the wall's own edge pixels are not
called a leak; a venous candidate within `rim_reach_mm` of the hull must also border soft
tissue somewhere (cement the vertebra's own thin cortical rim still closes off is inside it),
and, where the tracker is given the frame as the model read it, show as added density against
the soft tissue beside it. As cement hides the body, the body last seen least hidden is used,
moved as the scene moved since: by the image registration's measured shift where the service
has one (two-channel models), else by the other vertebrae's bone.
Temporal logic: a kind is raised after `raise_frames` consecutive frames over the area
threshold whose leak masks overlap (so one noisy frame, or noise that jumps around, raises
nothing) and cleared after `clear_frames` consecutive frames without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

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
    hull_tolerance_mm: float = 0.5
    hull_tolerance_px: float = 4.0  # frame pixels, when the spacing is unknown
    needle_margin_mm: float = 2.0  # cement this close to the needle is backflow, not venous
    needle_margin_px: float = 8.0
    # or this far behind the wall, whatever the area; None: off (the default since model
    # 0.5.0: with the rule on it raised before the spec's 1 mm^2 onset on 10 of 120
    # simulated posterior leaks, each a false alert and a miss; models/CARD.md)
    posterior_depth_mm: float | None = None
    min_body_px: int = 30  # smaller body blobs (model pixels) are noise
    min_leak_depth_mm: float = 1.0  # an extravertebral blob must reach this far from the body
    min_venous_depth_mm: float = 1.5  # venous: a little further (the canal is what must not wait)
    max_leak_gap_mm: float = 8.0  # ... and come this close to it (a leak leaves the body)
    roi_margin_mm: float = 30.0  # work around the cement: a vertebral body's size
    breathing_mm: float = 4.0  # the treated body moves this much at most (breathing)
    wall_band_mm: float = 3.0  # near the wall line a leak blob's pixels share one kind
    core_radius_mm: float = 1.5  # cement thinner than 2x this (veins, thin leaks) is not core
    rim_reach_mm: float = 3.0  # cement under a thin cortical rim lies at most this far outside the hull
    # venous cement, and a posterior speck raised by the depth rule alone, must be denser than
    # the soft tissue beside it by this share of the frame's grey window (where the tracker is
    # given the frame): the model draws specks of "cement" in the disc space and along bone
    # edges where the image shows nothing
    min_leak_contrast: float = 0.025


@dataclass(frozen=True)
class TrackGeometry:
    """How the class map relates to the frame and the patient.

    frame_per_px: frame pixels per class-map pixel (1/letterbox scale).
    origin_xy: class-map pixel (0, 0) in frame pixels minus half a pixel bookkeeping, i.e.
        x_frame = (x + 0.5) * frame_per_px - 0.5 + origin_x (origin is 0 for a cropped map).
    mm_per_frame_px: pixel spacing at the vertebra, None when unknown (then units are px).
    posterior_side: "left"/"right" from configuration, or None to infer it from the needle.
    scene_shift: how the scene has moved (breathing) since a reference frame of the same view,
        (reference index, dx, dy) in class-map pixels, where the image registration knows it
        (two-channel models); None: the tracker follows the other vertebrae instead.
    view: "lateral" or "ap". Posterior spread is judged in the lateral view only: in an AP
        view the canal lies along the beam, and extravertebral cement is all reported venous.
    """

    frame_per_px: float = 1.0
    mm_per_frame_px: float | None = None
    posterior_side: str | None = None
    origin_xy: tuple[float, float] = (0.0, 0.0)
    scene_shift: tuple[int, float, float] | None = None
    view: str = "lateral"

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
    # the treated body as last seen least hidden by cement (cement replaces the body's label
    # as it fills it), and where the other vertebrae were then, to follow breathing
    body_ref: np.ndarray | None = field(default=None, compare=False, repr=False)
    body_ref_px: int = 0
    anchor_ref: tuple[float, float, float] | None = None  # (x, y, pixels)
    anchor_rect: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) left out of anchors
    body_ref_shift: tuple[int, float, float] | None = None  # the scene's shift when body_ref was taken


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
    # posterior wall line in class-map pixels: direction, a point, posterior unit normal
    wall: tuple[float, float, float, float, float, float] | None
    # class-map-sized bool masks behind the areas (for overlays and offline review)
    masks: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)


_OPEN_KERNEL = np.ones((3, 3), np.uint8)
_CROSS_KERNEL = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
_BRIDGE_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))  # spans a cannula's width


def _disk(radius_px: float) -> np.ndarray | None:
    return _disk_of(int(round(radius_px)))


@lru_cache(maxsize=32)
def _disk_of(r: int) -> np.ndarray | None:
    if r < 1:
        return None
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    kernel.flags.writeable = False  # shared between calls
    return kernel


def _dilate(mask: np.ndarray, radius_px: float) -> np.ndarray:
    kernel = _disk(radius_px)
    if kernel is None:
        return mask
    return cv2.dilate(mask.view(np.uint8), kernel).view(bool)


def _box(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice] | None:
    """The slices of a bool mask's bounding box grown by `pad` (clipped to the map), or None
    when it is empty. A `pad`-pixel morphology inside it sees all it would on the whole map:
    the work is done there (the masks are a small part of the map)."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0:
        return None
    return slice(max(0, y - pad), y + h + pad), slice(max(0, x - pad), x + w + pad)


def _label(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected components. OpenCV's BBDT (Grana) gives its default's labels, numbering
    included (both scan 2x2 blocks in raster order), in about half the time."""
    return cv2.connectedComponentsWithAlgorithm(mask.view(np.uint8), 8, cv2.CV_32S, cv2.CCL_GRANA)


def _label_stats(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """_label with the components' stats (a third of the default's time)."""
    count, comp, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
        mask.view(np.uint8), 8, cv2.CV_32S, cv2.CCL_GRANA
    )
    return count, comp, stats


def _points(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) of a bool mask's pixels, in raster order (OpenCV's scan is several times
    numpy's nonzero, and faster still on the mask's bounding box)."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty
    pts = cv2.findNonZero(mask[y : y + h, x : x + w].view(np.uint8)).reshape(-1, 2)
    return pts[:, 0] + np.int32(x), pts[:, 1] + np.int32(y)


def _main_needles(needle: np.ndarray) -> np.ndarray:
    """The cannula(s): needle blobs at least a quarter the size of the largest. Stray needle
    pixels on bright edges must not shield a leak from the venous check."""
    u8 = needle.view(np.uint8)
    x, y, w, h = cv2.boundingRect(u8)
    if w == 0:
        return needle
    count, comp, stats = _label_stats(u8[y : y + h, x : x + w])
    if count <= 2:
        return needle
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= max(4, 0.25 * areas.max())) + 1
    out = np.zeros_like(needle)
    if keep.size == 1:  # the cannula (most frames): a comparison
        out[y : y + h, x : x + w] = comp == keep[0]
    else:  # per component: a lookup, not np.isin's sort
        lookup = np.zeros(count, bool)
        lookup[keep] = True
        out[y : y + h, x : x + w] = lookup[comp]
    return out


def _treated_body(body: np.ndarray, cement: np.ndarray, needle: np.ndarray, core_radius: float, min_px: int):
    """The treated vertebral body -> (its visible parts, the cement core) or (None, None).

    The treated body is the one around the cement core: the cement opened so that veins and
    thin leaks are gone (they must not join a neighbouring vertebra to it). The needle and
    the cement often cut the body's label into several parts, all of which are joined here."""
    x, y, w, h = cv2.boundingRect(cement.view(np.uint8))
    if w == 0:
        return None, None
    box = slice(y, y + h), slice(x, x + w)
    count, comp, stats = _label_stats(cement[box])
    main = np.zeros_like(cement)
    main[box] = comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    kernel = _disk(core_radius)
    core = main
    if kernel is not None:
        # the opening on the cement's box grown by the kernel's radius: nothing outside it
        # erodes or dilates into it
        r = kernel.shape[0] // 2
        grown = slice(max(0, y - r), y + h + r), slice(max(0, x - r), x + w + r)
        opened = cv2.morphologyEx(np.ascontiguousarray(main[grown]).view(np.uint8), cv2.MORPH_OPEN, kernel)
        if opened.any():
            core = np.zeros_like(cement)
            core[grown] = opened.view(bool)
    # the needle cuts the body's label in two: its pixels that touch bone bridge the cut
    joined = body | core
    near = _box(needle, _BRIDGE_KERNEL.shape[0] // 2)
    if near is not None:
        grown_body = cv2.dilate(np.ascontiguousarray(body[near]).view(np.uint8), _BRIDGE_KERNEL).view(bool)
        joined[near] |= needle[near] & grown_body
    count, comp = _label(joined)
    votes = np.bincount(comp[box][core[box]], minlength=count)  # the core lies in the cement's box
    votes[0] = 0
    parts = body & (comp == int(np.argmax(votes)))
    if np.count_nonzero(parts) < min_px:
        return None, core
    return parts, core


def _shift(mask: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """A bool mask moved by (dx, dy) pixels (nearest), background filled in."""
    if abs(dx) < 0.5 and abs(dy) < 0.5:
        return mask
    if abs(dx - math.floor(dx) - 0.5) > 0.01 and abs(dy - math.floor(dy) - 0.5) > 0.01:
        # clear of half a pixel, nearest moves every pixel by the rounded shift: a copy, the
        # same as warpAffine's at a tenth of its time (near a half it rounds x - dx pixel by
        # pixel, half to even, which no copy follows)
        sx, sy = round(dx), round(dy)
        h, w = mask.shape
        moved = np.zeros_like(mask)
        if abs(sx) < w and abs(sy) < h:
            moved[max(0, sy) : h + min(0, sy), max(0, sx) : w + min(0, sx)] = mask[
                max(0, -sy) : h - max(0, sy), max(0, -sx) : w - max(0, sx)
            ]
        return moved
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(
        mask.view(np.uint8), m, (mask.shape[1], mask.shape[0]), flags=cv2.INTER_NEAREST, borderValue=0
    )
    return moved.view(bool)


def _anchor(body: np.ndarray, rect: tuple[int, int, int, int]) -> tuple[float, float, float] | None:
    """Centroid of the bone outside `rect` (where the treated body may be): the other
    vertebrae, which move with breathing as the treated one does."""
    x0, y0, x1, y1 = rect
    full = cv2.moments(body.view(np.uint8), binaryImage=True)
    part = cv2.moments(np.ascontiguousarray(body[y0:y1, x0:x1]).view(np.uint8), binaryImage=True)
    m00 = full["m00"] - part["m00"]
    if m00 < 20:
        return None
    m10 = full["m10"] - (part["m10"] + x0 * part["m00"])
    m01 = full["m01"] - (part["m01"] + y0 * part["m00"])
    return m10 / m00, m01 / m00, m00


def _infer_side(needle: np.ndarray, body_centroid_x: float, hull: np.ndarray) -> str | None:
    """The needle enters from the posterior side: where its extravertebral part lies."""
    outside = needle & ~hull
    if np.count_nonzero(outside) < 3:
        return None
    xs, _ = _points(outside)
    return "right" if xs.mean() > body_centroid_x else "left"


def _open_to_outside(
    extra: np.ndarray,
    blobs: np.ndarray,
    shallow: np.ndarray,
    labels: np.ndarray,
    cement: np.ndarray,
    region: np.ndarray,
) -> np.ndarray:
    """`extra` (venous candidates) without the shallow blobs (`shallow`, per blob id) that the
    treated vertebra's own bone (as labelled, before the opening), cement and needle close off
    from everything else: cement that has filled the body up to a cortical rim one or two
    pixels thick. The opening takes such a rim away with the bridges it is meant for, and the
    hull then leaves the cement under it outside; a leak has left the bone and borders soft
    tissue somewhere. A deeper blob is kept whatever bone is labelled around it (fail-safe)."""
    box = _box(extra, 1)  # what follows only looks at the candidates and their neighbours
    if box is None or not shallow[blobs[box][extra[box]]].any():
        return extra  # nothing shallow enough to lie under a rim (most frames): no labelling
    bone = (labels == VERTEBRAL_BODY).view(np.uint8)
    parts, comp = _label(bone)
    own = np.zeros(parts, bool)
    own[comp[region & bone.view(bool)]] = True
    own[0] = False
    inside = own[comp[box]] | cement[box] | (labels[box] == NEEDLE)
    # touching through an edge: a rim that steps diagonally (8-connected) still closes it off
    borders_outside = cv2.dilate((~inside).view(np.uint8), _CROSS_KERNEL).view(bool) & extra[box]
    keep = ~shallow
    keep[blobs[box][borders_outside]] = True
    out = np.zeros_like(extra)
    out[box] = extra[box] & keep[blobs[box]]
    return out


_RING_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))  # 3 class-map pixels around a blob


def _denser_than_soft_tissue(
    extra: np.ndarray,
    labels: np.ndarray,
    density: np.ndarray,
    denser: float,
    min_contrast: float,
    valid: np.ndarray | None,
) -> np.ndarray:
    """`extra` (leak candidates) without the blobs no denser than the soft tissue around
    them: cement attenuates more than anything else in the field, so a leak into soft tissue
    shows as added density however thin it is. `density` is the frame as the model read it
    (grey window units, 0..1), `denser` +1 where more attenuation reads brighter, -1 where it
    reads darker. A blob with hardly any soft tissue labelled around it (over bone, beside
    the needle) is kept: fail-safe."""
    out = extra.copy()
    # all the work is on the candidates' box grown by the ring's reach (3 px): each blob's
    # window below is then the same as on the whole map
    box = _box(extra, 3)
    if box is None:
        return out
    extra, labels, density, keep = extra[box], labels[box], density[box], out[box]
    count, blobs, stats = _label_stats(extra)
    soft = labels == 0
    if valid is not None:
        soft &= valid[box]
    h, w = extra.shape
    for i in range(1, count):
        bx, by, bw, bh = stats[i, :4]  # each blob's box, from the labelling itself
        x0, y0, x1, y1 = max(0, bx - 3), max(0, by - 3), min(w, bx + bw + 3), min(h, by + bh + 3)
        blob = blobs[y0:y1, x0:x1] == i
        ring = cv2.dilate(blob.view(np.uint8), _RING_KERNEL).view(bool) & ~blob & soft[y0:y1, x0:x1]
        if np.count_nonzero(ring) < 3:
            continue
        window = density[y0:y1, x0:x1]
        contrast = denser * (float(window[blob].mean()) - float(window[ring].mean()))
        if contrast < min_contrast:
            keep[y0:y1, x0:x1][blob] = False
    return out


def _norm(v: np.ndarray) -> float:
    """np.linalg.norm of a float32 vector, its own arithmetic without its checks (the wall's
    few vectors spent more time in those than in the sums)."""
    return float(np.sqrt(v.dot(v)))


def _wall_line(filled: np.ndarray, side: str):
    """The line of the posterior wall -> (vx, vy, x0, y0, nx, ny) with (nx, ny) the unit
    normal pointing posteriorly, or None.

    The body is a (rotated, rounded) box: its minimum-area rectangle's side that faces the
    canal is the wall; a robust (Huber) line through the body's outline near that side, away
    from the rounded corners, refines it. Spine tilt is followed; only which of the four sides
    faces the canal comes from `side`."""
    box = _box(filled, 1)  # the outline on the body's box: the same points, in the same order
    if box is None:
        return None
    contours, _ = cv2.findContours(
        np.ascontiguousarray(filled[box]).view(np.uint8),
        cv2.RETR_EXTERNAL,
        cv2.CHAIN_APPROX_NONE,
        offset=(box[1].start, box[0].start),
    )
    outline = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float32)
    if outline.shape[0] < 8:
        return None
    rect = cv2.minAreaRect(outline)
    box = cv2.boxPoints(rect)
    centre = np.asarray(rect[0], np.float32)
    toward = np.array([1.0 if side == "right" else -1.0, 0.0], np.float32)
    normals = (box + box[[1, 2, 3, 0]]) / 2 - centre  # from the centre to each side's middle
    best = None
    for i in range(4):
        normal = normals[i]
        length = _norm(normal)
        if length == 0:
            continue
        normal /= length
        score = float(normal @ toward)
        if best is None or score > best[0]:
            best = (score, box[i], box[(i + 1) % 4], normal, length)
    _, p0, p1, normal, half_depth = best
    along = p1 - p0
    edge_len = _norm(along)
    if edge_len == 0:
        return None
    along /= edge_len
    rel = outline - p0
    dist = rel @ normal  # 0 on the rectangle's side, negative inside
    pos = rel @ along
    near = (dist > -0.25 * half_depth) & (pos > 0.15 * edge_len) & (pos < 0.85 * edge_len)
    x0, y0 = (p0 + p1) / 2
    vx, vy = along
    if np.count_nonzero(near) >= 5:
        vx, vy, x0, y0 = cv2.fitLine(outline[near], cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
    nx, ny = vy, -vx
    if nx * normal[0] + ny * normal[1] < 0:
        nx, ny = -nx, -ny
    return float(vx), float(vy), float(x0), float(y0), float(nx), float(ny)


def _evidence(mask: np.ndarray, depth: float, geo: TrackGeometry) -> Evidence:
    xs, ys = _points(mask)
    cx, cy = geo.to_frame(float(xs.mean()), float(ys.mean()))
    x0, y0 = geo.to_frame(float(xs.min()) - 0.5, float(ys.min()) - 0.5)
    x1, y1 = geo.to_frame(float(xs.max()) + 0.5, float(ys.max()) + 0.5)
    area = float(xs.size) * geo.unit_per_px**2
    return Evidence(area, depth, (cx, cy), (x0, y0, x1, y1), geo.units)


def _overlaps(before: np.ndarray, mask: np.ndarray) -> bool:
    """Whether `mask` overlaps `before` grown by a pixel (looked at on mask's box only)."""
    box = _box(mask, 1)
    return box is not None and bool((_dilate(np.ascontiguousarray(before[box]), 1) & mask[box]).any())


def _step(prev: KindState, over: bool, mask: np.ndarray, cfg: TrackerConfig) -> KindState:
    if over:
        # persistence: the leak must overlap (within a pixel) what was there the frame before
        persists = prev.over > 0 and prev.mask is not None and _overlaps(prev.mask, mask)
        run = prev.over + 1 if persists else 1
        active = prev.active or run >= cfg.raise_frames
        return KindState(active, run, 0, mask)
    under = prev.under + 1 if prev.active else 0
    active = prev.active and under < cfg.clear_frames
    return KindState(active, 0, under if active else 0, None)


def _track(
    labels: np.ndarray,
    geo: TrackGeometry,
    prev: TrackerState,
    cfg: TrackerConfig,
    valid: np.ndarray | None,
    labels_full: np.ndarray,
    offset: tuple[int, int],
    density: np.ndarray | None = None,
    cement: np.ndarray | None = None,
) -> tuple[TrackStatus, TrackerState]:
    """track() on a region of interest: labels, valid, density and prev's masks are cropped to
    it; labels_full is the whole frame's map (its bone is the breathing anchor); offset = crop's
    (x, y); cement, where given, is the crop's cement within `valid`."""
    body = labels == VERTEBRAL_BODY
    if cement is None:
        cement = labels == CEMENT
        if valid is not None:
            cement &= valid
    needle = labels == NEEDLE
    body_full: np.ndarray | None = None  # the whole frame's bone, when the anchor needs it

    def anchor_at(rect: tuple[int, int, int, int]) -> tuple[float, float, float] | None:
        nonlocal body_full
        if body_full is None:
            body_full = labels_full == VERTEBRAL_BODY
        return _anchor(body_full, rect)

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
    cement_area = float(np.count_nonzero(cement)) * unit**2

    empty = np.zeros_like(body)
    posterior_mask, venous_mask, depth = empty, empty, 0.0
    deep_blobs, depth_shown = empty, True  # posterior blobs past posterior_depth_mm; do they show?
    past_depth_rule = False  # the depth rule is on and the deepest posterior cement is past it
    lateral = geo.view != "ap"
    side, wall = (geo.posterior_side or prev.posterior_side, None) if lateral else (None, None)
    # opening drops 1-px rims and bridges the segmentation leaves along bright edges, which
    # would otherwise pull a nearby leak into the body's hull
    body = cv2.morphologyEx(body.view(np.uint8), cv2.MORPH_OPEN, _OPEN_KERNEL).view(bool)
    needle = _main_needles(needle)
    parts, core = _treated_body(
        body, cement, needle, cfg.core_radius_mm * px_per_unit_len if geo.mm_per_frame_px else 1.5, cfg.min_body_px
    )
    body_ref, body_ref_px, anchor_ref = prev.body_ref, prev.body_ref_px, prev.anchor_ref
    body_ref_shift = prev.body_ref_shift
    anchor_rect = prev.anchor_rect
    zone = cfg.breathing_mm * px_per_unit_len if geo.mm_per_frame_px else 6.0
    ref = None
    if body_ref is not None and core is not None:
        # cement hides more and more of the body: use the body as last seen least hidden,
        # moved as the scene moved since (breathing): as the image registration measured it,
        # else as the other vertebrae moved (bone away from where the treated body was, the
        # same zone as when the reference was taken, so both centroids cover the same anatomy)
        dx = dy = 0.0
        then, now = prev.body_ref_shift, geo.scene_shift
        if then is not None and now is not None and then[0] == now[0]:
            # the image registration measured the scene's move against the same reference
            # frame then and now: the body moved by the difference. (The other vertebrae's
            # bone labels, followed below, change as cement and the needle cover some of them.)
            dx, dy = now[1] - then[1], now[2] - then[2]
        else:
            anchor = anchor_at(prev.anchor_rect) if prev.anchor_rect else None
            # trusted only when it is the same anatomy (about as much bone as then) and the
            # move is one breathing can make; otherwise the body is taken where it was
            if (
                anchor is not None
                and anchor_ref is not None
                and abs(anchor[2] - anchor_ref[2]) <= 0.3 * anchor_ref[2]
                and anchor_ref[2] >= 0.5 * body_ref_px
                and math.hypot(anchor[0] - anchor_ref[0], anchor[1] - anchor_ref[1]) <= 2 * zone
            ):
                dx, dy = anchor[0] - anchor_ref[0], anchor[1] - anchor_ref[1]
        ref = _shift(body_ref, dx, dy)
        if not (ref & core).any():  # the cement is elsewhere: the C-arm moved; start over
            ref, body_ref, body_ref_px = None, None, 0
    if parts is not None and ref is not None and not (parts & _dilate(ref, 2)).any():
        parts = None  # a neighbouring vertebra picked by mistake: trust the remembered body
    if parts is not None or ref is not None:
        region = parts if parts is not None else ref
        if parts is not None and ref is not None:
            region = parts | ref
        hull = np.zeros(labels.shape, np.uint8)
        rb = _box(region, 1)  # the outlines on the region's box: the same points, in the same order
        outlines, _ = cv2.findContours(
            np.ascontiguousarray(region[rb]).view(np.uint8),
            cv2.RETR_EXTERNAL,
            cv2.CHAIN_APPROX_SIMPLE,
            offset=(rb[1].start, rb[0].start),
        )
        corners = cv2.convexHull(np.concatenate(outlines))
        cv2.fillConvexPoly(hull, corners, 1)
        hull = hull.view(bool)
        # the body with the cement it holds: what is inside the hull of the bone
        filled = region | (cement & hull)
        if parts is not None:
            visible = int(np.count_nonzero(parts))
            if visible >= body_ref_px:
                body_ref, body_ref_px = filled, visible
                body_ref_shift = geo.scene_shift
                bx, by, bw, bh = cv2.boundingRect(filled.view(np.uint8))
                z = int(math.ceil(zone))
                ox, oy = offset
                full_h, full_w = labels_full.shape
                anchor_rect = (
                    max(0, ox + bx - z),
                    max(0, oy + by - z),
                    min(full_w, ox + bx + bw + z),
                    min(full_h, oy + by + bh + z),
                )
                anchor_ref = anchor_at(anchor_rect)
        else:
            parts = region
        if geo.posterior_side is None and lateral:
            xs, _ = _points(parts)
            side = _infer_side(needle, float(xs.mean()), hull) or side
        extra = cement & ~_dilate(hull, tol)
        eb = _box(extra)  # the candidates' box: per-blob lookups are done there only
        if eb is not None:
            # a leak goes somewhere: blobs that only hug the cortex (label edges, rounding
            # of the letterbox) never get `min_leak_depth` away from the body, so they go
            min_depth = cfg.min_leak_depth_mm * px_per_unit_len if geo.mm_per_frame_px else 2.0
            # and a leak leaves the body: cement far from it with nothing in between is not
            # a leak (text, a stray pixel the model got wrong), it would raise forever
            max_gap = cfg.max_leak_gap_mm * px_per_unit_len if geo.mm_per_frame_px else 8.0
            # The distance to the hull on the rows of the hull and the candidates only: rows
            # without hull pixels above them add nothing to the top-down pass, and what rows
            # below them add to the bottom-up one is a path that turns back, never the
            # shortest. (Not fewer columns: the transform's float sums depend on where a row
            # starts and ends, so a narrower one reads some distances an ulp off.)
            _, hy, _, hh = cv2.boundingRect(corners)
            rows, cols = eb
            top = min(hy, rows.start)
            away = cv2.distanceTransform((~hull[top : max(hy + hh, rows.stop)]).view(np.uint8), cv2.DIST_L2, 5)
            blob_count, blob_box = _label(extra[eb])
            blobs = np.zeros(labels.shape, np.int32)
            blobs[eb] = blob_box
            inside = extra[eb]
            ids, far = blob_box[inside], away[rows.start - top : rows.stop - top, cols][inside]
            reach = np.zeros(blob_count, np.float32)
            np.maximum.at(reach, ids, far)
            gap = np.full(blob_count, np.inf, np.float32)
            np.minimum.at(gap, ids, far)
            ok = (reach >= min_depth) & (gap <= max_gap)
            if not ok[1:].all():
                extra[eb] &= ok[blob_box]
        if side in ("left", "right") and lateral:
            wall = _wall_line(filled, side)
        if wall is not None and extra.any():
            vx, vy, x0, y0, nx, ny = wall  # (nx, ny): unit normal pointing posteriorly
            # one leak is one kind: each extravertebral blob goes by where most of it lies
            # (epidural cement spreading along the canal must not turn partly "venous"); what
            # is left of `extra` is whole blobs, so their labels are its components
            count = blob_count
            ex, ey = _points(extra)
            dist = (ex - x0) * nx + (ey - y0) * ny  # >0: behind the wall
            ids = blobs[ey, ex]
            behind_share = np.bincount(ids, weights=(dist > 0), minlength=count) / np.maximum(
                np.bincount(ids, minlength=count), 1
            )
            # clearly on one side: that side; near the line: the blob's majority decides
            band = cfg.wall_band_mm * px_per_unit_len if geo.mm_per_frame_px else 2.0
            behind = np.where(np.abs(dist) > band, dist > 0, behind_share[ids] > 0.5)
            posterior_mask = empty.copy()
            posterior_mask[ey[behind], ex[behind]] = True
            if behind.any():
                depth = max(0.0, float(dist[behind].max())) * unit
                past_depth_rule = cfg.posterior_depth_mm is not None and depth >= cfg.posterior_depth_mm
                if density is not None and geo.mm_per_frame_px and past_depth_rule:
                    # the blobs the depth rule would raise on (checked for density below)
                    deep = np.zeros(count, bool)  # per blob: a lookup, not np.isin's sort
                    deep[ids[behind & (dist * unit >= cfg.posterior_depth_mm)]] = True
                    deep_blobs = posterior_mask & deep[blobs]
        venous_mask = extra & ~posterior_mask
        if venous_mask.any():
            min_venous = cfg.min_venous_depth_mm * px_per_unit_len if geo.mm_per_frame_px else 3.0
            venous_mask[eb] &= (reach >= min_venous)[blob_box]
            # posterior candidates are never quieted this way: behind the wall, bone labelled
            # around the cement (pedicles read as body) must not hide a leak into the canal
            rim = cfg.rim_reach_mm * px_per_unit_len if geo.mm_per_frame_px else 5.0
            venous_mask = _open_to_outside(venous_mask, blobs, reach <= rim, labels, cement, region)
        vb = _box(venous_mask, int(round(margin)))  # the margin's disk reaches this far
        if vb is not None and needle[vb].any():
            venous_mask[vb] &= ~_dilate(np.ascontiguousarray(needle[vb]), margin)
        if density is not None and core is not None and body.any() and (venous_mask.any() or deep_blobs.any()):
            # which way density reads: the cement mass is denser than bone (the core lies in
            # its box: the same pixels, in the same order)
            cb = _box(core)
            denser = 1.0 if float(density[cb][core[cb]].mean()) >= float(density[body].mean()) else -1.0
            if venous_mask.any():
                venous_mask = _denser_than_soft_tissue(
                    venous_mask, labels, density, denser, cfg.min_leak_contrast, valid
                )
            if deep_blobs.any():
                # the depth rule raises on cement under the area threshold: that much must show
                shown = _denser_than_soft_tissue(deep_blobs, labels, density, denser, cfg.min_leak_contrast, valid)
                depth_shown = bool(shown.any())

    areas = {
        "cement": cement_area,
        "posterior": float(np.count_nonzero(posterior_mask)) * unit**2,
        "venous": float(np.count_nonzero(venous_mask)) * unit**2,
    }
    masks = {"posterior": posterior_mask, "venous": venous_mask}
    body_mask = hull if parts is not None else empty
    states = {}
    events = []
    evidence: dict[str, Evidence | None] = {}
    for kind in KINDS:
        before: KindState = getattr(prev, kind)
        over = areas[kind] >= threshold and areas[kind] > 0
        if kind == "posterior" and areas[kind] > 0 and geo.mm_per_frame_px:
            # thin cement already well behind the wall is a leak even while its area is
            # still under the threshold (the model draws a thin epidural leak thinner)
            # (where the tracker has the frame, only if they show as added density: the model's
            # specks of a pixel or two beside the wall would raise a high-priority alarm)
            over = over or (past_depth_rule and depth_shown)
        after = _step(before, over, masks[kind], cfg)
        states[kind] = after
        if after.active != before.active:
            events.append((kind, "raised" if after.active else "cleared"))
        evidence[kind] = (
            _evidence(masks[kind], depth if kind == "posterior" else 0.0, geo) if masks[kind].any() else None
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
        body_found=parts is not None,
        masks={**masks, "body": body_mask},
        posterior_side=side,
        wall=wall,
    )
    state = replace(
        prev,
        posterior=states["posterior"],
        venous=states["venous"],
        posterior_side=side,
        body_ref=body_ref,
        body_ref_px=body_ref_px,
        anchor_ref=anchor_ref,
        anchor_rect=anchor_rect,
        body_ref_shift=body_ref_shift,
    )
    return status, state


def _crop_kind(k: KindState, sl: tuple[slice, slice]) -> KindState:
    return k if k.mask is None else replace(k, mask=k.mask[sl])


def _uncrop(mask: np.ndarray | None, sl: tuple[slice, slice], shape) -> np.ndarray | None:
    if mask is None:
        return None
    out = np.zeros(shape, bool)
    out[sl] = mask
    return out


def track(
    labels: np.ndarray,
    geo: TrackGeometry,
    prev: TrackerState | None = None,
    cfg: TrackerConfig = TrackerConfig(),
    valid: np.ndarray | None = None,
    density: np.ndarray | None = None,
) -> tuple[TrackStatus, TrackerState]:
    """labels: uint8 class map (H, W) covering the frame; valid: optional bool mask of the
    field of view / not-burned-in-text at the same size (cement outside it is ignored);
    density: optional float plane of the same size, the frame as the model read it in grey
    window units (0 at its low percentile, 1 at its high one): with it, venous candidates must
    show as added density against the soft tissue beside them.

    Everything a leak can touch lies near cement, so the work is done on the cement's
    bounding box grown by `roi_margin_mm` (and the remembered body's box): a few times fewer
    pixels than the frame. The result is the same as on the whole map."""
    prev = prev or TrackerState()
    shape = labels.shape
    cement = labels == CEMENT
    if valid is not None:
        cement &= valid
    x, y, w, h = cv2.boundingRect(cement.view(np.uint8))
    if w == 0 and prev.body_ref is None:
        x, y, w, h = 0, 0, shape[1], shape[0]
    unit_len = geo.unit_per_px
    m = int(math.ceil(cfg.roi_margin_mm / unit_len)) if geo.mm_per_frame_px else 40
    x0, y0, x1, y1 = x - m, y - m, x + w + m, y + h + m
    if prev.body_ref is not None:
        bx, by, bw, bh = cv2.boundingRect(prev.body_ref.view(np.uint8))
        if bw:
            z = int(math.ceil(cfg.breathing_mm / unit_len)) if geo.mm_per_frame_px else 6
            x0, y0 = min(x0, bx - m), min(y0, by - m)
            x1, y1 = max(x1, bx + bw + m + z), max(y1, by + bh + m + z)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(shape[1], x1), min(shape[0], y1)
    sl = (slice(y0, y1), slice(x0, x1))
    sub_prev = replace(
        prev,
        posterior=_crop_kind(prev.posterior, sl),
        venous=_crop_kind(prev.venous, sl),
        body_ref=None if prev.body_ref is None else prev.body_ref[sl],
    )
    f = geo.frame_per_px
    sub_geo = replace(geo, origin_xy=(geo.origin_xy[0] + x0 * f, geo.origin_xy[1] + y0 * f))
    status, st = _track(
        labels[sl],
        sub_geo,
        sub_prev,
        cfg,
        None if valid is None else valid[sl],
        labels,
        (x0, y0),
        None if density is None else density[sl],
        cement[sl].copy(),
    )
    wall = status.wall
    if wall is not None:
        wall = (wall[0], wall[1], wall[2] + x0, wall[3] + y0, wall[4], wall[5])
    status = replace(status, wall=wall, masks={k: _uncrop(v, sl, shape) for k, v in status.masks.items()})
    st = replace(
        st,
        posterior=replace(st.posterior, mask=_uncrop(st.posterior.mask, sl, shape)),
        venous=replace(st.venous, mask=_uncrop(st.venous.mask, sl, shape)),
        body_ref=_uncrop(st.body_ref, sl, shape),
    )
    return status, st
