"""Bead grid image -> one angulation's calibration (a JSON-ready dict).

Model (as in the image-intensifier literature): a global 2-D polynomial of order 5 mapping
distorted pixels to the phantom plane, fitted by least squares to the indexed beads.

The corrected ("ideal") frame is the phantom plane seen by an undistorted camera that matches
the raw frame at the centre of the field (same position, scale and rotation there, where
distortion is least), so a corrected frame overlays the raw one at the centre and straightens
toward the rim. Its pixel spacing is that scale: millimetres in the phantom plane per pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from calibration.beads import BeadDetection, detect_beads, index_grid
from calibration.intensity import fit_circle
from calibration.transforms import Polynomial2D, Similarity2D, n_terms
from guidance import __version__
from guidance.errors import CalibrationError

SCHEMA = "cement-guidance-calibration/1"
DEFAULT_ORDER = 5
INVERSE_ORDER = 7  # the inverse of a 5th-order map is not a 5th-order map; 7 holds it to ~0.01 px
# Trust limits, applied when writing and again when loading (never read from the file).
MAX_RMS_PX = 0.5
MAX_RESIDUAL_PX = 2.0
MAX_ROUNDTRIP_PX = 0.1
SPACING_RANGE_MM = (0.02, 2.0)  # C-arm pixel at the isocentre: ~0.1-0.5 mm
BEADS_PER_TERM = 3


def min_beads(order: int) -> int:
    return max(BEADS_PER_TERM * n_terms(order), 12)


@dataclass(frozen=True)
class FitReport:
    entry: dict[str, Any]
    detection: BeadDetection
    ij: np.ndarray
    xy: np.ndarray  # beads used in the final fit, distorted px
    residual_xy: np.ndarray  # per bead, ideal px
    rejected_xy: np.ndarray  # indexed beads dropped as outliers, distorted px


def without_gross_outliers(
    residual_norms: Callable[[np.ndarray], np.ndarray], count: int, need: int, rounds: int = 3
) -> np.ndarray:
    """Bool mask of the beads to keep: only gross outliers (a mis-centred or mis-indexed bead,
    dust) go. `residual_norms(keep)` fits on the kept beads and returns every bead's residual
    length (px); a bead over 5 robust sigmas (and over 0.5 px) is dropped, for up to `rounds`
    refits, never leaving fewer than `need`."""
    keep = np.ones(count, dtype=bool)
    for _ in range(rounds):
        norms = residual_norms(keep)
        sigma = 1.4826 * float(np.median(norms[keep]))
        new_keep = norms <= max(5.0 * sigma, 0.5)
        if np.array_equal(new_keep, keep) or new_keep.sum() < need:
            break
        keep = new_keep
    return keep


def calibrate_image(
    image: np.ndarray,
    pitch_mm: float,
    order: int = DEFAULT_ORDER,
    bead_polarity: str = "auto",
    fov: tuple[float, float, float] | None | str = "auto",
    source: dict[str, Any] | None = None,
) -> FitReport:
    if not (math.isfinite(pitch_mm) and pitch_mm > 0):
        raise CalibrationError(f"--pitch-mm must be a positive number of millimetres, got {pitch_mm}")
    if not 1 <= order <= 7:
        raise CalibrationError(f"polynomial order must be 1..7, got {order}")
    h, w = image.shape[:2]
    det = detect_beads(image, bead_polarity, fov)
    need = min_beads(order)
    if len(det.xy) < need:
        raise CalibrationError(
            f"too few beads: found {len(det.xy)}, a order-{order} fit needs at least {need} "
            "(does the phantom fill the field, is this a bead grid? a lower --order needs fewer)"
        )
    ij, idx = index_grid(det.xy, det.center_xy, det.pitch_px)
    xy = det.xy[idx]
    if len(xy) < need:
        raise CalibrationError(
            f"too few beads on a regular grid: {len(xy)} of {len(det.xy)} found could be indexed, "
            f"a order-{order} fit needs at least {need}"
        )
    ref = (det.fov[0], det.fov[1]) if det.fov else ((w - 1) / 2, (h - 1) / 2)
    scale = float(np.max(np.hypot(xy[:, 0] - ref[0], xy[:, 1] - ref[1])))

    def residual_norms(keep: np.ndarray) -> np.ndarray:
        poly, sim, _ = _fit(xy[keep], ij[keep], pitch_mm, order, ref, scale)
        return np.hypot(*_residuals(poly, sim, xy, ij, pitch_mm).T)

    keep = without_gross_outliers(residual_norms, len(xy), need)
    rejected = int((~keep).sum())
    poly, sim, resid = _fit(xy[keep], ij[keep], pitch_mm, order, ref, scale)
    spacing = sim.scale
    lo, hi = SPACING_RANGE_MM
    if not lo <= spacing <= hi:
        raise CalibrationError(
            f"a pitch of {pitch_mm:g} mm ({det.pitch_px:.1f} px between beads) gives "
            f"{spacing:.4g} mm per pixel, outside the plausible {lo:g}-{hi:g} mm for a C-arm at "
            "the phantom plane; check --pitch-mm"
        )
    norms = np.hypot(resid[:, 0], resid[:, 1])
    rms, worst = float(np.sqrt(np.mean(norms**2))), float(norms.max())
    if rms > MAX_RMS_PX or worst > MAX_RESIDUAL_PX:
        raise CalibrationError(
            f"the beads do not fit a regular {pitch_mm:g} mm grid: RMS residual {rms:.2f} px, "
            f"max {worst:.2f} px (limits {MAX_RMS_PX} and {MAX_RESIDUAL_PX} px)"
        )
    ideal_from_distorted = sim.inverse().compose_polynomial(poly)
    fit_radius = scale
    # where the beads vouch for the model: the grid's inscribed reach around the field centre
    # plus 1.5 pitches (the ring of beads cut by the field edge is missing by design); beyond
    # it (a phantom smaller than the field) the corrected frame is masked
    limit = det.fov[2] if det.fov is not None else math.hypot(w, h) / 2
    covered = _covered_radius(xy[keep], ref, 1.5 * det.pitch_px, limit, (w, h))
    if det.fov is not None:
        valid: tuple[float, float, float] = (det.fov[0], det.fov[1], covered)
    else:
        valid = (ref[0], ref[1], covered)
    distorted_from_ideal, roundtrip = _fit_inverse(ideal_from_distorted, ref, valid[2], (w, h))
    fov_ideal = _ideal_fov(ideal_from_distorted, valid if det.fov is not None else None)
    jac = poly.jacobian(np.array([ref]))[0]
    sv = np.linalg.svd(jac, compute_uv=False)
    entry: dict[str, Any] = {
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "software": f"cement-guidance {__version__}",
        "source_image": source or {},
        "image_size": [int(w), int(h)],
        "pixel_spacing_mm": float(spacing),
        "grid_rotation_deg": float(math.degrees(sim.angle_rad)),
        "center_aspect_ratio": float(sv[0] / sv[1]),
        "phantom": {
            "pitch_mm": float(pitch_mm),
            "bead_polarity": det.polarity,
            "pitch_px": float(det.pitch_px),
            "beads_found": int(len(det.xy)),
            "beads_indexed": int(len(xy)),
            "beads_used": int(keep.sum()),
            "beads_rejected": rejected,
            "beads_cut_by_fov": int(det.dropped_at_edge),
        },
        "fov": None if fov_ideal is None else {"center_xy": list(fov_ideal[:2]), "radius_px": fov_ideal[2]},
        "fov_distorted": None
        if det.fov is None
        else {"center_xy": [float(det.fov[0]), float(det.fov[1])], "radius_px": float(det.fov[2])},
        "fit_radius_px": float(fit_radius),
        "calibrated_radius_px": float(valid[2]),
        "ideal_from_distorted": ideal_from_distorted.to_json(),
        "distorted_from_ideal": distorted_from_ideal.to_json(),
        "residuals": {
            "rms_px": rms,
            "max_px": worst,
            "rms_mm": rms * spacing,
            "max_mm": worst * spacing,
            "roundtrip_max_px": roundtrip,
        },
    }
    return FitReport(entry, det, ij[keep], xy[keep], resid, xy[~keep])


def _fit(
    xy: np.ndarray,
    ij: np.ndarray,
    pitch_mm: float,
    order: int,
    ref: tuple[float, float],
    scale: float,
) -> tuple[Polynomial2D, Similarity2D, np.ndarray]:
    """phantom_from_distorted polynomial, phantom_from_ideal similarity, residuals (ideal px)."""
    poly = Polynomial2D.fit(xy, ij * pitch_mm, order, ref, scale)
    jac = poly.jacobian(np.array([ref]))[0]
    # nearest similarity to the local Jacobian at the field centre: scale and rotation there
    p, q = (jac[0, 0] + jac[1, 1]) / 2, (jac[1, 0] - jac[0, 1]) / 2
    spacing, angle = math.hypot(p, q), math.atan2(q, p)
    at_ref = poly(np.array([ref]))[0]
    rot = Similarity2D(spacing, angle, (0.0, 0.0))
    t = at_ref - rot(np.array([ref]))[0]
    sim = Similarity2D(spacing, angle, (float(t[0]), float(t[1])))  # phantom_from_ideal
    return poly, sim, _residuals(poly, sim, xy, ij, pitch_mm)


def _residuals(poly: Polynomial2D, sim: Similarity2D, xy: np.ndarray, ij: np.ndarray, pitch_mm: float) -> np.ndarray:
    return (poly(xy) - ij * pitch_mm) / sim.scale


def _covered_radius(
    xy: np.ndarray,
    ref: tuple[float, float],
    margin: float,
    limit: float,
    size: tuple[int, int],
    sectors: int = 24,
) -> float:
    """Radius around `ref` (at most `limit`) that the beads vouch for in every direction: per
    angular sector, the outermost bead + `margin`; a sector whose beads reach the end of the
    image in that direction (the field edge or the frame edge) is fully covered."""
    w, h = size
    d = xy - np.asarray(ref)
    dist = np.hypot(d[:, 0], d[:, 1])
    sector = np.floor((np.arctan2(d[:, 1], d[:, 0]) + np.pi) / (2 * np.pi) * sectors).astype(int)
    reach = np.zeros(sectors)
    np.maximum.at(reach, np.clip(sector, 0, sectors - 1), dist)
    out = limit
    for k in range(sectors):
        # image extent along the sector's two bounding rays
        avail = limit
        for a in (-np.pi + 2 * np.pi * k / sectors, -np.pi + 2 * np.pi * (k + 1) / sectors):
            c, s = math.cos(a), math.sin(a)
            tx = ((w - 1 - ref[0]) / c if c > 1e-9 else -ref[0] / c) if abs(c) > 1e-9 else np.inf
            ty = ((h - 1 - ref[1]) / s if s > 1e-9 else -ref[1] / s) if abs(s) > 1e-9 else np.inf
            avail = min(avail, tx, ty)
        if reach[k] + margin < avail:
            out = min(out, reach[k] + margin)
    return float(out)


def _fit_inverse(
    ideal_from_distorted: Polynomial2D, ref: tuple[float, float], reach: float, size: tuple[int, int]
) -> tuple[Polynomial2D, float]:
    """distorted_from_ideal, fitted on a dense sampling of the calibrated disc (within the frame)."""
    step = max(2.0, reach / 60)
    g = np.arange(-reach, reach + step, step)
    xx, yy = np.meshgrid(g + ref[0], g + ref[1])
    pts = np.column_stack([xx.ravel(), yy.ravel()])
    pts = pts[np.hypot(pts[:, 0] - ref[0], pts[:, 1] - ref[1]) <= reach]
    w, h = size
    pts = pts[(pts[:, 0] >= -2) & (pts[:, 1] >= -2) & (pts[:, 0] <= w + 1) & (pts[:, 1] <= h + 1)]
    ideal = ideal_from_distorted(pts)
    inv = Polynomial2D.fit(ideal, pts, INVERSE_ORDER, ref, reach)
    back = inv(ideal)
    return inv, float(np.max(np.hypot(*(back - pts).T)))


def _ideal_fov(
    ideal_from_distorted: Polynomial2D, fov: tuple[float, float, float] | None
) -> tuple[float, float, float] | None:
    """The raw field circle seen in the corrected frame: its centre, and the inscribed radius
    (so that everything inside the corrected mask is real image)."""
    if fov is None:
        return None
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    rim = np.column_stack([fov[0] + fov[2] * np.cos(t), fov[1] + fov[2] * np.sin(t)])
    mapped = ideal_from_distorted(rim)
    cx, cy, _, _ = fit_circle(mapped, iterations=1)
    r = float(np.min(np.hypot(mapped[:, 0] - cx, mapped[:, 1] - cy)))
    return float(cx), float(cy), r
