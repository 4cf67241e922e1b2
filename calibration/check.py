"""Constancy check: does a stored calibration still fit this C-arm?

Image-intensifier distortion drifts (orientation in the Earth's field, ageing, service work) and
the pixel spacing at the phantom plane moves with the geometry, so a physicist re-images the
phantom at intervals and checks the stored calibration against the new image rather than
refitting blind. Here the new image's beads are found and indexed as for a calibration, moved
through the STORED correction (`ideal_from_distorted`) and compared with a perfect grid
(rotation, shift and scale fitted, nothing else): what is left over is the distortion the stored
model no longer removes, and the fitted scale gives the pixel spacing now.

    report = check_image(image, pitch_mm=5.0, calibration=load_calibration("calib.json", "lateral"))
    report.passed, report.rms_px, report.spacing_change_pct
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from calibration.beads import detect_beads, index_grid
from calibration.fit import without_gross_outliers
from calibration.runtime import Calibration
from calibration.transforms import fit_rigid
from guidance.errors import CalibrationError

MAX_RMS_PX = 0.5  # default tolerance: residual RMS after the stored correction
MAX_SPACING_CHANGE_PCT = 1.0  # default tolerance: pixel spacing against the stored one
MIN_BEADS = 20


@dataclass(frozen=True)
class ConstancyReport:
    angulation: str
    beads_found: int
    beads_used: int  # indexed on the grid and not rejected as gross outliers
    rms_px: float  # residual off a perfect grid after the stored correction
    max_px: float
    spacing_mm: float  # measured now, mm per corrected pixel at the phantom plane
    stored_spacing_mm: float
    spacing_change_pct: float
    max_rms_px: float
    max_spacing_change_pct: float
    failures: tuple[str, ...]  # empty: within tolerance

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {**asdict(self), "failures": list(self.failures), "passed": self.passed}


def check_image(
    image: np.ndarray,
    pitch_mm: float,
    calibration: Calibration,
    bead_polarity: str = "auto",
    max_rms_px: float = MAX_RMS_PX,
    max_spacing_change_pct: float = MAX_SPACING_CHANGE_PCT,
) -> ConstancyReport:
    """The stored calibration against a new phantom image of the same C-arm position.
    CalibrationError when the image cannot be checked (another size, too few beads)."""
    if not (math.isfinite(pitch_mm) and pitch_mm > 0):
        raise CalibrationError(f"--pitch-mm must be a positive number of millimetres, got {pitch_mm}")
    calibration.check_frame(image)
    det = detect_beads(image, bead_polarity, calibration.fov_distorted)
    ij, idx = index_grid(det.xy, det.center_xy, det.pitch_px)
    if len(idx) < MIN_BEADS:
        raise CalibrationError(
            f"too few beads on a regular grid: {len(idx)} of {len(det.xy)} found could be indexed, "
            f"a check needs at least {MIN_BEADS} (is this the phantom, and does it fill the field?)"
        )
    corrected = calibration.ideal_from_distorted(det.xy[idx])
    lattice_mm = ij.astype(np.float64) * pitch_mm

    def residual_norms(keep: np.ndarray) -> np.ndarray:
        sim = fit_rigid(lattice_mm[keep], corrected[keep], with_scale=True)
        return np.hypot(*(corrected - sim(lattice_mm)).T)

    keep = without_gross_outliers(residual_norms, len(corrected), MIN_BEADS)  # as the fit does
    sim = fit_rigid(lattice_mm[keep], corrected[keep], with_scale=True)
    norms = np.hypot(*(corrected[keep] - sim(lattice_mm[keep])).T)
    rms, worst = float(np.sqrt(np.mean(norms**2))), float(norms.max())
    spacing = 1.0 / sim.scale
    change = 100.0 * (spacing / calibration.pixel_spacing_mm - 1.0)
    failures = []
    if rms > max_rms_px:
        failures.append(
            f"residual RMS {rms:.3f} px after the stored correction exceeds {max_rms_px:g} px: "
            "the distortion has changed, recalibrate"
        )
    if abs(change) > max_spacing_change_pct:
        failures.append(
            f"pixel spacing {spacing:.5f} mm differs from the stored {calibration.pixel_spacing_mm:.5f} mm "
            f"by {change:+.2f} % (tolerance {max_spacing_change_pct:g} %): the geometry has changed, recalibrate"
        )
    return ConstancyReport(
        angulation=calibration.angulation,
        beads_found=len(det.xy),
        beads_used=int(keep.sum()),
        rms_px=rms,
        max_px=worst,
        spacing_mm=spacing,
        stored_spacing_mm=calibration.pixel_spacing_mm,
        spacing_change_pct=change,
        max_rms_px=max_rms_px,
        max_spacing_change_pct=max_spacing_change_pct,
        failures=tuple(failures),
    )
