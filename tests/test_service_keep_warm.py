"""The loop's keep-warm pass: between frames of a live or paced source the last frame runs
through calibration and segmentation again (nothing published, no state changed) just before
the next is due.
Real onnxruntime (the shipped two-channel model, whose reference frame is state), real files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import scene_frames, write_video

from guidance.alerts import EventPublisher
from guidance.capture import Frame, open_source
from guidance.pipeline import FramePeriod, GuidanceLoop, compose, run_replay
from guidance.segmentation.model import Model, RehearsalCut
from guidance.settings import Settings, default_model

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"


@pytest.fixture(scope="module")
def shipped_model() -> Model:
    model = Model(default_model())
    model.warm_up(1)
    return model


def demo_frames(name: str, count: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(DEMO / f"{name}.mp4"))
    frames = []
    while len(frames) < count:
        ok, image = cap.read()
        assert ok, f"{name}.mp4 has fewer than {count} frames"
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    cap.release()
    return frames


def test_a_rehearsal_changes_nothing_the_frames_after_it_see(shipped_model):
    """Two pipelines over the posterior demo's first 64 frames (its leak raises at 63): one
    rehearses each frame right after processing it, the other never does. Every status,
    class map, reference and alert is the same; each rehearsal segments its frame as the frame
    itself was segmented (it ran for real)."""
    settings = Settings().replace(alerts={"address": None})
    source = open_source(str(DEMO / "posterior_leak.mp4"), pace=False)
    info = source.info
    source.stop()
    runs = {}
    for rehearsing in (True, False):
        publisher = EventPublisher(None).open()
        pipeline = compose(settings, source, shipped_model, publisher)
        seen, same_labels = [], []
        for index, image in enumerate(demo_frames("posterior_leak", 64)):
            frame = Frame(index, 0, image, info)
            ctx = pipeline.process(frame)
            alerts = [(m["kind"], m["state"], m["frame"]) for m in ctx.messages if m["type"] == "alert"]
            seen.append((ctx.status, ctx.labels, ctx.reference_frame, ctx.scene_shift, alerts))
            if rehearsing:
                again = pipeline.rehearse(frame)
                same_labels.append(np.array_equal(again.labels, ctx.labels))
        publisher.close()
        runs[rehearsing] = seen, same_labels
    (with_, same), (without, _) = runs[True], runs[False]
    assert sum(same) >= 62  # all but where a reference was taken (registered onto itself)
    for a, b in zip(with_, without, strict=True):
        assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2:] == b[2:]
    raised = [alert for *_, alerts in with_ for alert in alerts if alert[0] == "posterior_leak"]
    assert raised and raised[0][1] == "raised"  # the comparison covered an alert


def run_paced(path, stand_in, keep_warm: bool, pace: bool = True):
    onnx_path, sums = stand_in
    settings = Settings().replace(
        segmentation={"model": str(onnx_path), "sha256sums": str(sums)},
        alerts={"address": None},
        loop={"keep_warm": keep_warm, "latency_budget_ms": None},
    )
    return run_replay(open_source(str(path), pace=pace), settings)


def test_keep_warm_rehearses_between_frames_of_a_paced_source_only(tmp_path, stand_in):
    path = write_video(tmp_path / "loop.mp4", scene_frames(16, leak="posterior", onset=4), fps=30.0)
    warm = run_paced(path, stand_in, keep_warm=True)
    # a 64 px stand-in takes ~1 ms of a 33 ms period: time for a pass after nearly every frame
    assert warm.frames_processed == 16 and warm.rehearsals >= 8
    off = run_paced(path, stand_in, keep_warm=False)
    fast = run_paced(path, stand_in, keep_warm=True, pace=False)
    assert off.rehearsals == 0 and fast.rehearsals == 0  # off, and no idle time to fill
    kinds = [[(m["kind"], m["state"], m["frame"]) for m in s.alerts] for s in (warm, off, fast)]
    assert kinds[0] == kinds[1] == kinds[2] and ("posterior_leak", "raised") in [k[:2] for k in kinds[0]]


def test_a_failing_rehearsal_turns_keep_warm_off_and_the_loop_goes_on(tmp_path, stand_in):
    path = write_video(tmp_path / "loop.mp4", scene_frames(4), fps=30.0)
    source = open_source(str(path), pace=True)
    model = Model(*stand_in)
    publisher = EventPublisher(None).open()
    try:
        loop = GuidanceLoop(Settings().replace(alerts={"address": None}), source, model, publisher)
        assert loop.keep_warm
        loop._rehearse(Frame(0, 0, np.zeros((2, 2), np.uint8), source.info))  # too small: malformed
        assert not loop.keep_warm and loop.summary.rehearsals == 0
        summary = loop.run()
    finally:
        publisher.close()
    assert summary.frames_processed == 4 and summary.rehearsals == 0


def test_the_frame_period_follows_the_frames_as_they_come():
    """The nominal rate until four intervals are seen, then their median: a grabber that
    reports no rate (or a wrong one) is followed, and one dropped frame does not move it."""
    ms = 1_000_000
    reported = FramePeriod(30.0)  # says 30 fps, delivers 25
    unknown = FramePeriod(None)
    got = []
    for i, t in enumerate([0, 40, 80, 120, 200, 240, 280]):  # 160 -> 200: a frame dropped
        got.append((reported.observe(t * ms), unknown.observe(t * ms)))
        if i < 4:
            assert got[-1] == (33_333_333, 0)
    assert got[4:] == [(40 * ms, 40 * ms)] * 3


def test_a_frame_that_comes_cuts_the_pass_short(tmp_path, stand_in):
    """Checked before each operator: the new frame goes first, the rest of the pass is dropped."""
    path = write_video(tmp_path / "loop.mp4", scene_frames(2), fps=30.0)
    source = open_source(str(path), pace=False)
    source.stop()
    publisher = EventPublisher(None).open()
    pipeline = compose(Settings().replace(alerts={"address": None}), source, Model(*stand_in), publisher)
    frame = Frame(0, 0, scene_frames(1)[0], source.info)
    pipeline.process(frame)

    def after(n: int):  # cut_short says yes from its (n + 1)th question on
        asked = []
        return lambda: asked.append(1) or len(asked) > n

    whole, none, calibrated = (pipeline.rehearse(frame, after(n)) for n in (9, 0, 1))
    publisher.close()
    assert whole.labels is not None and whole.status is None  # the pass leaves the tracker out
    assert none.image is None and none.labels is None  # cut before the first operator
    assert calibrated.image is not None and calibrated.labels is None  # after calibrate only


def test_a_cut_rehearsal_inference_ends_and_the_model_runs_on(shipped_model):
    """Model.cut_rehearsal() (the reader thread calls it as a frame comes) ends the pass's
    onnxruntime run at its next node; the frame's own inference is never cut."""
    x, _ = shipped_model.preprocess(demo_frames("clean", 1)[0])
    whole = shipped_model.infer(x, x)
    shipped_model.arm_rehearsal()
    assert np.array_equal(shipped_model.infer(x, x, rehearsal=True), whole)
    shipped_model.cut_rehearsal()
    with pytest.raises(RehearsalCut):
        shipped_model.infer(x, x, rehearsal=True)
    assert np.array_equal(shipped_model.infer(x, x), whole)  # a frame's run ignores the cut
    shipped_model.arm_rehearsal()
    assert np.array_equal(shipped_model.infer(x, x, rehearsal=True), whole)


def test_the_source_calls_its_frame_hook_as_each_frame_comes(tmp_path):
    path = write_video(tmp_path / "loop.mp4", scene_frames(5), fps=30.0)
    source = open_source(str(path), pace=False)
    came = []
    source.on_frame = lambda: came.append(source.frames_read)
    source.start()
    read = 0
    while source.read(1.0) is not None:
        read += 1
    source.stop()
    assert read == 5 and came == [1, 2, 3, 4, 5]  # once per frame, after it was handed over
