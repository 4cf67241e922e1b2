"""Calibration against the team simulator's OWN image-intensifier distortion (models.sim:
pincushion 1/(1 + k r^2), S-twist linear in r), a model independent of calibration.phantom's:
a bead grid is imaged through `Imaging.distortion_maps` exactly as the simulator images a spine,
and the calibration must recover that geometry."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from calibration.fit import calibrate_image
from calibration.phantom import PhantomSpec, render_phantom
from calibration.transforms import Polynomial2D, fit_rigid

S = 512
SPACING = 0.25


@pytest.mark.parametrize("k,twist", [(0.08, 0.03), (0.04, -0.02)])
def test_recovers_the_simulator_distortion(k, twist):
    from models.sim.imaging import Imaging

    imaging = Imaging.sample(np.random.default_rng(0), S, S)
    imaging.distortion_k, imaging.s_distortion, imaging.fov = k, twist, (S / 2, S / 2, 0.47 * S)
    sx, sy = imaging.distortion_maps()  # distorted pixel -> where it samples the ideal image
    ideal, _ = render_phantom(
        PhantomSpec(
            size=(S, S),
            k1=0.0,
            k2=0.0,
            s_twist_rad=0.0,
            spacing_mm=SPACING,
            pitch_mm=5.0,
            missing_fraction=0.0,
            noise_sigma=0.0,
        )
    )
    raw = cv2.remap(ideal.astype(np.float32), sx, sy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    raw = np.where(imaging.fov_mask(), raw, 80.0) + np.random.default_rng(1).normal(0, 40, raw.shape)
    raw = np.clip(raw, 0, 4095).astype(np.uint16)

    e = calibrate_image(raw, 5.0).entry
    assert e["pixel_spacing_mm"] == pytest.approx(SPACING, rel=0.005)
    f = Polynomial2D.from_json(e["ideal_from_distorted"])
    ys, xs = np.mgrid[0:S:4, 0:S:4]
    p = np.column_stack([xs.ravel(), ys.ravel()]).astype(float)
    p = p[np.hypot(p[:, 0] - S / 2, p[:, 1] - S / 2) < 0.47 * S - 12]
    truth_mm = np.column_stack(
        [sx[p[:, 1].astype(int), p[:, 0].astype(int)], sy[p[:, 1].astype(int), p[:, 0].astype(int)]]
    )
    truth_mm *= SPACING
    q = f(p) * e["pixel_spacing_mm"]
    err = np.hypot(*(fit_rigid(truth_mm, q)(truth_mm) - q).T) / e["pixel_spacing_mm"]
    assert float(np.sqrt(np.mean(err**2))) <= 0.3
    assert err.max() < 0.5
    # uncorrected, the same points are pixels off
    raw_err = np.hypot(*(fit_rigid(truth_mm, p * SPACING)(truth_mm) - p * SPACING).T) / SPACING
    assert float(np.sqrt(np.mean(raw_err**2))) > 1.5
