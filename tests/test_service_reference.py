"""Two-channel models read the scene's first frame beside each frame: the reference is taken,
kept and retaken as documented (guidance/segmentation/reference.py), the graph gets it, and
the status says which frame it was. Real onnxruntime on stand-in graphs written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_stand_in, scene_frames, stand_in_metadata, validate_message, write_sums, write_video

from guidance.errors import ModelError
from guidance.pipeline import run_replay
from guidance.segmentation.model import Model
from guidance.segmentation.preprocess import CEMENT, preprocess
from guidance.segmentation.reference import ReferenceFrame, scene_correlation
from guidance.settings import Settings


@pytest.fixture
def reference_model(tmp_path) -> Model:
    d = tmp_path / "ref_model"
    d.mkdir()
    onnx_path = build_stand_in(d / "segmenter.onnx", 64, reference=True)
    write_sums(onnx_path)
    return Model(onnx_path)


def planes(frames: list[np.ndarray]) -> list[np.ndarray]:
    return [preprocess(f, 64)[0] for f in frames]


def test_reference_is_the_first_frame_until_the_scene_or_size_changes():
    frames = scene_frames(20)
    x = planes(frames)
    ref = ReferenceFrame(min_correlation=0.75)
    shape = frames[0].shape
    for i, xi in enumerate(x):  # cement grows, the scene stays: frame 0 throughout
        assert ref.for_frame(xi, shape, i) is x[0]
    assert ref.frame == 0 and ref.taken == 1 and ref.correlation > 0.9

    # X-ray off: a black frame keeps the reference, and the same view after it still has it
    black = planes([np.zeros_like(frames[0])])[0]
    assert ref.for_frame(black, shape, 20) is x[0]
    assert ref.for_frame(x[19], shape, 21) is x[0] and ref.taken == 1

    # the C-arm panned: the frame becomes the new reference
    panned = planes([np.roll(frames[19], 40, axis=1)])[0]
    assert scene_correlation(panned, x[0]) < 0.75
    assert ref.for_frame(panned, shape, 22) is panned
    assert (ref.frame, ref.taken) == (22, 2) and ref.last_reason.startswith("scene changed")

    # another frame size (another source or zoom): retaken whatever the picture
    bigger = scene_frames(2, size=(128, 128))
    xb = planes(bigger)
    assert ref.for_frame(xb[1], (128, 128), 23) is xb[1]
    assert ref.taken == 3 and "frame size" in ref.last_reason


def test_simulated_loops_keep_their_reference_and_other_scenes_do_not():
    """The documented threshold against the simulator's loops: a frame against its own loop's
    first frame stays above it through the injection; another loop's scene falls below it."""
    from models.sim.loop import LoopConfig, simulate

    firsts, lasts, within = [], [], []
    for seed in range(6):
        rng = np.random.default_rng(4242 + seed)
        loop = simulate(rng, LoopConfig(height=256, width=256, frames=6, leaks=frozenset({"venous"})))
        x = planes(list(loop.frames))
        within += [scene_correlation(x[0], xi) for xi in x[1:]]
        firsts.append(x[0])
        lasts.append(x[-1])
    across = [scene_correlation(firsts[i], lasts[(i + 1) % 6]) for i in range(6)]
    assert min(within) >= 0.85, within
    assert max(across) < 0.75, across


def test_model_stacks_the_reference_as_the_second_channel(reference_model):
    assert reference_model.takes_reference and reference_model.info.channels == 2
    x = np.zeros((1, 1, 64, 64), np.float32)
    r = np.ones((1, 1, 64, 64), np.float32)
    fed = reference_model.feed(x, r)
    assert fed.shape == (1, 2, 64, 64) and np.all(fed[:, 0] == 0) and np.all(fed[:, 1] == 1)
    alone = reference_model.feed(r)  # no reference: the frame judges itself
    assert np.all(alone[:, 0] == alone[:, 1])
    assert reference_model.warm_up(2) >= 0


def test_reference_model_calls_cement_only_what_is_new(reference_model, stand_in):
    """The stand-in counts as cement only what got brighter than the reference: with the
    first frame as reference, frame 0 shows none, and frame 19 shows less than the same
    stand-in without a reference channel sees (the cement there at frame 0 is not new)."""
    frames = scene_frames(20)
    first_labels, _ = reference_model.segment(frames[0], frames[0])
    assert not np.any(first_labels == CEMENT)
    with_ref, _ = reference_model.segment(frames[19], frames[0])
    one_channel, _ = Model(*stand_in).segment(frames[19])
    assert 0 < np.count_nonzero(with_ref == CEMENT) < np.count_nonzero(one_channel == CEMENT)


def test_the_service_feeds_the_first_frame_and_publishes_which(tmp_path, reference_model):
    frames = scene_frames(16, leak="posterior", onset=6)
    frames += [np.ascontiguousarray(np.roll(f, 40, axis=1)) for f in scene_frames(6, onset=6)]  # C-arm panned
    path = write_video(tmp_path / "loop.mp4", frames)
    settings = Settings().replace(alerts={"address": None, "log": str(tmp_path / "alerts.jsonl")})
    results = []
    run_replay(path, settings, on_result=results.append, model=reference_model)
    statuses = [m for r in results for m in r.messages if m["type"] == "status"]
    assert len(statuses) == len(frames)
    for m in statuses:
        validate_message(m)
    assert [m["reference_frame"] for m in statuses] == [0] * 16 + [16] * 6
    logged = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [m["reference_frame"] for m in logged if m["type"] == "status"] == [0] * 16 + [16] * 6


def test_one_channel_models_publish_no_reference(tmp_path, stand_in):
    onnx_path, sums = stand_in
    model = Model(onnx_path, sums)
    assert not model.takes_reference
    path = write_video(tmp_path / "loop.mp4", scene_frames(4))
    results = []
    run_replay(path, Settings().replace(alerts={"address": None}), on_result=results.append, model=model)
    statuses = [m for r in results for m in r.messages if m["type"] == "status"]
    assert len(statuses) == 4 and all(m["reference_frame"] is None for m in statuses)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"channels": 2}, "second input channel None unknown"),
        ({"channels": 2, "reference": "previous_frame"}, "'previous_frame' unknown"),
        ({"channels": 3}, "expects 3-channel"),
    ],
)
def test_models_with_inputs_the_service_cannot_feed_are_refused(tmp_path, change, says):
    meta = stand_in_metadata(64)
    meta["input"].update(change)
    onnx_path = build_stand_in(tmp_path / "odd.onnx", 64, metadata=meta)
    write_sums(onnx_path)
    with pytest.raises(ModelError) as err:
        Model(onnx_path)
    assert "odd.onnx" in str(err.value) and says in str(err.value)
