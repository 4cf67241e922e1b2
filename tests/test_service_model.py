"""The Model object on real onnxruntime, with stand-in graphs written by the tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_stand_in, scene_frames, stand_in_metadata, write_sums

from guidance.errors import ModelError
from guidance.segmentation.model import Model, read_sha256sums
from guidance.segmentation.preprocess import CEMENT, NEEDLE, VERTEBRAL_BODY


def test_model_knows_its_file_metadata_and_runs(stand_in):
    onnx_path, sums = stand_in
    model = Model(onnx_path, sums)
    assert model.info.size == 64 and model.info.classes[2] == "cement"
    assert model.info.normalization["scheme"] == "percentile"
    assert model.sha256 == read_sha256sums(sums)["segmenter.onnx"]
    assert model.provider == "CPUExecutionProvider"
    assert "stand-in" in model.describe()
    assert not model.warm
    # real inference on the stand-in: takes measurable time, and not seconds
    assert 0 < model.warm_up(2) < 5000 and model.warm
    frame = scene_frames(12, size=(96, 128))[-1]
    labels, geometry = model.segment(frame)
    # letterboxed 128 wide -> 64: the frame area is 48 x 64 at model resolution
    assert labels.shape == (48, 64) and labels.dtype == np.uint8
    assert geometry.scale == pytest.approx(0.5)
    assert {VERTEBRAL_BODY, CEMENT, NEEDLE} <= set(np.unique(labels).tolist())
    # the cement blob sits at the needle tip (0.46 w, 0.5 h) of the frame
    assert labels[24, int(0.46 * 64)] == CEMENT


def test_sums_default_next_to_model(stand_in):
    onnx_path, _ = stand_in
    assert Model(onnx_path).path == onnx_path


def test_missing_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="missing") as err:
        Model(tmp_path / "segmenter.onnx", tmp_path / "SHA256SUMS")
    assert "segmenter.onnx" in str(err.value)


def test_corrupt_model_is_refused_with_expected_and_actual_hash(stand_in):
    onnx_path, sums = stand_in
    expected = read_sha256sums(sums)["segmenter.onnx"]
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ModelError) as err:
        Model(onnx_path, sums)
    text = str(err.value)
    assert str(onnx_path) in text and expected in text and "actual" in text


def test_unlisted_model_and_missing_sums_are_refused(tmp_path):
    path = build_stand_in(tmp_path / "other.onnx")
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  segmenter.onnx\n")
    with pytest.raises(ModelError, match="not listed"):
        Model(path, tmp_path / "SHA256SUMS")
    with pytest.raises(ModelError, match="checksum list"):
        Model(path, tmp_path / "nothing")


def test_model_without_metadata_or_wrong_io_is_refused(tmp_path):
    meta = stand_in_metadata(64)
    meta["input"]["name"] = "pixels"
    path = build_stand_in(tmp_path / "a.onnx", metadata=meta)
    with pytest.raises(ModelError, match="does not match"):
        Model(path, write_sums(path))
    bad = build_stand_in(tmp_path / "b.onnx", metadata={"name": "x"})
    with pytest.raises(ModelError, match="malformed"):
        Model(bad, write_sums(bad))


def test_garbage_file_listed_in_sums_is_refused_by_onnxruntime(tmp_path):
    path = tmp_path / "segmenter.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match="cannot load"):
        Model(path, write_sums(path))


def test_cuda_requested_without_cuda_is_refused(stand_in):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the refusal cannot happen here")
    with pytest.raises(ModelError, match="cuda"):
        Model(*stand_in, provider="cuda")
    assert Model(*stand_in, provider="auto").provider == "CPUExecutionProvider"


def test_metadata_json_round_trip(stand_in):
    model = Model(*stand_in)
    assert json.loads(json.dumps(model.info.raw))["output"]["name"] == "logits"


def _reference_preprocess(frame, size, norm):
    """The original, straightforward preprocessing (np.percentile over the valid pixels of
    the whole plane): the optimised one must give the same bits."""
    from guidance.segmentation.preprocess import LetterboxGeometry, letterbox, to_float_grey

    grey = to_float_grey(frame)
    g = LetterboxGeometry.fit(grey.shape[0], grey.shape[1], size)
    plane = letterbox(grey, g)
    valid = np.zeros(plane.shape, dtype=bool)
    h, w = g.inner_shape
    valid[g.pad_y : g.pad_y + h, g.pad_x : g.pad_x + w] = True
    lo, hi = np.percentile(plane[valid], [norm["low"], norm["high"]])
    span = float(hi - lo) if hi > lo else 1.0
    unit = np.clip((plane - lo) / span, 0.0, 1.0)
    x = ((unit - norm["mean"]) / norm["std"]).astype(np.float32)
    x[~valid] = (0.0 - norm["mean"]) / norm["std"]
    return x[None, None]


@pytest.mark.parametrize(
    "shape", [(1024, 1024), (512, 512), (1024, 2048), (2048, 4096), (768, 1024), (480, 640), (97, 131), (40, 30)]
)
def test_fast_preprocess_is_bit_identical(shape):
    """Power-of-two shrinks of 8-bit frames take the block-sum/lookup path, the rest the float
    path: both give exactly the reference's bits."""
    from guidance.segmentation.preprocess import DEFAULT_NORMALIZATION, preprocess

    rng = np.random.default_rng(shape[0])
    frames = [
        scene_frames(1, size=shape)[0],
        rng.integers(0, 256, shape, dtype=np.uint8),
        rng.integers(0, 65536, shape, dtype=np.uint16),
        np.full(shape, 9, np.uint8),
    ]
    for frame in frames:
        x, _ = preprocess(frame, 256, DEFAULT_NORMALIZATION)
        assert np.array_equal(x, _reference_preprocess(frame, 256, DEFAULT_NORMALIZATION))


