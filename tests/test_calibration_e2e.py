"""End to end: `guidance calibrate` on a phantom, then `guidance run --calibration` on a loop
seen through the SAME known distortion. The service must correct every frame before
segmentation and report areas in mm that match the undistorted truth.

The loop is a simple scene (the service's simulated intensities) drawn in the undistorted frame of the phantom's
ground truth (a cement deposit far out in the field, where pincushion magnifies), then
distorted. Leak classification is the tracker's business and is not asserted here; what is:
the service corrects every frame, and its areas are in mm of the undistorted truth.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import build_stand_in, run_guidance, write_sums

from calibration import load_calibration
from calibration.phantom import PhantomSpec, render_phantom
from guidance.capture.simulated import BONE, CEMENT, NEEDLE, TISSUE

S = 256
FRAMES = 14
SPEC = PhantomSpec(
    size=(S, S),
    fov_center_xy=(127.5, 127.5),
    fov_radius_px=126.0,
    distortion_center_xy=(127.5, 127.5),
    pitch_mm=4.0,
    spacing_mm=0.25,
    k1=0.14,
    k2=0.02,
    s_twist_rad=0.05,
    noise_sigma=0.02,
    seed=3,
)


def draw_ideal(t: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The undistorted scene: a vertebral body with the needle in it, and a cement deposit
    growing out in the field (~0.6 of its radius, where pincushion magnifies the area by
    about a quarter). -> (uint8 image, uint8 labels with 2 = cement)."""
    image = np.full((S, S), TISSUE, np.uint8)
    labels = np.zeros((S, S), np.uint8)
    body = ((int(0.46 * S), int(0.40 * S)), (int(0.70 * S), int(0.62 * S)))
    cv2.rectangle(image, *body, BONE, -1)
    cv2.rectangle(labels, *body, 1, -1)
    tip = (int(0.58 * S), int(0.51 * S))
    cv2.line(image, (S - 1, int(0.7 * S)), tip, NEEDLE, 4)
    cv2.line(labels, (S - 1, int(0.7 * S)), tip, 3, 4)
    radius = 14 + t // 2  # px, grows with the injection
    centre = (int(0.30 * S), int(0.30 * S))
    cv2.circle(image, centre, radius, CEMENT, -1)
    cv2.circle(labels, centre, radius, 2, -1)
    noisy = np.clip(image + rng.normal(0.0, 3.0, image.shape), 0, 255).astype(np.uint8)
    return noisy, labels


