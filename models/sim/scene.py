"""One simulated injection: randomised anatomy, needles, cement growth and leaks, per frame.

`LoopScene.sample(rng, ...)` draws every random choice once; `scene.frame(i)` then returns the
projected attenuation (line integrals) and the label map of frame i on the scene grid. Image
formation (noise, blur, distortion, overlays) is in `imaging.py`.

Cement growth: an arrival-time field from the needle tips through the trabecular bone
(Dijkstra over a porosity-weighted grid), so the cement is lobulated and follows porosity.
Cortex blocks it except where the posterior wall is disrupted; behind a disrupted wall the
epidural space lets it spread cranio-caudally (posterior leak). Veins (venous leak) are thin,
tortuous, branching tubes leaving the body; they fill quickly once cement reaches their
entry, and a fragment may break off and travel on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from models.sim.anatomy import (
    MU_AIR_MINUS_SOFT,
    MU_CEMENT,
    MU_CORTICAL,
    MU_SOFT,
    MU_STEEL,
    MU_TRABECULAR,
    Grid,
    Vertebra,
    ellipse_sdf,
    rim_chord,
    smooth_noise,
    window,
)

BACKGROUND, BODY, CEMENT, NEEDLE = 0, 1, 2, 3
VISIBLE_CEMENT_MM = 1.5  # projected cement thinner than this is not seen, so not labelled


def _arrival_times(cost: np.ndarray, sources: list[tuple[int, int]]) -> np.ndarray:
    """Shortest-path arrival over an 8-connected grid; inf cost blocks a cell."""
    h, w = cost.shape
    idx = np.arange(h * w).reshape(h, w)
    rows, cols, vals = [], [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = idx[0 : h - dy, max(0, -dx) : w - max(0, dx)]
        b = idx[dy:h, max(0, dx) : w - max(0, -dx)]
        ca, cb = cost.ravel()[a.ravel()], cost.ravel()[b.ravel()]
        ok = np.isfinite(ca) & np.isfinite(cb)
        step = math.hypot(dx, dy)
        rows.append(a.ravel()[ok])
        cols.append(b.ravel()[ok])
        vals.append((0.5 * (ca[ok] + cb[ok]) * step).astype(np.float64) + 1e-6)
    graph = coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, h * w)
    ).tocsr()
    srcs = [int(idx[r, c]) for r, c in sources if np.isfinite(cost[r, c])]
    if not srcs:
        return np.full((h, w), np.inf, dtype=np.float32)
    dist = dijkstra(graph, directed=False, indices=srcs, min_only=True)
    return dist.reshape(h, w).astype(np.float32)


def _segment_distance(x: np.ndarray, y: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    return np.hypot(x - (p0[0] + t * d[0]), y - (p0[1] + t * d[1]))


@dataclass
class Needle:
    tip: np.ndarray  # mm
    back: np.ndarray  # a point far behind the entry, mm
    radius: float


@dataclass
class Vein:
    points: np.ndarray  # (n, 2) mm, from the body wall outward
    diameters: np.ndarray  # (n,) mm
    entry_inside: tuple[float, float]  # point inside the body where cement enters it
    delay: float  # extra arrival "time" before it opens
    speed: float  # arrival units per mm of vein


@dataclass
class LoopScene:
    grid: Grid
    view: str
    posterior_sign: int  # +1: canal on the image's right, -1: left
    frames: int
    fps: float
    static_integral: np.ndarray
    body_labels: np.ndarray  # BODY where any vertebral body lies
    treated_body: np.ndarray  # bool: the treated body (for "extravertebral")
    behind_wall: np.ndarray  # bool: beyond the line of the treated body's posterior wall
    needle_integral: np.ndarray
    needle_mask: np.ndarray
    arrival: np.ndarray  # cement arrival in the body on the scene grid (1e6: never)
    epidural_arrival: np.ndarray  # cement arrival in the epidural space (a thin layer)
    epidural: np.ndarray  # bool: epidural/foraminal space
    max_thickness: float
    schedule: np.ndarray  # per-frame injected "arrival budget"
    vein_arrival: np.ndarray
    vein_diameter: np.ndarray
    fragments: list[dict] = field(default_factory=list)
    breathing: tuple[float, float, float, float] = (0.0, 0.0, 4.0, 0.0)  # amp, angle, period, phase
    mu_cement: float = MU_CEMENT  # opacifier content varies between cements

    # ------------------------------------------------------------------ per frame
    def cement_thickness(self, i: int) -> np.ndarray:
        budget = float(self.schedule[i])
        body = np.minimum(np.sqrt(np.clip(budget - self.arrival, 0, None)) * 2.2, self.max_thickness)
        epidural = self.epidural_thickness(i)
        vein = np.where(self.vein_arrival <= budget, self.vein_diameter, 0.0)
        thickness = np.maximum(np.maximum(body, vein), epidural).astype(np.float32)
        for frag in self.fragments:
            if frag["start"] <= budget:
                travelled = min(frag["length"], (budget - frag["start"]) * frag["speed"])
                p = frag["path"]
                k = min(len(p) - 1, int(travelled / frag["step"]))
                cx, cy = self.grid.px_from_mm(*p[k])
                r = frag["radius"] / self.grid.spacing_mm
                cv2.circle(
                    thickness,
                    (int(round(cx * 4)), int(round(cy * 4))),
                    int(round(r * 4)),
                    float(frag["radius"] * 1.6),
                    -1,
                    lineType=cv2.LINE_AA,
                    shift=2,
                )
        return thickness

    def epidural_thickness(self, i: int) -> np.ndarray:
        budget = float(self.schedule[i])
        return np.minimum(np.sqrt(np.clip(budget - self.epidural_arrival, 0, None)) * 2.2, 0.28 * self.max_thickness)

    def leak_areas_mm2(self, i: int, labels: np.ndarray) -> dict[str, float]:
        """Extravertebral cement of each kind (the spec's onset definition). Lateral: behind the
        line of the posterior wall or not. AP: the wall is seen en face, so posterior cement is
        the epidural cement itself (extravertebral in 3-D though it projects over the body)."""
        cement = labels == CEMENT
        px = self.grid.spacing_mm**2
        if self.view == "lateral":
            out = cement & ~self.treated_body
            return {
                "posterior": np.count_nonzero(out & self.behind_wall) * px,
                "venous": np.count_nonzero(out & ~self.behind_wall) * px,
            }
        epidural = cement & (self.epidural_thickness(i) >= VISIBLE_CEMENT_MM)
        venous = cement & ~self.treated_body & ~self.epidural
        return {"posterior": np.count_nonzero(epidural) * px, "venous": np.count_nonzero(venous) * px}

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(line integral, labels) on the scene grid for frame i."""
        cement = self.cement_thickness(i)
        integral = self.static_integral + self.needle_integral + self.mu_cement * cement
        labels = self.body_labels.copy()
        labels[cement >= VISIBLE_CEMENT_MM] = CEMENT
        labels[self.needle_mask] = NEEDLE
        return integral, labels

    def breathing_shift_px(self, i: int) -> tuple[float, float]:
        amp, angle, period, phase = self.breathing
        s = amp * math.sin(2 * math.pi * (i / self.fps) / period + phase) / self.grid.spacing_mm
        return s * math.cos(angle), s * math.sin(angle)

    # ------------------------------------------------------------------ sampling
    @classmethod
    def sample(
        cls,
        rng: np.random.Generator,
        height: int,
        width: int,
        spacing_mm: float,
        view: str,
        frames: int,
        fps: float,
        leaks: set[str],
        margin_px: int = 24,
    ) -> LoopScene:
        grid = Grid(
            height + 2 * margin_px,
            width + 2 * margin_px,
            spacing_mm,
            (margin_px + width * rng.uniform(0.38, 0.62), margin_px + height * rng.uniform(0.38, 0.62)),
        )
        posterior_sign = int(rng.choice([-1, 1]))
        # Anatomy is built with posterior = +x; the grid mirrors x when the canal is on the left.
        grid.x_sign = posterior_sign
        x, y = grid.mm_coords()
        if view not in ("lateral", "ap"):
            raise ValueError(f"view {view!r} must be 'lateral' or 'ap'")
        return _sample_view(cls, rng, grid, x, y, posterior_sign, frames, fps, leaks, view)


def _texture(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
    fine = smooth_noise(rng, shape, rng.uniform(0.4, 1.2) / spacing, anisotropy=rng.uniform(1.0, 3.0))
    coarse = smooth_noise(rng, shape, rng.uniform(3, 8) / spacing)
    return 0.6 * fine + 0.4 * coarse


def _vertebra(rng: np.random.Generator, scale: float = 1.0) -> Vertebra:
    hd = rng.uniform(14, 23) * scale
    hh = rng.uniform(10, 15) * scale
    return Vertebra(
        half_depth=hd,
        half_height=hh,
        corner=rng.uniform(1.5, 4.0),
        width_lr=rng.uniform(32, 52),
        tilt=rng.uniform(-0.28, 0.28),
        anterior_collapse=rng.choice([0.0, rng.uniform(0.05, 0.45)], p=[0.5, 0.5]),
        centre_collapse=rng.choice([0.0, rng.uniform(0.05, 0.25)], p=[0.6, 0.4]),
        defect_y=None,
    )


def _body_integral(rng, v: Vertebra, x, y, ox, oy, tex, spacing, defect: bool, view: str = "lateral") -> tuple:
    """Line integral and mask of one vertebral body (+ pedicles and posterior elements).
    Lateral: u runs anterior -> posterior. AP: u runs right -> left, the beam goes through
    the body front to back, and the pedicles are seen end-on as rings over the body."""
    full_shape = x.shape
    reach = v.half_depth + v.half_height + 60.0  # body, pedicles and posterior elements
    win = window(x, y, ox, oy, reach)
    if win is None:
        empty = np.zeros(full_shape, np.float32)
        return empty, np.zeros(full_shape, bool), np.full(full_shape, 1e3, np.float32), empty, empty
    x, y, tex = x[win], y[win], tex[win]
    lx, ly = x - ox, y - oy
    sdf = v.sdf(lx, ly)
    u, w = v.to_body(lx, ly)
    inside = sdf < 0
    chord_lr = v.width_lr * np.sqrt(np.clip(1 - 0.75 * (u / v.half_depth) ** 2, 0.15, 1))
    density = 1.0 + 0.22 * tex
    for cx, cy, a, b, factor in v.lesions:
        lesion = np.clip(-ellipse_sdf(u, w, cx, cy, a, b) / 2.0, 0, 1)
        density = density * (1 + (factor - 1) * lesion)
    trab = MU_TRABECULAR * chord_lr * density * inside
    shell = rng.uniform(0.6, 1.4)
    rim = rim_chord(sdf, shell, rng.uniform(6, 14))
    if defect and v.defect_y is not None and view == "lateral":
        y0, y1 = v.defect_y
        wall_gap = (u > v.half_depth - 3 * shell) & (w > y0) & (w < y1)
        rim = np.where(wall_gap, rim * 0.15, rim)
    integral = trab + MU_CORTICAL * rim
    if view == "ap":
        integral = _ap_elements(rng, v, u, w, integral)
        return _embed(win, full_shape, integral, inside, sdf, u, w)
    # pedicles (both overlap in a lateral view) and posterior elements behind the canal
    ped_u = v.half_depth + rng.uniform(4, 8)
    ped_v = -v.half_height * rng.uniform(0.2, 0.5)
    for k in range(2):
        psdf = ellipse_sdf(
            u,
            w,
            ped_u + k * rng.uniform(-1.5, 1.5),
            ped_v + k * rng.uniform(-1, 1),
            rng.uniform(5, 9),
            rng.uniform(4, 7),
            rng.uniform(-0.3, 0.3),
        )
        integral = integral + MU_TRABECULAR * 7 * (psdf < 0) + MU_CORTICAL * rim_chord(psdf, 0.8, 5)
    lam_u = v.half_depth + rng.uniform(13, 20)
    for cu, cv_, a, b, ang, thick in (
        (lam_u, -v.half_height * 0.1, rng.uniform(5, 8), rng.uniform(8, 12), rng.uniform(-0.4, 0.4), 14),
        (
            lam_u + rng.uniform(12, 20),
            v.half_height * rng.uniform(0.1, 0.6),
            rng.uniform(10, 17),
            rng.uniform(3.5, 6),
            rng.uniform(0.2, 0.7),
            8,
        ),
        (v.half_depth + rng.uniform(8, 14), -v.half_height * 1.05, rng.uniform(3, 5), rng.uniform(4, 6), 0.0, 10),
        (v.half_depth + rng.uniform(8, 14), v.half_height * 1.0, rng.uniform(3, 5), rng.uniform(4, 6), 0.0, 10),
    ):
        esdf = ellipse_sdf(u, w, cu, cv_, a, b, ang)
        integral = integral + MU_TRABECULAR * thick * (esdf < 0) + MU_CORTICAL * rim_chord(esdf, 0.8, 4)
    return _embed(win, full_shape, integral, inside, sdf, u, w)


def _embed(win, shape, integral, inside, sdf, u, w) -> tuple:
    """Place a window's planes back on the full grid (sdf far outside, body coords extrapolated)."""
    out_i = np.zeros(shape, np.float32)
    out_i[win] = integral
    out_in = np.zeros(shape, bool)
    out_in[win] = inside
    out_sdf = np.full(shape, 1e3, np.float32)
    out_sdf[win] = sdf
    out_u = np.full(shape, 1e3, np.float32)
    out_w = np.full(shape, 1e3, np.float32)
    out_u[win], out_w[win] = u, w
    return out_i, out_in, out_sdf, out_u, out_w


def _ap_elements(rng, v: Vertebra, u, w, integral: np.ndarray) -> np.ndarray:
    ped_u, ped_v = v.half_depth * rng.uniform(0.45, 0.65), -v.half_height * rng.uniform(0.15, 0.4)
    a, b = rng.uniform(3.5, 5.5), rng.uniform(5, 8)
    for side in (-1, 1):  # pedicles end-on: cortical rings
        psdf = ellipse_sdf(u, w, side * ped_u, ped_v, a, b, rng.uniform(-0.2, 0.2))
        integral = integral + MU_TRABECULAR * 10 * (psdf < 0) + MU_CORTICAL * rim_chord(psdf, 1.0, 10)
        tsdf = ellipse_sdf(
            u,
            w,
            side * (v.half_depth + rng.uniform(6, 14)),
            ped_v,
            rng.uniform(7, 12),
            rng.uniform(3, 5),
            rng.uniform(-0.3, 0.3),
        )  # transverse processes
        integral = integral + MU_TRABECULAR * 8 * (tsdf < 0) + MU_CORTICAL * rim_chord(tsdf, 0.8, 4)
    ssdf = ellipse_sdf(
        u, w, rng.uniform(-2, 2), v.half_height * rng.uniform(0.2, 0.6), rng.uniform(2.5, 5), rng.uniform(6, 11)
    )  # spinous process, midline
    lsdf = ellipse_sdf(u, w, 0, v.half_height * rng.uniform(0.3, 0.7), v.half_depth * 0.7, rng.uniform(3, 5))
    integral = integral + MU_TRABECULAR * 12 * (ssdf < 0) + MU_CORTICAL * rim_chord(ssdf, 0.8, 6)
    return integral + MU_TRABECULAR * 6 * (lsdf < 0)


def _soft_tissue(rng, x, y, spacing, lateral: bool) -> np.ndarray:
    thickness = rng.uniform(220, 360) if lateral else rng.uniform(160, 260)
    big = smooth_noise(rng, x.shape, rng.uniform(15, 40) / spacing)
    integral = MU_SOFT * thickness * (1 + 0.05 * big)
    # ribs (thoracic levels) and bowel gas (lumbar levels)
    if rng.random() < 0.35:
        for _ in range(rng.integers(1, 4)):
            cx, cy = rng.uniform(-80, 80), rng.uniform(-150, 150)
            radius = rng.uniform(80, 160)
            r = np.hypot(x - cx - radius, y - cy)
            band = np.abs(r - radius)
            width = rng.uniform(4, 7)
            integral += MU_CORTICAL * rim_chord(band - width, 0.8, 6) + MU_TRABECULAR * 12 * (band < width)
    if rng.random() < 0.4:
        for _ in range(rng.integers(1, 6)):
            gsdf = ellipse_sdf(
                x,
                y,
                rng.uniform(-90, 90),
                rng.uniform(-90, 90),
                rng.uniform(5, 25),
                rng.uniform(4, 18),
                rng.uniform(0, 3.14),
            )
            integral += MU_AIR_MINUS_SOFT * rng.uniform(10, 40) * np.clip(-gsdf / 4, 0, 1)
    return integral.astype(np.float32)


def _needles(rng, x, y, tips_and_entries) -> tuple[np.ndarray, np.ndarray, list]:
    integral = np.zeros(x.shape, np.float32)
    mask = np.zeros(x.shape, bool)
    needles = []
    for tip, through in tips_and_entries:
        direction = through - tip
        direction /= np.linalg.norm(direction)
        back = tip + direction * 400.0
        radius = rng.uniform(1.0, 1.7)  # 13 G .. 10 G outer diameter / 2
        d = _segment_distance(x, y, tip, back)
        outer = 2 * np.sqrt(np.clip(radius**2 - d**2, 0, None))
        inner = 2 * np.sqrt(np.clip((0.72 * radius) ** 2 - d**2, 0, None))
        integral += MU_STEEL * (outer - inner * rng.uniform(0.3, 1.0))
        mask |= d <= radius
        needles.append(Needle(tip, back, radius))
    return integral, mask, needles


def _vein_path(rng, start: np.ndarray, heading: float, length: float) -> np.ndarray:
    pts = [start.copy()]
    step = 0.6
    p = start.copy()
    h = heading
    for _ in range(int(length / step)):
        h += rng.normal(0, 0.22)
        h = 0.9 * h + 0.1 * heading  # keep a general direction, tortuous in detail
        p = p + step * np.array([math.cos(h), math.sin(h)])
        pts.append(p.copy())
    return np.array(pts)


def _draw_veins(grid: Grid, veins: list[Vein], arrival_at_entry: list[float]):
    shape = (grid.height, grid.width)
    arrival = np.full(shape, np.inf, np.float32)
    diameter = np.zeros(shape, np.float32)
    for vein, start in zip(veins, arrival_at_entry, strict=True):
        if not np.isfinite(start):
            continue
        seg = np.linalg.norm(np.diff(vein.points, axis=0), axis=1)
        along = np.concatenate([[0.0], np.cumsum(seg)])
        times = start + vein.delay + along * vein.speed
        # draw far segments first so the earlier (nearer) arrival wins where they overlap
        for k in range(len(vein.points) - 2, -1, -1):
            p0 = grid.px_from_mm(*vein.points[k])
            p1 = grid.px_from_mm(*vein.points[k + 1])
            thick = max(1, int(round(vein.diameters[k] / grid.spacing_mm)))
            pts = (tuple(int(round(c * 4)) for c in p0), tuple(int(round(c * 4)) for c in p1))
            cv2.line(arrival, pts[0], pts[1], float(times[k]), thick, lineType=cv2.LINE_8, shift=2)
            cv2.line(diameter, pts[0], pts[1], float(vein.diameters[k]), thick, lineType=cv2.LINE_8, shift=2)
    return arrival, diameter


def _schedule(rng, frames: int, start_budget: float, end_budget: float) -> np.ndarray:
    """Injected cement over the loop: a ramp with pauses (the injector stops and restarts)."""
    rate = rng.uniform(0.4, 1.0, size=frames)
    rate[rng.random(frames) < 0.15] = 0.0
    cum = np.cumsum(rate)
    cum = cum / max(cum[-1], 1e-9)
    return (start_budget + (end_budget - start_budget) * cum).astype(np.float32)


def _sample_view(cls, rng, grid: Grid, x, y, sign, frames, fps, leaks: set[str], view: str) -> LoopScene:
    spacing = grid.spacing_mm
    lateral = view == "lateral"
    tex = _texture(rng, x.shape, spacing)
    static = _soft_tissue(rng, x, y, spacing, lateral=lateral)
    body_labels = np.zeros(x.shape, np.uint8)

    treated = _vertebra(rng)
    if not lateral:  # seen from the front: wider than deep
        treated.half_depth, treated.width_lr = rng.uniform(19, 27), rng.uniform(28, 44)
        treated.anterior_collapse *= 0.5
    disrupted = "posterior" in leaks or rng.random() < 0.5  # most cancer patients: disrupted wall
    if disrupted:
        c = rng.uniform(-0.5, 0.5) * treated.half_height
        span = rng.uniform(3, 9)
        treated.defect_y = (c - span / 2, c + span / 2)
    for _ in range(rng.integers(0, 3)):
        treated.lesions.append(
            (
                rng.uniform(-0.6, 0.6) * treated.half_depth,
                rng.uniform(-0.6, 0.6) * treated.half_height,
                rng.uniform(3, 10),
                rng.uniform(3, 8),
                # lytic (most) or sclerotic; sclerotic bone stays well below cement's opacity
                float(rng.choice([rng.uniform(0.2, 0.7), rng.uniform(1.15, 1.6)], p=[0.65, 0.35])),
            )
        )
    integral, inside, sdf, u, w = _body_integral(rng, treated, x, y, 0.0, 0.0, tex, spacing, True, view)
    static += integral
    body_labels[inside] = BODY
    # neighbours above and below (discs between), following the spine's curve
    for k in (-2, -1, 1, 2):
        nb = _vertebra(rng)
        if not lateral:
            nb.half_depth, nb.width_lr = treated.half_depth * rng.uniform(0.9, 1.1), treated.width_lr
            nb.anterior_collapse = 0.0
        disc = rng.uniform(5, 11)
        oy = k * (treated.half_height + nb.half_height + disc) * (1 if abs(k) == 1 else 1.02)
        ox = k * rng.uniform(-4, 4) + (k * k) * rng.uniform(-1.5, 1.5)
        nb.tilt = treated.tilt + k * rng.uniform(-0.12, 0.12)
        ni, ninside, *_ = _body_integral(rng, nb, x, y, ox, oy, tex, spacing, False, view)
        static += ni
        body_labels[ninside] = BODY

    behind = treated.behind_posterior_wall(x, y) if lateral else np.zeros(x.shape, bool)
    # needles: transpedicular, from behind, tip in the anterior-middle body
    n_needles = int(rng.choice([1, 2], p=[0.55, 0.45]))
    tips_entries = []
    hd, hh = treated.half_depth, treated.half_height
    first_side = int(rng.choice([-1, 1]))
    for k in range(n_needles):
        if lateral:
            ped = np.array(treated.from_body(hd + rng.uniform(4, 8), -hh * rng.uniform(0.15, 0.45)))
            tip_body = (rng.uniform(-0.65, 0.15) * hd, rng.uniform(-0.45, 0.45) * hh)
        else:  # AP: through each pedicle ring toward the midline
            side = first_side * (1 if k == 0 else -1)
            ped = np.array(treated.from_body(side * hd * 0.55, -hh * rng.uniform(0.15, 0.4)))
            tip_body = (side * rng.uniform(-0.2, 0.3) * hd, rng.uniform(-0.35, 0.4) * hh)
        tip = np.array(treated.from_body(*tip_body), dtype=np.float64)
        through = ped + rng.normal(0, 1.5, size=2)
        tips_entries.append((tip, through))
    needle_integral, needle_mask, needles = _needles(rng, x, y, tips_entries)

    # cement: arrival field on a coarse grid (~0.5 mm)
    coarse = max(1, int(round(0.5 / spacing)))
    cs = (math.ceil(x.shape[0] / coarse), math.ceil(x.shape[1] / coarse))
    porosity = smooth_noise(rng, cs, rng.uniform(0.8, 2.5) / (spacing * coarse))
    lesion_boost = cv2.resize(tex, (cs[1], cs[0]), interpolation=cv2.INTER_AREA)
    cost = np.exp(0.55 * porosity - 0.25 * lesion_boost).astype(np.float32)
    sdf_c = cv2.resize(sdf, (cs[1], cs[0]), interpolation=cv2.INTER_LINEAR)
    u_c = cv2.resize(u, (cs[1], cs[0]), interpolation=cv2.INTER_LINEAR)
    w_c = cv2.resize(w, (cs[1], cs[0]), interpolation=cv2.INTER_LINEAR)
    cost[sdf_c > -0.6] = np.inf
    epidural_c = (
        (u_c > treated.half_depth)
        & (u_c < treated.half_depth + rng.uniform(2.5, 5))
        & (np.abs(w_c) < treated.half_height + rng.uniform(2, 10))
    )
    if "posterior" in leaks and treated.defect_y is not None:
        y0, y1 = treated.defect_y
        gap = (u_c > treated.half_depth - 3) & (u_c <= treated.half_depth + 0.6) & (w_c > y0) & (w_c < y1)
        cost[gap] = rng.uniform(0.8, 2.0)
        cost[epidural_c] = rng.uniform(0.5, 1.5) * np.exp(0.3 * porosity[epidural_c])
    sources = []
    for nd in needles:
        px, py = grid.px_from_mm(*nd.tip)
        sources.append((int(np.clip(py / coarse, 0, cs[0] - 1)), int(np.clip(px / coarse, 0, cs[1] - 1))))
    arrival_c = _arrival_times(cost, sources) * spacing * coarse  # mm-ish units
    arrival = cv2.resize(
        np.where(np.isfinite(arrival_c), arrival_c, 1e6).astype(np.float32),
        (x.shape[1], x.shape[0]),
        interpolation=cv2.INTER_LINEAR,
    )
    arrival += 0.8 * smooth_noise(rng, x.shape, 0.6 / spacing)  # irregular, lobulated edges
    epidural = cv2.resize(
        epidural_c.astype(np.uint8), (x.shape[1], x.shape[0]), interpolation=cv2.INTER_NEAREST
    ).astype(bool)
    epidural_arrival = np.where(epidural & (sdf > 0), arrival, 1e6).astype(np.float32)
    arrival[sdf > 0] = 1e6
    if not lateral and "posterior" in leaks:
        # AP: the epidural space lies behind the body, so its cement spreads from the wall defect
        # over the projection of the body: its own arrival field, started where the body's
        # cement reaches the defect.
        defect = np.array(treated.from_body(rng.uniform(-0.3, 0.3) * hd, rng.uniform(-0.4, 0.4) * hh))
        dpx, dpy = grid.px_from_mm(*defect)
        r, c = int(np.clip(dpy, 0, x.shape[0] - 1)), int(np.clip(dpx, 0, x.shape[1] - 1))
        band = (np.abs(u_c) < hd * rng.uniform(0.25, 0.45)) & (np.abs(w_c) < hh + rng.uniform(3, 12))
        epi_cost = np.where(band, rng.uniform(0.5, 1.5) * np.exp(0.3 * porosity), np.inf).astype(np.float32)
        epi_c = _arrival_times(epi_cost, [(min(r // coarse, cs[0] - 1), min(c // coarse, cs[1] - 1))])
        epi = cv2.resize(
            np.where(np.isfinite(epi_c), epi_c * spacing * coarse, 1e6).astype(np.float32),
            (x.shape[1], x.shape[0]),
            interpolation=cv2.INTER_LINEAR,
        )
        epidural = cv2.resize(band.astype(np.uint8), (x.shape[1], x.shape[0]), interpolation=cv2.INTER_NEAREST).astype(
            bool
        )
        a_defect = float(arrival[r, c]) if arrival[r, c] < 1e5 else 0.0
        epidural_arrival = np.where(epidural, a_defect + epi, 1e6).astype(np.float32)

    finite = arrival_c[np.isfinite(arrival_c)]
    fill_budget = float(np.quantile(finite, rng.uniform(0.15, 0.6))) if finite.size else 1.0
    end_budget = fill_budget
    planned: dict = {}
    if "posterior" in leaks and treated.defect_y is not None:
        gap_px = epidural_arrival < 1e5
        if gap_px.any():
            a_def = float(epidural_arrival[gap_px].min())
            end_budget = max(end_budget, a_def + rng.uniform(4, 14))
            planned["posterior"] = a_def

    veins: list[Vein] = []
    vein_entry_times: list[float] = []
    if "venous" in leaks:
        for _ in range(int(rng.choice([1, 2], p=[0.7, 0.3]))):
            # exit anterior or through an endplate corner toward paravertebral / segmental veins
            where = rng.choice(["anterior", "superior", "inferior"], p=[0.5, 0.25, 0.25])
            if not lateral and where == "anterior":  # AP: segmental veins leave the lateral walls
                side = rng.choice([-1, 1])
                ub, vb = side * treated.half_depth, rng.uniform(-0.6, 0.6) * treated.half_height
                heading_b = (0.0 if side > 0 else math.pi) + rng.uniform(-0.6, 0.6)
            elif where == "anterior":
                ub, vb = -treated.half_depth, rng.uniform(-0.6, 0.6) * treated.half_height
                heading_b = math.pi + rng.uniform(-0.6, 0.6)
            else:
                s = -1 if where == "superior" else 1
                ub, vb = rng.uniform(-0.9, -0.2) * treated.half_depth, s * treated.half_height
                heading_b = s * math.pi / 2 + rng.uniform(-0.5, 0.2) * s + math.pi * rng.uniform(0.1, 0.3)
            start = np.array(treated.from_body(ub, vb))
            inside_pt = np.array(treated.from_body(ub * 0.85, vb * 0.85))
            heading = heading_b + treated.tilt
            path = _vein_path(rng, start, heading, rng.uniform(20, 70))
            diam = np.linspace(rng.uniform(2.0, 3.5), rng.uniform(1.5, 2.2), len(path))
            veins.append(Vein(path, diam, tuple(inside_pt), rng.uniform(0, 3), rng.uniform(0.05, 0.3)))
            if rng.random() < 0.5:  # a branch
                b0 = int(rng.integers(len(path) // 4, max(len(path) // 4 + 1, len(path) - 5)))
                bp = _vein_path(
                    rng, path[b0], heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), rng.uniform(10, 30)
                )
                veins.append(
                    Vein(
                        bp,
                        np.full(len(bp), diam[b0] * 0.8),
                        tuple(inside_pt),
                        veins[-1].delay + b0 * 0.6 * veins[-1].speed,
                        veins[-1].speed,
                    )
                )
        for vein in veins:
            px, py = grid.px_from_mm(*vein.entry_inside)
            r, c = int(np.clip(py, 0, x.shape[0] - 1)), int(np.clip(px, 0, x.shape[1] - 1))
            vein_entry_times.append(float(arrival[r, c]) if arrival[r, c] < 1e5 else float(fill_budget * 0.5))
        first = min(t + v.delay for t, v in zip(vein_entry_times, veins, strict=True))
        end_budget = max(end_budget, first + rng.uniform(4, 14))
        planned["venous"] = first
    vein_arrival, vein_diameter = _draw_veins(grid, veins, vein_entry_times)
    vein_arrival[~np.isfinite(vein_arrival)] = 1e6

    fragments = []
    if veins and rng.random() < 0.35:
        main = veins[0]
        extra = _vein_path(rng, main.points[-1], rng.uniform(0, 2 * math.pi), rng.uniform(20, 60))
        fragments.append(
            {
                "path": extra,
                "step": 0.6,
                "length": 0.6 * (len(extra) - 1),
                "start": vein_entry_times[0] + main.delay + 0.6 * len(main.points) * main.speed,
                "speed": rng.uniform(3, 10),
                "radius": rng.uniform(1.0, 2.5),
            }
        )
        end_budget = max(end_budget, fragments[0]["start"] + rng.uniform(1, 6))

    start_budget = rng.uniform(0.0, 0.5) * min(end_budget, fill_budget)
    if planned:  # the leak happens inside the loop, not before it
        start_budget = min(start_budget, 0.7 * min(planned.values()))
    schedule = _schedule(rng, frames, start_budget, end_budget)

    return cls(
        grid=grid,
        view=view,
        posterior_sign=sign if lateral else 0,
        frames=frames,
        fps=fps,
        static_integral=static,
        body_labels=body_labels,
        treated_body=inside,
        behind_wall=behind,
        needle_integral=needle_integral,
        needle_mask=needle_mask,
        arrival=arrival.astype(np.float32),
        epidural_arrival=epidural_arrival,
        epidural=epidural,
        max_thickness=treated.width_lr * rng.uniform(0.3, 0.6),
        schedule=schedule,
        vein_arrival=vein_arrival,
        vein_diameter=vein_diameter,
        fragments=fragments,
        mu_cement=MU_CEMENT * float(rng.uniform(1.3, 3.0)),
        breathing=(rng.uniform(0, 3.0), rng.uniform(0, 2 * math.pi), rng.uniform(3, 6), rng.uniform(0, 6.3)),
    )
