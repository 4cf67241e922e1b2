"""Distortion calibration against phantoms with a KNOWN distortion (pincushion + S-distortion).

Ground truth comes from `calibration.phantom`: every test compares the calibration with the
distortion the phantom was rendered with, never with the calibration's own numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.beads import detect_beads, index_grid
from calibration.fit import calibrate_image
from calibration.phantom import PhantomSpec, PhantomTruth, render_phantom
from calibration.runtime import load_calibration
from calibration.store import write_angulation
from calibration.transforms import Polynomial2D, fit_rigid

CASES = {
    # bright beads, 12-bit in uint16, field cutting the grid, 3 % of beads missing
    "bright_fov": PhantomSpec(fov_center_xy=(250.0, 262.0), fov_radius_px=238.0, noise_sigma=0.02, seed=1),
    # dark beads (hole plate / raw intensifier output), 8-bit, noisier, stronger twist
    "dark_fov_noisy": PhantomSpec(
        bead_polarity="dark",
        dtype="uint8",
        noise_sigma=0.04,
        grid_angle_deg=-7.0,
        s_twist_rad=0.06,
        k1=0.08,
        fov_center_xy=(258.0, 250.0),
        fov_radius_px=235.0,
        missing_fraction=0.05,
        seed=2,
    ),
    # wide frame whose field is cut by the top and bottom edges
    "fov_cut_by_frame": PhantomSpec(
        size=(440, 600),
        fov_center_xy=(300.0, 219.5),
        fov_radius_px=250.0,
        pitch_mm=4.0,
        spacing_mm=0.2,
        noise_sigma=0.02,
        seed=3,
    ),
    # fine grid of small beads (8 px pitch, 3 px beads)
    "fine_pitch": PhantomSpec(
        size=(320, 320),
        fov_center_xy=(160.0, 158.0),
        fov_radius_px=150.0,
        pitch_mm=2.0,
        bead_radius_mm=0.4,
        noise_sigma=0.02,
        seed=6,
    ),
    # large beads (72 % of the pitch), grid at 45 degrees, 15 % of beads missing
    "big_beads_45deg": PhantomSpec(
        fov_center_xy=(250.0, 262.0),
        fov_radius_px=238.0,
        bead_radius_mm=1.8,
        grid_angle_deg=45.0,
        missing_fraction=0.15,
        noise_sigma=0.02,
        seed=7,
    ),
    # flat panel: no circular field, faint distortion, grid running off the frame
    "flat_panel": PhantomSpec(
        size=(400, 400),
        k1=0.005,
        k2=0.0,
        s_twist_rad=0.0,
        spacing_mm=0.3,
        pitch_mm=6.0,
        noise_sigma=0.02,
        seed=4,
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def calibrated(request, tmp_path_factory):
    spec = CASES[request.param]
    image, truth = render_phantom(spec)
    report = calibrate_image(image, spec.pitch_mm, fov="auto" if spec.fov_radius_px else None)
    path = tmp_path_factory.mktemp(request.param) / "calib.json"
    write_angulation(path, "lateral", report.entry)
    return request.param, image, truth, report, load_calibration(path, "lateral")


def _field_points(truth: PhantomTruth, shape: tuple[int, int], n: int = 3000) -> np.ndarray:
    """Random raw-frame points inside the calibrated region (field, or frame minus a margin)."""
    spec = truth.spec
    rng = np.random.default_rng(7)
    h, w = shape
    pts = rng.uniform([0, 0], [w - 1, h - 1], (n * 3, 2))
    if spec.fov_radius_px is not None:
        c = np.asarray(spec.fov_center_xy)
        pts = pts[np.hypot(*(pts - c).T) < spec.fov_radius_px - 0.5 * spec.pitch_mm / spec.spacing_mm]
    else:
        m = spec.pitch_mm / spec.spacing_mm
        pts = pts[(pts.min(axis=1) > m) & (pts[:, 0] < w - 1 - m) & (pts[:, 1] < h - 1 - m)]
    return pts[:n]


def test_spacing_within_half_percent_of_truth(calibrated):
    name, image, truth, report, cal = calibrated
    pts = _field_points(truth, image.shape[:2])
    mm_true = truth.phantom_from_distorted(pts)
    ideal = cal.ideal_from_distorted(pts)
    rng = np.random.default_rng(8)
    a, b = rng.integers(0, len(pts), (2, 4000))
    true_d = np.hypot(*(mm_true[a] - mm_true[b]).T)
    far = true_d > 20.0
    measured_d = np.hypot(*(ideal[a] - ideal[b]).T)[far] * cal.pixel_spacing_mm
    rel = measured_d / true_d[far] - 1.0
    # every distance across the field, measured in the corrected frame, is right within 0.5 %
    assert np.max(np.abs(rel)) < 0.005, f"{name}: worst distance error {np.max(np.abs(rel)):.4%}"
    # and the spacing itself is the true local scale at the field centre (where it is matched)
    true_spacing = truth.spacing_mm_at(cal.ideal_from_distorted.center_xy)
    assert cal.pixel_spacing_mm == pytest.approx(true_spacing, rel=0.005)


def test_rms_residual_after_correction_against_truth(calibrated):
    name, image, truth, report, cal = calibrated
    pts = _field_points(truth, image.shape[:2])
    mm_true = truth.phantom_from_distorted(pts)
    corrected_mm = cal.ideal_from_distorted(pts) * cal.pixel_spacing_mm
    rigid = fit_rigid(mm_true, corrected_mm)  # rotation + shift only: scale errors count
    err_px = np.hypot(*(rigid(mm_true) - corrected_mm).T) / cal.pixel_spacing_mm
    rms = float(np.sqrt(np.mean(err_px**2)))
    assert rms <= 0.3, f"{name}: RMS {rms:.3f} px against the known distortion"
    # before correction the same points are off by pixels: the test has teeth
    raw_rigid = fit_rigid(mm_true, pts * cal.pixel_spacing_mm)
    raw = np.hypot(*(raw_rigid(mm_true) - pts * cal.pixel_spacing_mm).T) / cal.pixel_spacing_mm
    if truth.spec.k1 > 0.01:
        assert float(np.sqrt(np.mean(raw**2))) > 5 * 0.3
    # the file reports what the beads say (the fit's per-bead residuals, through the file)...
    beads = np.hypot(*report.residual_xy.T)
    assert cal.residual_rms_px == pytest.approx(float(np.sqrt(np.mean(beads**2))))
    assert cal.residual_max_px == pytest.approx(float(beads.max()))
    assert cal.residual_rms_px <= 0.3 and cal.residual_max_px <= 1.0
    # ...and it is honest about it: it never claims better than the truth shows across the
    # field (bead localisation noise makes it conservative: about 2-6x the true RMS here)
    assert cal.residual_rms_px >= rms and cal.residual_max_px >= float(err_px.max())


def test_beads_found_indexed_and_missing_ones_skipped(calibrated):
    name, image, truth, report, cal = calibrated
    det = report.detection
    spec = truth.spec
    assert det.polarity == spec.bead_polarity
    # every used bead sits on the lattice point its index claims (checked in the true plane)
    mm = truth.phantom_from_distorted(report.xy)
    lattice = np.round(mm / spec.pitch_mm)
    off = np.hypot(*(mm / spec.pitch_mm - lattice).T) * spec.pitch_mm / spec.spacing_mm
    assert off.max() < 0.6
    # the index equals the true lattice index up to one 90-degree symmetry and a shift
    ij = report.ij
    a = np.column_stack([ij, np.ones(len(ij))])
    coef, *_ = np.linalg.lstsq(a, lattice, rcond=None)
    m = np.round(coef[:2])
    assert abs(round(np.linalg.det(m))) == 1 and np.allclose(m @ m.T, np.eye(2))
    np.testing.assert_array_equal(ij @ m + np.round(coef[2]), lattice)
    assert not {tuple(map(int, v)) for v in lattice} & set(truth.missing)
    assert len(report.xy) >= 150


def test_undistorted_phantom_image_has_straight_grid(calibrated):
    name, image, truth, report, cal = calibrated
    corrected = cal.undistort(image)
    assert corrected.shape == image.shape and corrected.dtype == image.dtype
    fov = None
    if cal.fov_center_xy is not None:
        fov = (*cal.fov_center_xy, cal.fov_radius_px)
    det = detect_beads(corrected, truth.spec.bead_polarity, fov)
    ij, idx = index_grid(det.xy, det.center_xy, det.pitch_px)
    q = det.xy[idx]
    sim = fit_rigid(ij * truth.spec.pitch_mm, q, with_scale=True)
    res = np.hypot(*(sim(ij * truth.spec.pitch_mm) - q).T)
    assert float(np.sqrt(np.mean(res**2))) <= 0.3, name
    # one corrected pixel is one calibrated pixel spacing everywhere
    assert 1.0 / sim.scale == pytest.approx(cal.pixel_spacing_mm, rel=0.005)
    # the raw grid is not straight under the same test (except the flat panel's)
    det_raw = report.detection
    ij_r, idx_r = index_grid(det_raw.xy, det_raw.center_xy, det_raw.pitch_px)
    sim_r = fit_rigid(ij_r * truth.spec.pitch_mm, det_raw.xy[idx_r], with_scale=True)
    raw_rms = float(np.sqrt(np.mean(np.sum((sim_r(ij_r * truth.spec.pitch_mm) - det_raw.xy[idx_r]) ** 2, 1))))
    if truth.spec.k1 > 0.01:
        assert raw_rms > 1.5


def test_correction_at_half_size_has_the_full_size_geometry(calibrated):
    """`undistort(reduce=2)` (the service's path for frames over twice the model's input) puts
    every reduced pixel where the full-size correction puts the 2 x 2 pixels it stands for.

    The raw frame shows a smooth known pattern through the calibrated distortion (raw pixel p
    shows the pattern at ideal_from_distorted(p)); corrected at half size, each pixel must
    show the pattern at its centre in full-size corrected pixels, (u + 0.5) * 2 - 0.5."""
    import cv2

    name, image, truth, report, cal = calibrated
    w, h = cal.image_size

    def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        t = 2 * np.pi
        return 500 + 100 * np.sin(t * x / 41 + 0.3) + 80 * np.cos(t * y / 53) + 60 * np.sin(t * (x - y) / 61)

    ix, iy = cal.ideal_from_distorted.evaluate_grid(np.arange(w), np.arange(h))
    raw = pattern(ix.astype(np.float64), iy.astype(np.float64)).astype(np.float32)
    small = cal.undistort(raw, reduce=2)
    rw, rh = cal.reduced_size(2)
    assert small.shape == (rh, rw) and small.dtype == raw.dtype
    assert cal.undistort(image, reduce=2).dtype == image.dtype
    cx = (np.arange(rw) + 0.5) * (w / rw) - 0.5
    cy = (np.arange(rh) + 0.5) * (h / rh) - 0.5
    inside = cv2.erode(cal.fov_mask((rh, rw)).astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    # and wholly fed from inside the raw frame (a field cut by the frame's edge)
    inside &= cv2.erode(cal.undistort(np.ones((h, w), np.float32), reduce=2), np.ones((3, 3), np.uint8)) == 1.0
    error = np.abs(small - pattern(cx[None, :], cy[:, None]))[inside]
    # half a full-size pixel off (a quarter of a reduced one): what a centre slip would show
    slipped = np.abs(small - pattern(cx[None, :] + 0.5, cy[:, None] + 0.5))[inside]
    assert float(np.mean(error)) < 0.3 * float(np.mean(slipped)), (name, np.mean(error), np.mean(slipped))
    assert float(np.percentile(error, 99)) < 3.0, name  # of a pattern spanning +-240
    if cal.fov_radius_px is not None:  # outside the field: nothing from beyond it, as at full size
        assert (cal.undistort(image, reduce=2)[~cal.fov_mask((rh, rw))] == 0).mean() > 0.95


def test_field_of_view_found_and_mapped(calibrated):
    name, image, truth, report, cal = calibrated
    spec = truth.spec
    if spec.fov_radius_px is None:
        assert cal.fov_radius_px is None and cal.fov_mask(image.shape).all()
        return
    cx, cy, r = cal.fov_distorted
    assert math.hypot(cx - spec.fov_center_xy[0], cy - spec.fov_center_xy[1]) < 1.5
    assert r == pytest.approx(spec.fov_radius_px, abs=1.5)
    mask = cal.fov_mask(image.shape)
    corrected = cal.undistort(image)
    # the corrected field mask only covers real image (nothing from outside the raw field)
    raw_inside = cal.distorted_from_ideal(np.argwhere(mask)[:, ::-1].astype(float))
    d = np.hypot(raw_inside[:, 0] - spec.fov_center_xy[0], raw_inside[:, 1] - spec.fov_center_xy[1])
    assert d.max() <= spec.fov_radius_px + 1.0
    assert (corrected[~mask] == 0).mean() > 0.95
    assert mask.mean() > 0.5 and cal.fov_radius_px > 0.85 * spec.fov_radius_px


def test_too_few_beads_is_refused(tmp_path):
    from guidance.errors import CalibrationError

    spec = PhantomSpec(size=(200, 200), fov_center_xy=(100.0, 100.0), fov_radius_px=60.0, seed=5)
    image, _ = render_phantom(spec)
    with pytest.raises(CalibrationError, match="too few beads"):
        calibrate_image(image, spec.pitch_mm)


# ------------------------------------------------------------------------------- transforms


def test_polynomial_fit_evaluate_grid_jacobian_and_composition():
    from calibration.transforms import Composed, Similarity2D, polynomial_exponents

    rng = np.random.default_rng(0)
    true = Polynomial2D(3, (50.0, 40.0), 60.0, tuple(rng.normal(0, 5, 10)), tuple(rng.normal(0, 5, 10)))
    src = rng.uniform(0, 100, (200, 2))
    fitted = Polynomial2D.fit(src, true(src), 3, (50.0, 40.0), 60.0)
    np.testing.assert_allclose(fitted.coef_x, true.coef_x, atol=1e-9)
    assert polynomial_exponents(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    gx, gy = true.evaluate_grid(np.arange(7), np.arange(5))
    pts = np.array([(x, y) for y in range(5) for x in range(7)], dtype=float)
    np.testing.assert_allclose(np.column_stack([gx.ravel(), gy.ravel()]), true(pts), rtol=1e-5, atol=1e-3)
    eps = 1e-4
    num = (true(src[:5] + [eps, 0]) - true(src[:5] - [eps, 0])) / (2 * eps)
    np.testing.assert_allclose(true.jacobian(src[:5])[:, :, 0], num, rtol=1e-5, atol=1e-6)
    sim = Similarity2D(0.3, 0.2, (4.0, -2.0))
    composed = sim @ true
    assert isinstance(composed, Composed)
    np.testing.assert_allclose(composed(src), sim(true(src)))
    np.testing.assert_allclose(sim.compose_polynomial(true)(src), sim(true(src)), atol=1e-9)
    np.testing.assert_allclose((sim.inverse() @ sim)(src), src, atol=1e-9)
    rigid = fit_rigid(src, sim(src), with_scale=True)
    assert rigid.scale == pytest.approx(0.3) and rigid.angle_rad == pytest.approx(0.2)


def test_phantom_smaller_than_the_field_is_masked_where_not_calibrated(tmp_path):
    """A grid that stops short of the field edge: the model is only trusted (and the corrected
    frame only shown) where the beads vouch for it, never extrapolated to the rim."""
    spec = PhantomSpec(fov_center_xy=(250.0, 262.0), fov_radius_px=238.0, grid_radius_mm=40.0, seed=2)
    image, truth = render_phantom(spec)
    report = calibrate_image(image, spec.pitch_mm)
    e = report.entry
    assert e["calibrated_radius_px"] < 0.8 * e["fov_distorted"]["radius_px"]
    write_angulation(tmp_path / "c.json", "small", e)
    cal = load_calibration(tmp_path / "c.json")
    assert cal.fov_radius_px < e["calibrated_radius_px"]
    # everything left visible was calibrated: its raw source lies within the beads' reach
    mask = cal.fov_mask(image.shape)
    src = cal.distorted_from_ideal(np.argwhere(mask)[:, ::-1].astype(float))
    ref = np.asarray(cal.ideal_from_distorted.center_xy)
    assert np.hypot(*(src - ref).T).max() <= e["calibrated_radius_px"] + 0.5
    assert (cal.undistort(image)[~mask] == 0).all()
    # and it is accurate there
    pts = src[:: max(1, len(src) // 2000)]
    mm_true = truth.phantom_from_distorted(pts)
    q = cal.ideal_from_distorted(pts) * cal.pixel_spacing_mm
    err = np.hypot(*(fit_rigid(mm_true, q)(mm_true) - q).T) / cal.pixel_spacing_mm
    assert float(np.sqrt(np.mean(err**2))) <= 0.3


def test_burned_in_text_on_the_phantom_image(tmp_path):
    """C-arm phantom shots carry annotations, also inside the field over the beads."""
    import cv2

    spec = PhantomSpec(fov_center_xy=(250.0, 262.0), fov_radius_px=238.0, seed=4)
    image, truth = render_phantom(spec)
    overlay = np.zeros(image.shape, np.uint8)
    for text, org, thick in (("L3 LAT 72kV 2.1mA", (8, 20), 1), ("GRID QA 5mm", (180, 200), 2)):
        cv2.putText(overlay, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, thick, cv2.LINE_AA)
    alpha = overlay / 255.0
    annotated = (image * (1 - alpha) + 4095 * alpha).astype(np.uint16)
    e = calibrate_image(annotated, spec.pitch_mm).entry
    write_angulation(tmp_path / "c.json", "x", e)
    cal = load_calibration(tmp_path / "c.json")
    pts = _field_points(truth, image.shape)
    mm_true = truth.phantom_from_distorted(pts)
    q = cal.ideal_from_distorted(pts) * cal.pixel_spacing_mm
    err = np.hypot(*(fit_rigid(mm_true, q)(mm_true) - q).T) / cal.pixel_spacing_mm
    assert float(np.sqrt(np.mean(err**2))) <= 0.3
    assert e["residuals"]["rms_px"] <= 0.3