def guidance(*args: str) -> subprocess.CompletedProcess:
    return run_guidance(*args, timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    phantom, truth = render_phantom(SPEC)
    cv2.imwrite(str(d / "phantom.png"), phantom)
    proc = guidance(
        "calibrate", str(d / "phantom.png"), "--pitch-mm", "4", "-o", str(d / "calib.json"), "--angulation", "lateral"
    )
    assert proc.returncode == 0, proc.stderr
    # raw pixel p shows the undistorted scene at undistorted_from_distorted(p)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    src = truth.undistorted_from_distorted(np.column_stack([xx.ravel(), yy.ravel()]))
    mx = src[:, 0].reshape(S, S).astype(np.float32)
    my = src[:, 1].reshape(S, S).astype(np.float32)
    outside = np.hypot(xx - 127.5, yy - 127.5) > SPEC.fov_radius_px
    loop = d / "loop"
    loop.mkdir()
    rng = np.random.default_rng(0)
    scenes, labels, raws = [], [], []
    for t in range(FRAMES):
        scene, lab = draw_ideal(t, rng)
        raw = cv2.remap(scene, mx, my, cv2.INTER_NEAREST)
        raw[outside] = 0  # the intensifier's black surround
        cv2.imwrite(str(loop / f"{t:06d}.png"), raw)
        scenes.append(scene)
        labels.append(lab)
        raws.append(raw)
    model = d / "model"
    model.mkdir()
    onnx_path = build_stand_in(model / "segmenter.onnx", 128)
    sums = write_sums(onnx_path)
    return {
        "dir": d,
        "truth": truth,
        "calib": d / "calib.json",
        "loop": loop,
        "scenes": scenes,
        "labels": labels,
        "raws": raws,
        "model": (onnx_path, sums),
    }


def _cement_truth_mm2(lab: np.ndarray) -> float:
    return float((lab == 2).sum()) * SPEC.spacing_mm**2


def _run(
    world, *extra: str, name: str, source: Path | None = None, side: str | None = "right"
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    onnx_path, sums = world["model"]
    log = world["dir"] / f"{name}.jsonl"
    proc = guidance(
        "run",
        "--source",
        str(source or world["loop"]),
        "--fast",
        "--address",
        "none",
        "--quiet",
        "--alert-log",
        str(log),
        "--model",
        str(onnx_path),
        "--sha256sums",
        str(sums),
        *(("--posterior-side", side) if side else ()),
        *extra,
    )
    msgs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, msgs


def test_run_with_calibration_reports_mm_matching_the_truth(world):
    proc, msgs = _run(world, "--calibration", str(world["calib"]), name="calibrated")
    assert proc.returncode == 0, proc.stderr
    status = [m for m in msgs if m["type"] == "status"]
    assert len(status) == FRAMES
    assert {m["units"] for m in status} == {"mm"}
    alerts = [m for m in msgs if m["type"] == "alert"]
    assert "calibration_missing" not in {m["kind"] for m in alerts}
    truth = np.array([_cement_truth_mm2(lab) for lab in world["labels"]])
    measured = np.array([m["areas"]["cement"] for m in status])
    # the cement deposit, measured through the service, in mm^2 of the undistorted truth
    # (within the stand-in segmenter's own edge bias, about -9 % here)
    assert np.abs(measured / truth - 1.0).max() < 0.12, np.round(measured / truth, 3)

    # the same loop with only a pixel spacing (no distortion correction): the deposit comes
    # out larger by exactly the distortion's local area magnification (the segmenter's bias
    # cancels in the ratio), which the truth knows
    cal = load_calibration(world["calib"], "lateral")
    _, plain = _run(world, "--pixel-spacing", str(cal.pixel_spacing_mm), name="spacing_only")
    plain_cement = np.array([m["areas"]["cement"] for m in plain if m["type"] == "status"])
    ys, xs = np.nonzero(world["labels"][-1] == 2)
    pts = np.column_stack([xs, ys]).astype(float)
    d = world["truth"].distorted_from_undistorted
    e = 0.5
    jx = (d(pts + [e, 0]) - d(pts - [e, 0])) / (2 * e)
    jy = (d(pts + [0, e]) - d(pts - [0, e])) / (2 * e)
    magnification = float(np.mean(jx[:, 0] * jy[:, 1] - jx[:, 1] * jy[:, 0]))
    assert magnification > 1.15  # the deposit sits where the distortion matters
    ratio = plain_cement[-1] / measured[-1]
    print(f"area magnification: truth {magnification:.3f}, uncorrected/corrected {ratio:.3f}")
    assert ratio == pytest.approx(magnification, rel=0.05), (ratio, magnification)


def test_pipeline_frames_are_the_corrected_frames(world):
    from guidance.pipeline import run_replay
    from guidance.settings import Settings

    onnx_path, sums = world["model"]
    settings = Settings().replace(
        segmentation={"model": str(onnx_path), "sha256sums": str(sums)},
        alerts={"address": None},
        calibration={"file": str(world["calib"])},
        tracker={"posterior_side": "right"},
    )
    results = []
    summary = run_replay(world["loop"], settings, on_result=results.append)
    assert summary.frames_processed == FRAMES
    cal = load_calibration(world["calib"], "lateral")
    spacing = cal.pixel_spacing_mm
    for r, raw in zip(results, world["raws"], strict=True):
        # exactly the runtime correction of the raw frame
        np.testing.assert_array_equal(r.image, cal.undistort(raw))
        # areas in mm: class-map pixels times (mm per frame pixel * frame px per model px)^2
        unit = spacing * r.geometry.frame_pixels_per_model_pixel()
        cement = (r.labels == 2) & cal.fov_mask(r.labels.shape)
        assert r.status.units == "mm"
        assert r.status.areas["cement"] == pytest.approx(float(cement.sum()) * unit**2, rel=0.02)
    # geometry: the leak sits where the undistorted truth has it, not where the raw frame does
    last, raw, scene = results[-1], world["raws"][-1], world["scenes"][-1]

    def leak_centroid(img: np.ndarray) -> np.ndarray:
        m = img > (NEEDLE + CEMENT) / 2  # cement is the brightest class
        m[:, int(0.46 * S) :] = False
        ys, xs = np.nonzero(m)
        return np.array([xs.mean(), ys.mean()])

    true_c = leak_centroid(scene)
    assert np.hypot(*(leak_centroid(last.image) - true_c)) < 1.0
    assert np.hypot(*(leak_centroid(raw) - true_c)) > 3.0


def test_service_refuses_to_start_on_an_untrusted_calibration(world, tmp_path):
    doc = json.loads(world["calib"].read_text())
    doc["angulations"]["lateral"]["residuals"]["rms_px"] = 0.9
    bad = tmp_path / "calib.json"
    bad.write_text(json.dumps(doc))
    proc, msgs = _run(world, "--calibration", str(bad), name="untrusted")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "residual RMS 0.9 px" in lines[0] and str(bad) in lines[0]
    assert not [m for m in msgs if m["type"] == "status"]  # not one frame processed
    proc, _ = _run(world, "--calibration", str(tmp_path / "absent.json"), name="absent")
    assert proc.returncode == 2 and "no such calibration file" in proc.stderr


def test_service_refuses_a_source_of_another_frame_size(world, tmp_path):
    """A calibration made for other frames (another grabber resolution or zoom mode) cannot
    be trusted for this source: refused at start, not frame after frame."""
    other = tmp_path / "other"
    other.mkdir()
    for t in range(3):
        cv2.imwrite(str(other / f"{t:06d}.png"), np.full((200, 240), 100, np.uint8))
    proc, msgs = _run(world, "--calibration", str(world["calib"]), name="other-size", source=other, side=None)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "frame is 240x200 but calibration 'lateral' was made for 256x256 frames" in lines[0]
    assert not [m for m in msgs if m["type"] == "status"]
