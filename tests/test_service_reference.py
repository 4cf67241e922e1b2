"""Two-channel models read the scene's first frame beside each frame: the reference is taken,
kept and retaken as documented (guidance/segmentation/reference.py), the graph gets it, and
the status says which frame it was. Real onnxruntime on stand-in graphs written here."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import build_stand_in, scene_frames, stand_in_metadata, validate_message, write_sums, write_video

from guidance.errors import ModelError
from guidance.pipeline import run_replay
from guidance.segmentation.model import Model
from guidance.segmentation.preprocess import CEMENT, preprocess
from guidance.segmentation.reference import ReferenceFrame, RegistrationReference, register, scene_correlation
from guidance.settings import Settings


@pytest.fixture
def reference_model(tmp_path) -> Model:
    d = tmp_path / "ref_model"
    d.mkdir()
    onnx_path = build_stand_in(d / "segmenter.onnx", 64, reference=True)
    write_sums(onnx_path)
    return Model(onnx_path)


def planes(frames: list[np.ndarray], size: int = 64) -> list[np.ndarray]:
    return [preprocess(f, size)[0] for f in frames]


def sim_loop(seed: int, frames: int = 6, size: int = 256, leaks=frozenset({"venous"})):
    """A simulated loop whose frames span 0.7-10 s of breathing, as training's do."""
    from models.dataset import loop_fps
    from models.sim.loop import LoopConfig, simulate

    rng = np.random.default_rng(seed)
    return simulate(rng, LoopConfig(height=size, width=size, frames=frames, fps=loop_fps(rng, frames), leaks=leaks))


