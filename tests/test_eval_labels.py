"""Labels validation (recorded-loops.md) and loop discovery, on files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from guidance.errors import BadInputError, GuidanceError
from guidance.evaluation.discovery import discover
from guidance.evaluation.labels import LabelsError, load_labels, load_masks

GOOD = {
    "schema": "cine-labels/1",
    "fps": 15.0,
    "pixel_spacing_mm": 0.25,
    "view": "lateral",
    "posterior_side": "right",
    "events": [{"kind": "posterior", "onset_frame": 41}, {"kind": "venous", "onset_frame": 63}],
}


def write(tmp_path: Path, doc, name: str = "loop") -> Path:
    path = tmp_path / f"{name}.labels.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_good_labels_load(tmp_path):
    lab = load_labels(write(tmp_path, GOOD))
    assert lab.fps == 15.0 and lab.view == "lateral" and lab.posterior_side == "right"
    assert [(e.kind, e.onset_frame) for e in lab.events] == [("posterior", 41), ("venous", 63)]
    assert lab.masks_path is None


def test_minimal_labels_fps_optional(tmp_path):
    lab = load_labels(write(tmp_path, {"schema": "cine-labels/1", "view": "ap", "events": []}))
    assert lab.fps is None and lab.events == () and lab.posterior_side is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema": "cine-labels/2"}, "schema"),
        ({"fps": 0}, "fps"),
        ({"fps": "15"}, "fps"),
        ({"fps": True}, "fps"),
        ({"pixel_spacing_mm": -1}, "pixel_spacing_mm"),
        ({"view": "oblique"}, "view"),
        ({"posterior_side": "up"}, "posterior_side"),
        ({"view": "ap"}, "posterior_side"),  # posterior_side is for the lateral view only
        ({"events": None}, "events"),
        ({"events": {"kind": "posterior"}}, "events"),
        ({"events": [{"kind": "arterial", "onset_frame": 3}]}, "events[0].kind"),
        ({"events": [{"kind": "venous", "onset_frame": -1}]}, "events[0].onset_frame"),
        ({"events": [{"kind": "venous", "onset_frame": 2.0}]}, "events[0].onset_frame"),
        ({"events": [{"kind": "venous", "onset_frame": 1}, {"kind": "venous"}]}, "events[1].onset_frame"),
        ({"events": ["venous"]}, "events[0]"),
        ({"masks": 7}, "masks"),
        ({"masks": "missing.npz"}, "masks"),
    ],
)
def test_each_spec_violation_names_file_and_field(tmp_path, change, field):
    path = write(tmp_path, {**GOOD, **change})
    with pytest.raises(LabelsError) as info:
        load_labels(path)
    assert info.value.field == field
    assert str(path) in str(info.value) and f"'{field}'" in str(info.value)
    assert isinstance(info.value, GuidanceError) and info.value.exit_code == 2


def test_missing_events_and_bad_json(tmp_path):
    doc = {k: v for k, v in GOOD.items() if k != "events"}
    with pytest.raises(LabelsError, match="'events'"):
        load_labels(write(tmp_path, doc))
    with pytest.raises(LabelsError, match="not valid JSON"):
        load_labels(write(tmp_path, "{", name="broken"))
    with pytest.raises(LabelsError, match="JSON object"):
        load_labels(write(tmp_path, "[]", name="list"))


def masks_file(tmp_path: Path, name: str = "loop.masks.npz", **arrays) -> str:
    np.savez_compressed(tmp_path / name, **arrays)
    return name


def test_masks_validated_by_header_then_by_value(tmp_path):
    good = np.zeros((3, 8, 8), np.uint8)
    good[1, 2:4, 2:4] = 2
    lab = load_labels(write(tmp_path, {**GOOD, "masks": masks_file(tmp_path, labels=good)}))
    assert lab.masks_shape == (3, 8, 8)
    assert np.array_equal(load_masks(lab), good)

    for arrays, why in [
        ({"masks": good}, "no key 'labels'"),
        ({"labels": good.astype(np.int32)}, "uint8"),
        ({"labels": good[0]}, r"\[frames, height, width\]"),
    ]:
        name = masks_file(tmp_path, **arrays)
        with pytest.raises(LabelsError, match=why) as info:
            load_labels(write(tmp_path, {**GOOD, "masks": name}))
        assert info.value.field == "masks"

    bad = good.copy()
    bad[2, 0, 0] = 7
    lab = load_labels(write(tmp_path, {**GOOD, "masks": masks_file(tmp_path, labels=bad)}))
    with pytest.raises(LabelsError, match="frame 2 has 7"):
        load_masks(lab)

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LabelsError, match="not a valid .npz"):
        load_labels(write(tmp_path, {**GOOD, "masks": "junk.npz"}))


def _png_folder(path: Path, n: int = 2) -> None:
    path.mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(path / f"{i:06d}.png"), np.zeros((8, 8), np.uint8))


def test_discovery_finds_every_form_and_pairs_labels(tmp_path):
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    for name in ("a.dcm", "b.mp4", "sub/c.avi", "sub/d.MKV", "notes.txt", "a.masks.npz"):
        (root / name).write_bytes(b"x")
    _png_folder(root / "sub" / "e")
    (root / "sub" / "empty").mkdir()
    write(root, GOOD, name="a")
    write(root / "sub", GOOD, name="e")
    write(root / "sub", GOOD, name="ghost")  # labels without a loop
    refs, orphans = discover([root])
    assert [(r.loop_id, r.form) for r in refs] == [
        ("a.dcm", "dicom"),
        ("b.mp4", "video"),
        ("sub/c.avi", "video"),
        ("sub/d.MKV", "video"),
        ("sub/e", "png"),
    ]
    assert [r.name for r in refs] == ["a", "b", "c", "d", "e"]
    assert refs[0].labels == str(root / "a.labels.json")
    assert refs[1].labels is None
    assert refs[4].labels == str(root / "sub" / "e.labels.json")
    assert orphans == [str(root / "sub" / "ghost.labels.json")]
    assert refs[2].slug == "sub_c" and refs[4].slug == "sub_e"

    # a loop given directly, and the same loop twice, count once
    refs2, _ = discover([root / "b.mp4", root / "b.mp4", root / "sub" / "e"])
    assert [r.loop_id for r in refs2] == ["b.mp4", "e"]


def test_discovery_bad_paths(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        discover([tmp_path / "nope"])
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(BadInputError, match="not a loop"):
        discover([tmp_path / "x.txt"])
    assert discover([tmp_path]) == ([], [])


def test_masks_stream_frame_by_frame(tmp_path):
    from guidance.evaluation.labels import MaskStream

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 4, (5, 6, 7), dtype=np.uint8)
    arr[4, 0, 0] = 9
    lab = load_labels(write(tmp_path, {**GOOD, "masks": masks_file(tmp_path, labels=arr)}))
    stream = MaskStream(lab)
    assert len(stream) == 5
    assert np.array_equal(stream.frame(0), arr[0])
    assert np.array_equal(stream.frame(2), arr[2])  # frame 1 skipped
    with pytest.raises(ValueError, match="after frame 2"):
        stream.frame(1)
    assert np.array_equal(stream.frame(3), arr[3])
    with pytest.raises(LabelsError, match="frame 4 has 9"):
        stream.frame(4)
    stream.close()
