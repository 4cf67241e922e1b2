"""`guidance calibrate` / `guidance undistort` as they run: a real process, real files."""

from __future__ import annotations

import json
import subprocess

import cv2
import numpy as np
import pytest
from conftest import run_guidance

from calibration import load_calibration
from calibration.phantom import PhantomSpec, render_phantom


def guidance(*args: str) -> subprocess.CompletedProcess:
    return run_guidance(*args, timeout=120)


def assert_bad_input(proc: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one clear line, no traceback
    assert lines[0].startswith(f"guidance {command}: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    spec = PhantomSpec(size=(320, 320), fov_center_xy=(160.0, 160.0), fov_radius_px=150.0, pitch_mm=4.0, seed=21)
    image, truth = render_phantom(spec)
    path = d / "phantom.png"
    assert cv2.imwrite(str(path), image)
    return d, path, image, truth


def test_calibrate_two_angulations_then_undistort(phantom):
    d, path, image, _ = phantom
    out = d / "calib.json"
    proc = guidance("calibrate", str(path), "--pitch-mm", "4", "-o", str(out), "--angulation", "lateral")
    assert proc.returncode == 0, proc.stderr
    assert "mm/px at the phantom plane" in proc.stdout and "residual RMS" in proc.stdout
    proc = guidance("calibrate", str(path), "--pitch-mm", "4.0", "-o", str(out), "--angulation", "ap")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert sorted(doc["angulations"]) == ["ap", "lateral"]
    entry = doc["angulations"]["lateral"]
    assert entry["pixel_spacing_mm"] == pytest.approx(0.25, rel=0.01)
    assert entry["residuals"]["rms_px"] <= 0.3
    assert entry["source_image"]["path"] == "phantom.png" and len(entry["source_image"]["sha256"]) == 64

    corrected = d / "corrected.png"
    proc = guidance(
        "undistort",
        str(path),
        "--calibration",
        str(out),
        "--angulation",
        "lateral",
        "-o",
        str(corrected),
    )
    assert proc.returncode == 0, proc.stderr
    got = cv2.imread(str(corrected), cv2.IMREAD_UNCHANGED)
    assert got.dtype == image.dtype and got.shape == image.shape
    # the command applies exactly the runtime correction
    np.testing.assert_array_equal(got, load_calibration(out, "lateral").undistort(image))
    assert not np.array_equal(got, image)

    # several angulations and none chosen: refused, naming them
    proc = guidance("undistort", str(path), "--calibration", str(out), "-o", str(corrected))
    assert_bad_input(proc, "undistort", "several angulations (ap, lateral)")


def test_too_few_beads(tmp_path):
    spec = PhantomSpec(size=(200, 200), fov_center_xy=(100.0, 100.0), fov_radius_px=60.0, seed=5)
    image, _ = render_phantom(spec)
    p = tmp_path / "small.png"
    cv2.imwrite(str(p), image)
    proc = guidance("calibrate", str(p), "--pitch-mm", "5", "-o", str(tmp_path / "c.json"))
    assert_bad_input(proc, "calibrate", "too few beads: found")
    assert not (tmp_path / "c.json").exists()


def test_image_without_a_grid(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "noise.png"
    cv2.imwrite(str(p), rng.integers(90, 110, (256, 256), dtype=np.uint8))
    proc = guidance("calibrate", str(p), "--pitch-mm", "5", "-o", str(tmp_path / "c.json"))
    assert_bad_input(proc, "calibrate")
    assert "bead" in proc.stderr or "grid" in proc.stderr


@pytest.mark.parametrize(
    "pitch,fragment",
    [
        ("500", "gives 31.2"),
        ("0.001", "outside the plausible"),
        ("-3", "--pitch-mm must be a positive number"),
        ("abc", "--pitch-mm must be a number"),
        ("nan", "--pitch-mm must be a positive number"),
    ],
)
def test_pitch_that_does_not_fit(phantom, pitch, fragment):
    d, path, _, _ = phantom
    proc = guidance("calibrate", str(path), f"--pitch-mm={pitch}", "-o", str(d / f"p{pitch}.json"))
    assert_bad_input(proc, "calibrate", fragment)


def test_not_an_image_and_missing_file(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("this is not a picture\n")
    proc = guidance("calibrate", str(txt), "--pitch-mm", "5", "-o", str(tmp_path / "c.json"))
    assert_bad_input(proc, "calibrate", str(txt), "not an image")
    proc = guidance("calibrate", str(tmp_path / "absent.png"), "--pitch-mm", "5", "-o", str(tmp_path / "c.json"))
    assert_bad_input(proc, "calibrate", "absent.png: no such file")


def test_undistort_refuses_bad_calibrations_and_images(phantom, tmp_path):
    d, path, image, _ = phantom
    good = tmp_path / "calib.json"
    assert guidance("calibrate", str(path), "--pitch-mm", "4", "-o", str(good)).returncode == 0
    doc = json.loads(good.read_text())
    out = tmp_path / "o.png"

    other = tmp_path / "v2.json"
    other.write_text(json.dumps({**doc, "schema": "cement-guidance-calibration/2"}))
    assert_bad_input(
        guidance("undistort", str(path), "--calibration", str(other), "-o", str(out)),
        "undistort",
        "schema 'cement-guidance-calibration/2' is not supported",
    )
    bad = json.loads(good.read_text())
    bad["angulations"]["default"]["pixel_spacing_mm"] = "0.25"
    badp = tmp_path / "bad.json"
    badp.write_text(json.dumps(bad))
    assert_bad_input(
        guidance("undistort", str(path), "--calibration", str(badp), "-o", str(out)),
        "undistort",
        "bad field: angulations.default.pixel_spacing_mm must be a finite number",
    )
    # calibrating into a file that is not a calibration does not clobber it
    assert_bad_input(
        guidance("calibrate", str(path), "--pitch-mm", "4", "-o", str(badp)),
        "calibrate",
        "refusing to overwrite",
    )
    wrong = tmp_path / "wide.png"
    cv2.imwrite(str(wrong), np.zeros((100, 200), np.uint8))
    assert_bad_input(
        guidance("undistort", str(wrong), "--calibration", str(good), "-o", str(out)),
        "undistort",
        "frame is 200x100 but calibration 'default' was made for 320x320",
    )
    assert_bad_input(
        guidance(
            "undistort",
            str(path),
            "--calibration",
            str(good),
            "-o",
            str(tmp_path / "nodir" / "o.png"),
        ),
        "undistort",
        "does not exist",
    )
    assert not out.exists()


def test_dicom_phantom_with_qa_overlay(tmp_path):
    from conftest import write_dicom

    spec = PhantomSpec(
        size=(320, 320),
        fov_center_xy=(160.0, 160.0),
        fov_radius_px=150.0,
        pitch_mm=4.0,
        bead_polarity="dark",
        dtype="uint8",
        seed=22,
    )
    image, _ = render_phantom(spec)
    dcm = write_dicom(tmp_path / "phantom.dcm", [image], bits=12, spacing=None, frame_time_ms=None)
    out, qa = tmp_path / "calib.json", tmp_path / "qa.png"
    proc = guidance("calibrate", str(dcm), "--pitch-mm", "4", "-o", str(out), "--overlay", str(qa))
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(out.read_text())["angulations"]["default"]
    assert entry["source_image"]["dtype"] == "uint16"  # 12 bits stored
    assert entry["phantom"]["bead_polarity"] == "dark"
    assert entry["pixel_spacing_mm"] == pytest.approx(0.25, rel=0.01)
    pic = cv2.imread(str(qa), cv2.IMREAD_UNCHANGED)
    assert pic.shape == (320, 320, 3) and pic.dtype == np.uint8
    # every bead used is ringed in green (a ring of radius 3 px here: >= 10 pure-green pixels)
    green = (pic[..., 1] > 150) & (pic[..., 0] < 80) & (pic[..., 2] < 80)
    assert green.sum() > 10 * entry["phantom"]["beads_used"]
    # a multi-frame DICOM is not a phantom image
    multi = write_dicom(tmp_path / "cine.dcm", [image, image], bits=8, spacing=None)
    assert_bad_input(
        guidance("calibrate", str(multi), "--pitch-mm", "4", "-o", str(out)),
        "calibrate",
        "multi-frame DICOM",
    )