def test_reference_is_the_first_frame_registered_until_the_scene_or_size_changes():
    loop = sim_loop(4242)
    x = planes(list(loop.frames), 256)
    ref = ReferenceFrame()
    shape = loop.frames[0].shape
    assert ref.scene_shift is None  # nothing seen yet
    assert ref.for_frame(x[0], shape, 0) is x[0]
    assert ref.scene_shift == (0, 0.0, 0.0)  # the reference itself: no move
    for i, xi in enumerate(x[1:], 1):  # cement grows, breathing moves: frame 0, registered
        used = ref.for_frame(xi, shape, i)
        assert used.shape == xi.shape and ref.frame == 0 and ref.taken == 1 and ref.correlation >= 0.85
        assert ref.scene_shift == (0, *ref.shift)  # what the tracker follows breathing by

    # the table moved 12 model px: still the same scene, the reference follows it (on top of
    # the breathing shift of the last frame: the simulator's truth is (-0.33, 1.67) model px)
    breathing = ref.shift
    assert abs(breathing[0] + 0.33) < 0.5 and abs(breathing[1] - 1.67) < 0.5, breathing
    panned = planes([np.roll(loop.frames[-1], 12 * loop.frames.shape[2] // 256, axis=1)], 256)[0]
    moved = ref.for_frame(panned, shape, 6)
    assert ref.frame == 0 and abs(ref.shift[0] - breathing[0] - 12) < 1 and abs(ref.shift[1] - breathing[1]) < 1
    inner = (slice(None), slice(None), slice(20, -20), slice(20, -20))
    assert np.abs(moved - panned)[inner].mean() < np.abs(x[0] - panned)[inner].mean() / 2

    # X-ray off: a black frame keeps the reference, and the same view after it still has it
    black = planes([np.zeros_like(loop.frames[0])], 256)[0]
    assert ref.for_frame(black, shape, 7) is x[0]
    assert ref.scene_shift is None  # a black frame shows no scene: no move measured
    ref.for_frame(x[-1], shape, 8)
    assert ref.frame == 0 and ref.taken == 1

    # the C-arm went to another view: that frame becomes the new reference
    other = planes([sim_loop(777).frames[3]], 256)[0]
    assert ref.for_frame(other, shape, 9) is other
    assert (ref.frame, ref.taken) == (9, 2) and ref.last_reason.startswith("scene changed")
    assert ref.scene_shift == (9, 0.0, 0.0)  # moves are now measured against frame 9

    # another frame size (another source or zoom): retaken whatever the picture
    xb = planes(scene_frames(2, size=(128, 128)), 256)
    assert ref.for_frame(xb[1], (128, 128), 10) is xb[1]
    assert ref.taken == 3 and "frame size" in ref.last_reason


def test_simulated_loops_keep_their_reference_and_other_scenes_do_not():
    """The documented threshold against the simulator's loops: a frame against its own loop's
    registered first frame stays above it through the injection; another loop's scene falls
    below it."""
    firsts, lasts, within = [], [], []
    for seed in range(6):
        x = planes(list(sim_loop(5000 + seed).frames), 256)
        within += [scene_correlation(xi, register(x[0], xi)[0]) for xi in x[1:]]
        firsts.append(x[0])
        lasts.append(x[-1])
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    across = [scene_correlation(lasts[j], register(firsts[i], lasts[j])[0]) for i, j in pairs]
    assert min(within) >= 0.88, within
    assert max(across) < 0.85, across


def test_model_stacks_the_reference_as_the_second_channel(reference_model):
    assert reference_model.takes_reference and reference_model.info.channels == 2
    x = np.zeros((1, 1, 64, 64), np.float32)
    r = np.ones((1, 1, 64, 64), np.float32)
    fed = reference_model.feed(x, r)
    assert fed.shape == (1, 2, 64, 64) and np.all(fed[:, 0] == 0) and np.all(fed[:, 1] == 1)
    alone = reference_model.feed(r)  # no reference: the frame judges itself
    assert np.all(alone[:, 0] == alone[:, 1])
    # warm-up feeds the 2-channel graph (frame + reference) through real onnxruntime
    assert not reference_model.warm
    assert 0 < reference_model.warm_up(2) < 5000 and reference_model.warm


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
    # the C-arm turned to another view (another scene, same frame size)
    other = sim_loop(777, frames=6, size=128).frames[:, 16:112, :]
    frames += [np.ascontiguousarray(f) for f in other]
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


@pytest.mark.parametrize("fixed_border", ["circular_field", "letterbox"])
def test_registration_follows_the_anatomy_not_the_fixed_border(fixed_border):
    """Breathing moves the spine, not the image intensifier's circular field nor the letterbox
    padding. Their sharp, fixed border must neither hold the shift at zero nor show up, moved
    with the reference, inside the frame's field (the model would read it as new density)."""
    frame = sim_loop(4243, frames=2, leaks=frozenset()).frames[0]
    dx, dy = 6.0, -4.0
    moved_anatomy = cv2.warpAffine(
        frame, np.float32([[1, 0, dx], [0, 1, dy]]), frame.shape[::-1], borderMode=cv2.BORDER_REFLECT
    )
    field = np.zeros(frame.shape, np.uint8)  # in the 256 px model plane, where it lands
    if fixed_border == "circular_field":
        cv2.circle(field, (128, 128), 108, 1, -1)
        before, after = frame * field, moved_anatomy * field
    else:  # a wide frame: padding above and below it in the square model input
        field[64:192] = 1
        before, after = frame[64:192], moved_anatomy[64:192]
    ref, x = planes([before, after], 256)
    registered, (sx, sy) = register(ref, x)
    assert abs(sx - dx) < 0.6 and abs(sy - dy) < 0.6, (sx, sy)
    outside = (cv2.dilate(field, np.ones((5, 5), np.uint8)) == 0)[None, None]
    assert np.array_equal(registered[outside], ref[outside])  # the fixed border stays put
    inside = (cv2.erode(field, np.ones((5, 5), np.uint8)) == 1)[None, None]
    # inside the frame's field the registered reference is anatomy: close to the frame (no cement)
    assert np.abs(registered - x)[inside].mean() < 0.25 * np.abs(ref - x)[inside].mean()


def test_registering_onto_many_frames_gives_what_registering_each_gives():
    """A reference prepared once (as the service keeps it) registers each frame exactly as a
    fresh one does, however many frames it served before (OpenCV 5.0's phaseCorrelate writes
    into its inputs: the prepared plane must not drift)."""
    x = planes(list(sim_loop(4244).frames), 256)
    prepared = RegistrationReference.of(x[0])
    for xi in x[1:] + x[1:]:
        once, shift_once = register(x[0], xi)
        kept, shift_kept = register(prepared, xi)
        assert shift_kept == shift_once and np.array_equal(kept, once)


def test_a_blank_plane_registers_without_moving():
    """A blank frame or reference (X-ray off, a black first frame) has no position: the
    reference is returned where it is, not moved by the noise of a correlation of nothing."""
    blank = np.full((1, 1, 256, 256), -2.0, np.float32)
    scene = planes(list(sim_loop(4245, frames=2).frames), 256)[0]
    for reference, frame in ((blank, blank), (blank, scene), (scene, blank)):
        moved, shift = register(reference, frame)
        assert shift == (0.0, 0.0) and np.array_equal(moved, reference)