def test_percentile_window_matches_numpy_bit_for_bit():
    from guidance.segmentation.preprocess import percentile_window

    rng = np.random.default_rng(7)
    for _ in range(200):
        v = rng.normal(size=int(rng.integers(1, 70000))).astype(np.float32)
        if rng.random() < 0.3:
            v = np.round(v * 4) / 4  # many ties
        lo, hi = rng.uniform(0, 10), rng.uniform(90, 100)
        assert percentile_window(v, lo, hi) == tuple(np.percentile(v, [lo, hi]))


def test_order_statistics_of_integers_match_numpy():
    from guidance.segmentation.preprocess import _order_statistics

    rng = np.random.default_rng(11)
    for _ in range(100):
        n = int(rng.integers(8192, 70000))
        v = rng.integers(0, int(rng.choice([3, 255, 4081, 65535])), n).astype(np.uint16)
        ranks = sorted(set(rng.integers(0, n, 4).tolist()))
        assert np.array_equal(_order_statistics(v, ranks), np.partition(v, ranks)[ranks])


def test_argmax_classes_matches_numpy():
    from guidance.segmentation.model import argmax_classes

    rng = np.random.default_rng(3)
    for shape in [(4, 256, 256), (4, 17, 33), (3, 5, 5)]:
        x = rng.normal(size=shape).astype(np.float32)
        x[:, :3, :3] = 0.25  # ties: the first class wins, as with np.argmax
        assert np.array_equal(argmax_classes(x), np.argmax(x, axis=0).astype(np.uint8))


def _edge_in_model_px(plane: np.ndarray, cls: int) -> float:
    """Where a vertical class boundary sits along x in a label plane (mean first column of cls)."""
    return float(np.mean([np.flatnonzero(row == cls)[0] for row in plane]))


@pytest.mark.parametrize("frame_side", [1024, 768, 512])
def test_training_labels_keep_boundaries_where_the_image_has_them(frame_side):
    """A boundary at frame x = X lies at model x = (X + 0.5) / f - 0.5 in the area-averaged image;
    the labels put it there (within half a model pixel), not (f - 1) / 2 frame px away as the
    top-left sample of cv2.INTER_NEAREST did."""
    from guidance.segmentation.preprocess import LetterboxGeometry, letterbox_labels

    g = LetterboxGeometry.fit(frame_side, frame_side, 256)
    f = frame_side / 256
    errors = []
    for edge in range(300, 300 + 4 * int(f)):  # every phase of the boundary within a block
        labels = np.zeros((frame_side, frame_side), np.uint8)
        labels[:, edge:] = VERTEBRAL_BODY
        small = letterbox_labels(labels, g)
        # the model pixel whose block is mostly body is the first one labelled body: the edge
        # falls within its first half
        first = _edge_in_model_px(small, VERTEBRAL_BODY)
        errors.append(first - edge / f)  # how far the block's start is from the true edge
    errors = np.asarray(errors)
    assert np.all(errors > -0.5 - 1e-9) and np.all(errors <= 0.5 + 1e-9), errors
    # no systematic shift beyond ties (a boundary exactly mid-block goes to the class met first):
    # half a frame pixel at most; the top-left sample's shift was (f - 1) / 2 frame px
    assert abs(errors.mean()) * f <= 0.5 + 1e-9, errors


