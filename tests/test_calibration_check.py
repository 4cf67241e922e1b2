"""Constancy check (`guidance calibrate IMAGE --pitch-mm P --check calib.json`): a stored
calibration against new phantom images whose change from the calibrated one is KNOWN
(`calibration.phantom`): the same C-arm re-imaged passes, a changed distortion or a changed pixel
spacing fails, naming which and by how much."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import run_guidance

from calibration.check import check_image
from calibration.fit import calibrate_image
from calibration.imageio import write_image
from calibration.phantom import PhantomSpec, render_phantom
from calibration.runtime import load_calibration
from calibration.store import write_angulation

BASE = PhantomSpec(fov_center_xy=(250.0, 262.0), fov_radius_px=238.0, noise_sigma=0.02, seed=1)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    image, _ = render_phantom(BASE)
    path = tmp_path_factory.mktemp("check") / "calib.json"
    write_angulation(path, "lateral", calibrate_image(image, BASE.pitch_mm).entry)
    return path


@pytest.mark.parametrize(
    ("change", "spec"),
    [
        ("re-imaged: new noise, more beads missing", replace(BASE, seed=5, missing_fraction=0.06)),
        (
            "phantom moved and turned on the detector",
            replace(BASE, seed=6, grid_offset_mm=(2.3, 1.4), grid_angle_deg=9),
        ),
        ("dark beads, 8-bit", replace(BASE, seed=7, bead_polarity="dark", dtype="uint8")),
    ],
)
def test_the_same_c_arm_re_imaged_passes(stored, change, spec):
    image, _ = render_phantom(spec)
    report = check_image(image, spec.pitch_mm, load_calibration(stored, "lateral"))
    assert report.passed, (change, report.failures)
    assert report.rms_px < 0.2 and abs(report.spacing_change_pct) < 0.1, change
    assert report.beads_used > 300


@pytest.mark.parametrize(
    ("change", "spec"),
    [
        ("pincushion stronger (k1 0.06 -> 0.09)", replace(BASE, seed=8, k1=0.09)),
        ("S-distortion stronger (0.04 -> 0.07 rad)", replace(BASE, seed=9, s_twist_rad=0.07)),
    ],
)
def test_a_changed_distortion_fails_on_the_residual(stored, change, spec):
    image, _ = render_phantom(spec)
    report = check_image(image, spec.pitch_mm, load_calibration(stored, "lateral"))
    assert not report.passed, change
    assert report.rms_px > 0.5, (change, report.rms_px)
    assert any("distortion has changed" in f for f in report.failures)


@pytest.mark.parametrize(("factor", "passes"), [(1.005, True), (1.02, False), (0.985, False)])
def test_the_spacing_change_is_measured_and_judged(stored, factor, passes):
    """Magnification changed (source-to-image distance, phantom height): spacing x factor."""
    spec = replace(BASE, seed=10, spacing_mm=BASE.spacing_mm * factor)
    image, _ = render_phantom(spec)
    report = check_image(image, spec.pitch_mm, load_calibration(stored, "lateral"))
    assert report.spacing_change_pct == pytest.approx(100 * (factor - 1), abs=0.05)
    assert report.rms_px < 0.2  # the distortion itself did not change
    assert report.passed is passes
    if not passes:
        assert report.failures and "pixel spacing" in report.failures[0]


def test_cli_exit_codes_and_the_report(stored, tmp_path):
    same, _ = render_phantom(replace(BASE, seed=11))
    moved, _ = render_phantom(replace(BASE, seed=12, spacing_mm=BASE.spacing_mm * 1.03))
    write_image(tmp_path / "same.png", same)
    write_image(tmp_path / "moved.png", moved)
    args = ("--pitch-mm", BASE.pitch_mm, "--check", stored, "--angulation", "lateral")

    ok = run_guidance("calibrate", tmp_path / "same.png", *args, "--report", tmp_path / "same.json")
    assert ok.returncode == 0, ok.stderr
    assert "PASS" in ok.stdout
    doc = json.loads((tmp_path / "same.json").read_text())
    assert doc["schema"] == "cement-guidance-calibration-check/1" and doc["passed"] is True
    assert doc["failures"] == [] and doc["angulation"] == "lateral" and len(doc["image_sha256"]) == 64

    out = run_guidance("calibrate", tmp_path / "moved.png", *args, "--report", tmp_path / "moved.json")
    assert out.returncode == 1, out.stderr
    assert "FAIL" in out.stdout and "+3.00 %" in out.stdout and "recalibrate" in out.stdout
    doc = json.loads((tmp_path / "moved.json").read_text())
    assert doc["passed"] is False and doc["spacing_change_pct"] == pytest.approx(3.0, abs=0.05)

    # a tighter tolerance fails the same image the default passes
    tight = run_guidance("calibrate", tmp_path / "same.png", *args, "--max-rms-px", "0.01")
    assert tight.returncode == 1 and "residual RMS" in tight.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("-o", "new.json"), "exclude each other"),
        (("--max-rms-px", "-1"), "--max-rms-px must be a positive number"),
        (("--overlay", "qa.png"), "--overlay belongs to a new fit (-o), not to --check"),
    ],
)
def test_cli_refuses_bad_check_arguments(stored, tmp_path, extra, message):
    write_image(tmp_path / "same.png", render_phantom(replace(BASE, seed=11))[0])
    proc = run_guidance("calibrate", tmp_path / "same.png", "--pitch-mm", 5, "--check", stored, *extra)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_refuses_what_cannot_be_checked(stored, tmp_path):
    write_image(tmp_path / "small.png", np.full((256, 256), 100, np.uint8))
    other = run_guidance("calibrate", tmp_path / "small.png", "--pitch-mm", 5, "--check", stored)
    assert other.returncode == 2 and "made for 512x512 frames" in other.stderr
    write_image(tmp_path / "same.png", render_phantom(replace(BASE, seed=11))[0])
    neither = run_guidance("calibrate", tmp_path / "same.png", "--pitch-mm", 5)
    assert neither.returncode == 2 and "-o OUTPUT" in neither.stderr
    fit_only = run_guidance(
        "calibrate", tmp_path / "same.png", "--pitch-mm", 5, "-o", tmp_path / "c.json", "--max-rms-px", 1
    )
    assert fit_only.returncode == 2 and "--max-rms-px belongs to --check" in fit_only.stderr
