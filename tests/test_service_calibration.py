"""The calibrate operator with the real calibration package: undistortion, mm per pixel and
field of view from a calibration file the test fits itself."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import run_guidance, scene_frames, write_video

from calibration import phantom
from guidance.errors import CalibrationError
from guidance.pipeline import run_replay
from guidance.settings import Settings


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from calibration.fit import calibrate_image
    from calibration.store import write_angulation

    spec = phantom.PhantomSpec(
        size=(320, 320), fov_center_xy=(160.0, 158.0), fov_radius_px=150.0, pitch_mm=4.0, s_twist_rad=0.04, seed=11
    )
    image, _ = phantom.render_phantom(spec)
    path = tmp_path_factory.mktemp("cal") / "calib.json"
    write_angulation(path, "lateral", calibrate_image(image, spec.pitch_mm).entry)
    return path


def settings_for(stand_in, calib: str) -> Settings:
    onnx_path, sums = stand_in
    return Settings().replace(
        segmentation={"model": str(onnx_path), "sha256sums": str(sums)},
        alerts={"address": None},
        calibration={"file": calib},
    )


def test_calibration_gives_mm_undistorts_and_masks_the_field_of_view(tmp_path, stand_in, calib_file):
    from calibration import load_calibration

    cal = load_calibration(calib_file)
    loop = write_video(tmp_path / "l.avi", scene_frames(6, size=(320, 320), leak=None))
    results = []
    summary = run_replay(loop, settings_for(stand_in, str(calib_file)), on_result=results.append)
    assert summary.frames_processed == 6
    assert not any(m["kind"] == "calibration_missing" for m in summary.alerts)
    r = results[-1]
    assert r.status.units == "mm"
    # the image handed on is the undistorted frame, not the raw one: corrected at half size,
    # since the frame (320 px) is more than twice the stand-in model's input (64 px)
    cap = cv2.VideoCapture(str(loop))
    for _ in range(6):
        _, raw = cap.read()
    raw = cv2.cvtColor(raw, cv2.COLOR_BGR2GRAY)
    assert r.image_scale == 2.0
    assert np.array_equal(r.image, cal.undistort(raw, reduce=2))
    # areas scale with the calibrated spacing: each model pixel inside the field of view is
    # (mm per frame px * frame px per model px)^2; the tolerance only covers the field mask
    # resampled to the class map (as in test_calibration_e2e; here the match is exact)
    unit = cal.pixel_spacing_mm * r.geometry.frame_pixels_per_model_pixel() * r.image_scale
    cement = (r.labels == 2) & cal.fov_mask(r.labels.shape)
    assert cement.any()
    assert r.status.areas["cement"] == pytest.approx(float(cement.sum()) * unit**2, rel=0.02)


def test_half_size_correction_reports_what_the_full_size_one_does(tmp_path, stand_in, calib_file):
    """Frames corrected at half size (the default here) and at full size
    (`calibration.full_resolution`): the same leak raised at the same frame, areas in the same mm^2
    and evidence at the same place in full-size corrected pixels."""
    from calibration import load_calibration

    cal = load_calibration(calib_file)
    loop = write_video(tmp_path / "l.avi", scene_frames(12, size=(320, 320), leak="posterior", onset=4))
    runs = {}
    for full in (False, True):
        settings = settings_for(stand_in, str(calib_file)).replace(
            calibration={"file": str(calib_file), "full_resolution": full}, tracker={"posterior_side": "right"}
        )
        results = []
        summary = run_replay(loop, settings, on_result=results.append)
        runs[full] = (summary, results)
    (half, half_frames), (whole, whole_frames) = runs[False], runs[True]
    assert {r.image_scale for r in half_frames} == {2.0} and {r.image_scale for r in whole_frames} == {1.0}
    assert whole_frames[-1].image.shape == (320, 320) and half_frames[-1].image.shape == (160, 160)

    def raised(summary):
        return [(m["kind"], m["frame"]) for m in summary.alerts if m["state"] == "raised"]

    assert raised(half) == raised(whole)
    assert "posterior_leak" in {kind for kind, _ in raised(half)}, raised(half)
    for a, b in zip(half_frames, whole_frames, strict=True):
        # one model pixel, in mm^2: the two resamplings may move a boundary pixel or two
        pixel_mm2 = (cal.pixel_spacing_mm * b.geometry.frame_pixels_per_model_pixel()) ** 2
        assert a.geometry.frame_pixels_per_model_pixel() * a.image_scale == b.geometry.frame_pixels_per_model_pixel()
        for key in ("cement", "posterior", "venous"):
            assert abs(a.status.areas[key] - b.status.areas[key]) <= 0.05 * b.status.areas[key] + 3 * pixel_mm2
        ea, eb = a.status.evidence["posterior"], b.status.evidence["posterior"]
        assert (ea is None) == (eb is None)
        if ea is not None:  # within one model pixel (5 frame pixels here) of each other
            assert np.hypot(ea.centroid[0] - eb.centroid[0], ea.centroid[1] - eb.centroid[1]) < 5.0


def test_bad_calibration_file_refuses_to_start(tmp_path, stand_in):
    bad = tmp_path / "calib.json"
    bad.write_text('{"schema": "nope"}')
    loop = write_video(tmp_path / "l.avi", scene_frames(2, size=(320, 320), leak=None))
    with pytest.raises(CalibrationError):
        run_replay(loop, settings_for(stand_in, str(bad)))


def test_evaluate_with_a_calibration_reports_the_loops_own_frame_size(tmp_path, stand_in, calib_file):
    """`guidance evaluate --calibration` on 320 px frames, corrected at 160 px for the 64 px
    stand-in: the summary still names the loop's frame size, and the overlay video is written."""
    import json

    onnx_path, sums = stand_in
    loops = tmp_path / "loops"
    loops.mkdir()
    write_video(loops / "l.avi", scene_frames(8, size=(320, 320), leak="posterior", onset=3))
    out = tmp_path / "out"
    proc = run_guidance(
        "evaluate",
        loops,
        *("--out", out, "--calibration", calib_file, "--model", onnx_path, "--sha256sums", sums, "-q"),
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((out / "summary.json").read_text())["loops"]
    assert row["status"] != "failed", row
    assert row["size"] == [320, 320] and row["frames"] == 8
    video = cv2.VideoCapture(str(out / row["artifacts"]["video"]))
    assert video.isOpened()
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 8
