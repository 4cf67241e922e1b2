"""Accuracy of the calibration against rendered phantoms with a known distortion.

    python bench/calibration_accuracy.py

For each phantom case of tests/test_calibration_fit.py, prints: the pixel spacing against the
true local scale at the field centre, the worst error of distances measured across the field in
the corrected frame, the RMS/max error after correction against the true geometry (rigid fit
only, so scale errors count), the straightness of the grid re-detected in the corrected image,
and the fit residual the file reports.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_calibration_fit import CASES, _field_points  # noqa: E402

from calibration.beads import detect_beads, index_grid  # noqa: E402
from calibration.fit import calibrate_image  # noqa: E402
from calibration.phantom import render_phantom  # noqa: E402
from calibration.runtime import load_calibration  # noqa: E402
from calibration.store import write_angulation  # noqa: E402
from calibration.transforms import fit_rigid  # noqa: E402


def main() -> int:
    print(
        f"{'case':18s} {'spacing':>9s} {'vs truth':>9s} {'worst dist':>10s} {'truth RMS':>9s} "
        f"{'truth max':>9s} {'straight':>8s} {'fit RMS':>8s} {'fit max':>8s} beads"
    )
    for name, spec in sorted(CASES.items()):
        image, truth = render_phantom(spec)
        rep = calibrate_image(image, spec.pitch_mm, fov="auto" if spec.fov_radius_px else None)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "c.json"
            write_angulation(p, "x", rep.entry)
            cal = load_calibration(p)
        pts = _field_points(truth, image.shape[:2])
        mm = truth.phantom_from_distorted(pts)
        ideal = cal.ideal_from_distorted(pts)
        rng = np.random.default_rng(8)
        a, b = rng.integers(0, len(pts), (2, 4000))
        td = np.hypot(*(mm[a] - mm[b]).T)
        far = td > 20
        rel = np.hypot(*(ideal[a] - ideal[b]).T)[far] * cal.pixel_spacing_mm / td[far] - 1
        true_sp = truth.spacing_mm_at(cal.ideal_from_distorted.center_xy)
        q = ideal * cal.pixel_spacing_mm
        rig = fit_rigid(mm, q)
        err = np.hypot(*(rig(mm) - q).T) / cal.pixel_spacing_mm
        fov = (*cal.fov_center_xy, cal.fov_radius_px) if cal.fov_center_xy else None
        det = detect_beads(cal.undistort(image), spec.bead_polarity, fov)
        ij, idx = index_grid(det.xy, det.center_xy, det.pitch_px)
        sim = fit_rigid(ij * spec.pitch_mm, det.xy[idx], with_scale=True)
        straight = np.sqrt(np.mean(np.sum((sim(ij * spec.pitch_mm) - det.xy[idx]) ** 2, 1)))
        r = rep.entry["residuals"]
        print(
            f"{name:18s} {cal.pixel_spacing_mm:9.5f} "
            f"{100 * (cal.pixel_spacing_mm / true_sp - 1):+8.3f}% "
            f"{100 * np.abs(rel).max():9.3f}% {np.sqrt(np.mean(err**2)):9.3f} {err.max():9.3f} "
            f"{straight:8.3f} {r['rms_px']:8.3f} {r['max_px']:8.3f} "
            f"{rep.entry['phantom']['beads_used']}"
        )
    print("(px unless marked; 'straight' = RMS of beads re-detected in the corrected image off a straight grid)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
