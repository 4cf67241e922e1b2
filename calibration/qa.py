"""A picture for the physicist: what the calibration saw and how well the model fits."""

from __future__ import annotations

import cv2
import numpy as np

from calibration.fit import FitReport
from calibration.intensity import window_unit


def overlay(image: np.ndarray, report: FitReport, gain: float = 50.0) -> np.ndarray:
    """8-bit BGR view of the phantom image: beads used (green, residual vector x `gain` in
    yellow), beads rejected as outliers (red), beads found but not on the grid (grey), the
    field of view (blue), the bead the indexing started from (cyan square)."""
    grey = (window_unit(image) * 255).astype(np.uint8)
    out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    det = report.detection
    r = max(2, int(round(det.pitch_px * 0.2)))
    used = {tuple(np.round(p, 3)) for p in report.xy}
    rejected = {tuple(np.round(p, 3)) for p in report.rejected_xy}
    for p in det.xy:
        key = tuple(np.round(p, 3))
        if key not in used and key not in rejected:
            cv2.circle(out, _pt(p), r, (128, 128, 128), 1, cv2.LINE_AA)
    for p in report.rejected_xy:
        cv2.circle(out, _pt(p), r + 1, (0, 0, 255), 2, cv2.LINE_AA)
    for p, res in zip(report.xy, report.residual_xy, strict=True):
        cv2.circle(out, _pt(p), r, (0, 200, 0), 1, cv2.LINE_AA)
        cv2.line(out, _pt(p), _pt(p + gain * res), (0, 220, 255), 1, cv2.LINE_AA)
    if det.fov is not None:
        cx, cy, rf = det.fov
        centre = (int(round(cx * 16)), int(round(cy * 16)))  # 4 fractional bits
        cv2.circle(out, centre, int(round(rf * 16)), (255, 128, 0), 1, cv2.LINE_AA, shift=4)
    seed = np.argmin(np.hypot(*(report.xy - np.asarray(det.center_xy)).T))
    sx, sy = _pt(report.xy[seed])
    cv2.rectangle(out, (sx - r - 2, sy - r - 2), (sx + r + 2, sy + r + 2), (255, 255, 0), 1)
    res = report.entry["residuals"]
    text = (
        f"{report.entry['pixel_spacing_mm']:.4f} mm/px  RMS {res['rms_px']:.3f} px  "
        f"max {res['max_px']:.3f} px  residuals x{gain:g}"
    )
    cv2.putText(out, text, (8, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 220, 255), 1, cv2.LINE_AA)
    return out


def _pt(p) -> tuple[int, int]:
    return int(round(float(p[0]))), int(round(float(p[1])))