def test_training_labels_break_ties_for_thin_structures_and_pad_with_background():
    """Half a block each way (a boundary mid-block) goes to the needle, then bone, then cement,
    then background: a vein or a cannula half a block wide stays in the labels, and so does a
    cortical rim half a block thick between cement and the world outside."""
    from guidance.segmentation.preprocess import BACKGROUND, LetterboxGeometry, letterbox_labels

    g = LetterboxGeometry.fit(768, 1024, 256)  # letterboxed: 32 padding rows above and below
    labels = np.zeros((768, 1024), np.uint8)
    labels[:, 402:404] = CEMENT  # a vein two frame px wide, outside the bone: half a 4 px block
    labels[100:102, :] = NEEDLE  # a cannula two px high
    labels[400:404, 600:800] = VERTEBRAL_BODY
    labels[402:404, 600:800] = CEMENT  # cement up to a rim of bone two px thick
    small = letterbox_labels(labels, g)
    assert g.pad_y == 32 and not small[: g.pad_y].any() and not small[g.pad_y + 192 :].any()
    inner = g.crop(small)
    assert np.all(inner[30:, 100] == CEMENT)  # the vein
    assert np.all(inner[25, :] == NEEDLE)  # the cannula, across the vein too
    assert np.all(inner[100, 150:200] == VERTEBRAL_BODY)  # the rim, not cement
    assert np.all(inner[99, 150:200] == BACKGROUND) and np.all(inner[101, 150:200] == BACKGROUND)


def test_soft_training_targets_are_class_shares_that_place_a_boundary_inside_a_pixel():
    """letterbox_shares: each model pixel's share of each class (sums to 1, padding all
    background), whose majority is letterbox_labels (ties aside); brought back to the frame as the service
    brings class planes back (bilinear, argmax), a boundary inside a model pixel comes back
    within a frame pixel of where it was, at every phase of the block."""
    from guidance.segmentation.preprocess import LetterboxGeometry, letterbox_labels, letterbox_shares
    from models.evaluate import labels_at_frame_resolution

    g = LetterboxGeometry.fit(768, 1024, 256)  # letterboxed: 32 padding rows above and below
    for edge in range(600, 604):  # every phase within a 4 px block
        labels = np.zeros((768, 1024), np.uint8)
        labels[:, edge:] = VERTEBRAL_BODY
        labels[300:310, edge + 40 : edge + 49] = CEMENT
        shares = letterbox_shares(labels, g)
        assert shares.shape == (4, 256, 256) and shares.dtype == np.float32
        np.testing.assert_allclose(shares.sum(0), 1.0, atol=1e-5)
        assert (shares[0, : g.pad_y] == 1).all() and (shares[1:, : g.pad_y] == 0).all()
        top_two = np.sort(shares, 0)[-2:]
        untied = top_two[1] > top_two[0]  # exact ties go by TIE_PRIORITY in letterbox_labels
        np.testing.assert_array_equal(np.argmax(shares, 0)[untied], letterbox_labels(labels, g)[untied])
        # the block holding the edge is split in proportion: (edge % 4) of 4 columns background
        column = (edge // 4) * 4 // 4
        assert shares[1, 100, column] == pytest.approx(1 - (edge % 4) / 4)
        back = labels_at_frame_resolution(shares, g)
        found = int(np.argmax(back[400] == VERTEBRAL_BODY))
        assert abs(found - edge) <= 1, (edge, found)
        cement_back = back[300:310] == CEMENT
        assert abs(int(cement_back.sum()) - 90) <= 30  # a 10 x 9 px deposit stays that size
