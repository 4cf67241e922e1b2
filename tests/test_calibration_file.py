"""The calibration file: round trip, JSON Schema, several angulations, and refusal of a file
that cannot be trusted (every field, version, trust limits)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from calibration import SCHEMA, load_calibration
from calibration.fit import calibrate_image
from calibration.phantom import PhantomSpec, render_phantom
from calibration.store import write_angulation
from guidance.errors import CalibrationError

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "calibration" / "schemas" / "calibration.schema.json"


@pytest.fixture(scope="module")
def entries():
    """Two angulations of a small phantom (different distortion: the C-arm was rotated)."""
    out = {}
    for name, twist in (("lateral", 0.04), ("ap", -0.03)):
        spec = PhantomSpec(
            size=(320, 320),
            fov_center_xy=(160.0, 158.0),
            fov_radius_px=150.0,
            pitch_mm=4.0,
            s_twist_rad=twist,
            seed=11,
        )
        image, _ = render_phantom(spec)
        out[name] = (calibrate_image(image, spec.pitch_mm).entry, image)
    return out


@pytest.fixture
def calib_file(tmp_path, entries):
    path = tmp_path / "calib.json"
    for name, (entry, _) in entries.items():
        write_angulation(path, name, entry)
    return path


def test_file_validates_against_the_published_schema(calib_file):
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = json.loads(calib_file.read_text())
    jsonschema.validate(doc, schema)
    assert doc["schema"] == SCHEMA == "cement-guidance-calibration/1"
    assert sorted(doc["angulations"]) == ["ap", "lateral"]


def test_round_trip_keeps_every_number(calib_file, entries):
    doc = json.loads(calib_file.read_text())
    for name, (entry, image) in entries.items():
        assert doc["angulations"][name] == json.loads(json.dumps(entry))
        cal = load_calibration(calib_file, name)
        assert cal.angulation == name
        assert cal.pixel_spacing_mm == entry["pixel_spacing_mm"]
        assert cal.image_size == tuple(entry["image_size"])
        assert list(cal.fov_center_xy) == entry["fov"]["center_xy"]
        assert cal.fov_radius_px == entry["fov"]["radius_px"]
        pts = np.array([[100.0, 120.0], [200.0, 180.0]])
        assert cal.ideal_from_distorted.to_json() == entry["ideal_from_distorted"]
        # the stored inverse undoes the stored forward map
        np.testing.assert_allclose(cal.distorted_from_ideal(cal.ideal_from_distorted(pts)), pts, atol=0.05)
        out = cal.undistort(image)
        assert out.shape == image.shape and out.dtype == image.dtype
    # the two angulations really differ (S-distortion changes with the C-arm's rotation)
    lat, ap = load_calibration(calib_file, "lateral"), load_calibration(calib_file, "ap")
    p = np.array([[160.0 + 120.0, 158.0]])
    assert np.hypot(*(lat.ideal_from_distorted(p) - ap.ideal_from_distorted(p))[0]) > 3.0


def test_replacing_one_angulation_keeps_the_others(calib_file, entries):
    before = json.loads(calib_file.read_text())["angulations"]["ap"]
    new = copy.deepcopy(entries["lateral"][0])
    new["created_utc"] = "2030-01-01T00:00:00Z"
    names = write_angulation(calib_file, "lateral", new)
    doc = json.loads(calib_file.read_text())
    assert names == ["ap", "lateral"]
    assert doc["angulations"]["ap"] == before
    assert doc["angulations"]["lateral"]["created_utc"] == "2030-01-01T00:00:00Z"


def test_angulation_choice(calib_file, tmp_path, entries):
    with pytest.raises(CalibrationError, match=r"several angulations \(ap, lateral\); choose one"):
        load_calibration(calib_file)
    with pytest.raises(CalibrationError, match=r"no calibration for angulation 'oblique'"):
        load_calibration(calib_file, "oblique")
    single = tmp_path / "one.json"
    write_angulation(single, "90", entries["lateral"][0])
    assert load_calibration(single).angulation == "90"


def _mutated(calib_file: Path, tmp_path: Path, change) -> Path:
    doc = json.loads(calib_file.read_text())
    change(doc)
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(doc))
    return out


def _set(path: str, value):
    def change(doc):
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is _DELETE:
            del node[keys[-1]]
        elif isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value

    return change


_DELETE = object()
L = "angulations.lateral"

BAD = [
    (
        "schema",
        "cement-guidance-calibration/2",
        r"schema 'cement-guidance-calibration/2' is not supported",
    ),
    ("schema", _DELETE, r"not a calibration file \(no \"schema\" field\)"),
    ("angulations", {}, r"angulations must be a non-empty object"),
    (f"{L}.pixel_spacing_mm", -0.2, r"angulations.lateral.pixel_spacing_mm must be positive"),
    (f"{L}.pixel_spacing_mm", "0.2", r"pixel_spacing_mm must be a finite number"),
    (f"{L}.pixel_spacing_mm", 7.0, r"pixel_spacing_mm 7 is outside the plausible"),
    (f"{L}.pixel_spacing_mm", _DELETE, r"pixel_spacing_mm is missing"),
    (f"{L}.image_size", [320], r"image_size must be \[width, height\]"),
    (f"{L}.image_size", [320, 0], r"image_size must be \[width, height\]"),
    (f"{L}.fov.radius_px", 0, r"fov.radius_px must be positive"),
    (f"{L}.fov.center_xy", [1.0, None], r"fov.center_xy must be a list of two finite numbers"),
    (f"{L}.fov.center_xy", [9000.0, 10.0], r"fov.center_xy lies outside"),
    (
        f"{L}.ideal_from_distorted.kind",
        "spline",
        r"ideal_from_distorted.kind must be 'polynomial2d'",
    ),
    (
        f"{L}.ideal_from_distorted.coef_x",
        [1.0, 2.0],
        r"coef_x must be a list of 21 numbers for order 5",
    ),
    (f"{L}.distorted_from_ideal.order", 0, r"distorted_from_ideal.order must be an integer >= 1"),
    (f"{L}.residuals", _DELETE, r"residuals is missing"),
    (f"{L}.phantom.beads_used", 10, r"fitted on 10 beads, an order-5 fit needs 63"),
    (f"{L}.residuals.rms_px", 0.8, r"residual RMS 0.8 px / max .* exceeds the limits"),
    (f"{L}.residuals.max_px", 3.5, r"exceeds the limits"),
    # a corrupted coefficient: the two maps no longer invert each other
    (
        f"{L}.ideal_from_distorted.coef_x.4",
        3.0,
        r"disagree by .* px \(corrupted or edited coefficients\)",
    ),
    (f"{L}.created_utc", 20240101, r"created_utc must be a string"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD])
def test_untrustworthy_file_is_refused(calib_file, tmp_path, path, value, message):
    bad = _mutated(calib_file, tmp_path, _set(path, value))
    with pytest.raises(CalibrationError, match=message) as info:
        load_calibration(bad, "lateral")
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_not_json_and_missing_file(tmp_path):
    garbage = tmp_path / "x.json"
    garbage.write_text("{not json")
    with pytest.raises(CalibrationError, match=r"not a calibration file \(invalid JSON"):
        load_calibration(garbage)
    with pytest.raises(CalibrationError, match=r"no such calibration file"):
        load_calibration(tmp_path / "absent.json")


def test_writing_refuses_to_clobber_a_foreign_file(tmp_path, entries):
    other = tmp_path / "settings.json"
    other.write_text('{"something": "else"}')
    with pytest.raises(CalibrationError, match="refusing to overwrite an existing file"):
        write_angulation(other, "lateral", entries["lateral"][0])
    assert other.read_text() == '{"something": "else"}'


def test_frame_of_another_size_is_refused(calib_file):
    cal = load_calibration(calib_file, "lateral")
    with pytest.raises(CalibrationError, match=r"frame is 640x480 but calibration 'lateral' was made for 320x320"):
        cal.undistort(np.zeros((480, 640), np.uint8))
    # masks can still be asked for at another size (e.g. the model's plane): scaled
    small = cal.fov_mask((160, 160))
    full = cal.fov_mask((320, 320))
    assert small.shape == (160, 160)
    assert small.mean() == pytest.approx(full.mean(), abs=0.01)


def test_undistort_keeps_type_and_channels(calib_file, entries):
    cal = load_calibration(calib_file, "lateral")
    _, image = entries["lateral"]
    grey8 = (image >> 4).astype(np.uint8)
    out8 = cal.undistort(grey8)
    bgr = cal.undistort(np.dstack([grey8, grey8, grey8]))
    assert bgr.shape == (320, 320, 3) and bgr.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(bgr[..., c], out8)
    f32 = cal.undistort(image.astype(np.float32))
    assert f32.dtype == np.float32
    inside = cal.fov_mask(image.shape)
    # same geometry whatever the pixel type (bilinear rounding aside)
    assert np.abs(f32[inside] / 16 - out8[inside]).max() <= 1.5
    assert (out8[~inside] == 0).all()
    # a non-contiguous view is fine too
    np.testing.assert_array_equal(cal.undistort(np.asfortranarray(grey8)), out8)
