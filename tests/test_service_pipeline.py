"""The composed pipeline end to end on real files, real onnxruntime (stand-in graph) and,
where a socket is involved, real ZeroMQ on loopback."""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest
from conftest import scene_frames, validate_message, write_labels, write_pngs, write_video

from guidance.alerts import EventPublisher
from guidance.capture import open_source
from guidance.errors import BadInputError
from guidance.pipeline import GuidanceLoop, run_replay
from guidance.segmentation.model import Model
from guidance.segmentation.preprocess import LetterboxGeometry
from guidance.settings import Settings, load_settings


def offline(stand_in, **sections) -> Settings:
    onnx_path, sums = stand_in
    base = {
        "segmentation": {"model": str(onnx_path), "sha256sums": str(sums)},
        "alerts": {"address": None},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return Settings().replace(**base)


def replay(path, settings):
    results = []
    summary = run_replay(path, settings, on_result=results.append)
    return summary, results


def all_messages(results):
    return [m for r in results for m in r.messages]


def test_posterior_leak_end_to_end(tmp_path, stand_in):
    onset = 8
    path = write_video(tmp_path / "leak.mp4", scene_frames(24, leak="posterior", onset=onset))
    summary, results = replay(path, offline(stand_in))
    assert summary.frames_processed == 24 and summary.dropped_frames == 0
    assert [r.index for r in results] == list(range(24))
    msgs = all_messages(results)
    for m in msgs:
        validate_message(m)
    seqs = [m["seq"] for m in msgs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    raised = [m for m in summary.alerts if m["kind"] == "posterior_leak"]
    assert len(raised) == 1 and raised[0]["state"] == "raised"
    visible = next(r.index for r in results if r.status.candidate["posterior"])
    assert onset <= visible and raised[0]["frame"] <= visible + 1  # within 2 frames
    # and the drawn leak (growing from `onset`) is visible to the stand-in within 2 frames:
    # a tracker that saw it later would still pass the line above
    assert raised[0]["frame"] <= onset + 3
    assert not any(m["kind"] == "venous_leak" for m in summary.alerts)
    ev = raised[0]["evidence"]
    # the leak is drawn right of the body (x1 = 0.62 w) in the upper part: frame pixels
    assert 0.62 * 128 < ev["centroid"][0] < 128 and ev["centroid"][1] < 48
    r = results[raised[0]["frame"]]
    assert any(m is raised[0] for m in r.messages) or raised[0] in r.messages
    status = [m for m in r.messages if m["type"] == "status"][0]
    assert status["flags"]["posterior"] and status["frame"] == r.index
    assert r.image.ndim == 2 and r.image.shape == (96, 128)
    assert r.labels.shape == (48, 64) and r.labels.dtype == np.uint8
    assert isinstance(r.geometry, LetterboxGeometry)
    assert set(r.latency_ms) >= {
        "capture_to_publish",
        "capture",
        "calibrate",
        "segment",
        "track",
        "publish",
    }
    # every message of a frame was produced for that frame (except the run-level one)
    assert all(m["frame"] == r.index for m in r.messages)


def test_venous_leak_and_clean_loop(tmp_path, stand_in):
    venous = write_video(tmp_path / "venous.avi", scene_frames(20, leak="venous", onset=6))
    summary, _ = replay(venous, offline(stand_in))
    kinds = {(m["kind"], m["state"]) for m in summary.alerts}
    assert ("venous_leak", "raised") in kinds and ("posterior_leak", "raised") not in kinds
    raised = next(m for m in summary.alerts if m["kind"] == "venous_leak" and m["state"] == "raised")
    assert 6 <= raised["frame"] <= 6 + 4  # drawn from frame 6, growing
    clean = write_video(tmp_path / "clean.avi", scene_frames(20, leak=None))
    summary, _ = replay(clean, offline(stand_in))
    assert [m["kind"] for m in summary.alerts] == ["calibration_missing"]


def test_an_ap_view_says_posterior_spread_is_not_assessed(tmp_path, stand_in):
    """Posterior spread is judged in the lateral view only: an AP loop (the source says so, or
    `tracker.view`) gets a low-priority technical alert at start and no posterior verdict."""
    path = write_video(tmp_path / "loop.mp4", scene_frames(14, leak="posterior", onset=4))
    summary, results = replay(path, offline(stand_in))  # no view given: lateral
    kinds = {(m["kind"], m["state"]) for m in summary.alerts}
    assert ("posterior_leak", "raised") in kinds and "posterior_not_assessed" not in {k for k, _ in kinds}
    summary, results = replay(path, offline(stand_in, tracker={"view": "ap"}))
    note = [m for m in summary.alerts if m["kind"] == "posterior_not_assessed"]
    assert len(note) == 1 and note[0]["state"] == "raised" and note[0]["frame"] is None  # at start, kept
    assert note[0]["priority"] == "low" and note[0]["category"] == "technical" and "lateral" in note[0]["message"]
    assert not any(m["kind"] == "posterior_leak" for m in summary.alerts)
    assert not any(r.status.posterior for r in results) and results[-1].status.wall is None
    for m in summary.alerts:
        validate_message(m)


def test_spacing_from_sidecar_gives_mm_and_no_calibration_alert(tmp_path, stand_in):
    path = write_video(tmp_path / "loop.mp4", scene_frames(12, onset=4))
    write_labels(tmp_path / "loop", fps=15.0, pixel_spacing_mm=0.5)
    summary, results = replay(path, offline(stand_in))
    assert not any(m["kind"] == "calibration_missing" for m in summary.alerts)
    assert results[-1].status.units == "mm"
    # 0.5 mm per frame px, 2 frame px per model px: each model pixel is 1 mm^2
    areas = results[-1].status.areas
    assert areas["cement"] == pytest.approx(float((results[-1].labels == 2).sum()))


def test_corrupt_frame_mid_stream_alerts_skips_and_goes_on(tmp_path, stand_in):
    folder = write_pngs(tmp_path / "loop", scene_frames(10, leak=None))
    (folder / "000004.png").write_bytes(b"garbage")
    write_labels(tmp_path / "loop", fps=15.0, pixel_spacing_mm=0.25)
    log = tmp_path / "alerts.jsonl"
    summary, results = replay(folder, offline(stand_in, alerts={"log": str(log)}))
    assert summary.frames_processed == 9 and summary.frames_skipped == 1
    assert [r.index for r in results] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    tech = [(m["kind"], m["state"], m["frame"]) for m in summary.alerts]
    assert tech == [("frame_error", "raised", 4), ("frame_error", "cleared", 5)]
    logged = [line for line in log.read_text().splitlines() if '"frame_error"' in line]
    assert len(logged) == 2


def test_model_failure_on_one_frame_alerts_and_recovers(tmp_path, fragile_model):
    frames = scene_frames(8, leak=None)
    frames[3] = np.zeros_like(frames[3])  # a blank frame: the fragile graph fails on it
    folder = write_pngs(tmp_path / "loop", frames)
    write_labels(tmp_path / "loop", fps=15.0, pixel_spacing_mm=0.25)
    summary, results = replay(folder, offline(fragile_model))
    assert summary.frames_processed == 7 and summary.frames_skipped == 1
    tech = [(m["kind"], m["state"], m["frame"], m["priority"]) for m in summary.alerts]
    assert tech == [("model_error", "raised", 3, "medium"), ("model_error", "cleared", 4, "medium")]


def test_run_replay_shares_a_loaded_model_and_runs_in_parallel(tmp_path, stand_in):
    path = write_video(tmp_path / "leak.mp4", scene_frames(12, onset=4))
    settings = offline(stand_in)
    model = Model(*stand_in)
    out = {}

    def job(i):
        out[i] = run_replay(path, settings, model=model)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 3

    def verdict(summary) -> tuple:
        return tuple((m["kind"], m["frame"]) for m in summary.alerts if m["category"] == "physiological")

    # the reference: the same loop and model with nothing beside it; the leak (onset 4)
    # must raise something, or "all runs agree" could be agreement on silence
    alone = verdict(run_replay(path, settings, model=model))
    assert alone, "the leak loop raised no physiological alert"
    # the same loop, the same verdict, whatever runs beside it
    assert {verdict(s) for s in out.values()} == {alone}


def test_live_video_lost_then_back(tmp_path, stand_in):
    """A live source whose video ends: `video_lost` after the timeout, heartbeat state
    video_lost, and a clear when the device is reopened and frames flow again."""
    path = write_video(tmp_path / "live.avi", scene_frames(10, leak=None, size=(48, 64)), fps=30.0)
    settings = offline(stand_in, capture={"video_timeout_s": 0.3}, calibration={"pixel_spacing_mm": 0.3})
    source = open_source(str(path), kind="live", reconnect_s=0.6)
    model = Model(*stand_in)
    model.warm_up(1)
    seen, frames = [], []
    states = []
    stop = threading.Event()
    publisher = EventPublisher(None).open()

    def on_message(msg):
        seen.append((msg["kind"], msg["state"]))
        frames.append(msg["frame"])
        if msg["kind"] == "video_lost":
            states.append(publisher.heartbeat()["state"])
        if ("video_lost", "cleared") in seen:
            stop.set()

    loop = GuidanceLoop(settings, source, model, publisher, on_message=on_message, stop=stop)
    guard = threading.Timer(30.0, stop.set)  # a deadline, not a timing assertion
    guard.start()
    summary = loop.run()
    guard.cancel()
    publisher.close()
    assert ("video_lost", "raised") in seen and ("video_lost", "cleared") in seen
    assert states[0] == "video_lost" and states[-1] == "running"
    assert summary.stopped_by == "signal" and summary.frames_processed >= 2
    assert source.reconnects >= 1
    # frame indices keep counting across the outage: the clear is on the second pass
    assert frames[seen.index(("video_lost", "cleared"))] >= 10


def test_colour_and_16_bit_frames_are_segmented_as_grey(tmp_path, stand_in):
    frames = [cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) for f in scene_frames(4, leak=None)]
    folder = write_pngs(tmp_path / "c", frames)
    _, results = replay(folder, offline(stand_in, capture={"fps": 10.0}))
    assert results[0].image.ndim == 2
    frames16 = [f.astype(np.uint16) * 257 for f in scene_frames(4, leak=None)]
    _, r16 = replay(write_pngs(tmp_path / "d", frames16), offline(stand_in))
    assert np.array_equal(r16[2].labels, results[2].labels)


def test_settings_precedence_toml_env_flags(tmp_path):
    toml = tmp_path / "g.toml"
    toml.write_text(
        '[alerts]\naddress = "tcp://127.0.0.1:7000"\nheartbeat_ms = 250\n'
        "[tracker]\nraise_frames = 3\n[capture]\npace = false\n"
    )
    s = load_settings(toml, env={})
    assert s.alerts.address == "tcp://127.0.0.1:7000" and s.tracker.raise_frames == 3
    assert s.capture.pace is False and s.alerts.heartbeat_ms == 250
    env = {
        "GUIDANCE_ALERTS_ADDRESS": "tcp://127.0.0.1:7001",
        "GUIDANCE_TRACKER_RAISE_FRAMES": "4",
        "GUIDANCE_CAPTURE_VIDEO_TIMEOUT_S": "2.5",
        "GUIDANCE_ALERTS_LOG": "none",
    }
    s = load_settings(toml, env=env)
    assert s.alerts.address == "tcp://127.0.0.1:7001" and s.tracker.raise_frames == 4
    assert s.capture.video_timeout_s == 2.5 and s.alerts.log is None
    s = load_settings(toml, env=env, overrides={"alerts": {"address": "none"}, "tracker": {"raise_frames": 2}})
    assert s.alerts.address is None and s.tracker.raise_frames == 2
    assert Settings().alerts.address == "tcp://127.0.0.1:5556"  # loopback by default


@pytest.mark.parametrize(
    "text,match",
    [
        ("[nope]\na = 1\n", "unknown section"),
        ("[alerts]\nport = 1\n", "unknown setting"),
        ("[tracker]\nraise_frames = 'x'\n", "not a valid"),
        ("[tracker]\nposterior_side = 'up'\n", "posterior_side"),
        ("[alerts]\nheartbeat_ms = 5000\n", "heartbeat_ms"),
        ("not toml [", "TOML"),
    ],
)
def test_bad_settings_are_refused_naming_them(tmp_path, text, match):
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(BadInputError, match=match):
        load_settings(toml, env={})


def test_latency_overrun_is_a_technical_alert(tmp_path, stand_in):
    path = write_video(tmp_path / "l.avi", scene_frames(8, leak=None))
    tight = offline(
        stand_in, loop={"latency_budget_ms": 1e-6, "overrun_frames": 3}, calibration={"pixel_spacing_mm": 0.25}
    )
    summary, _ = replay(path, tight)
    overruns = [m for m in summary.alerts if m["kind"] == "latency_overrun"]
    assert [(m["state"], m["frame"], m["priority"]) for m in overruns] == [("raised", 2, "low")]
    relaxed = offline(stand_in, loop={"latency_budget_ms": 1e6}, calibration={"pixel_spacing_mm": 0.25})
    summary, _ = replay(path, relaxed)
    assert summary.alerts == []


class _MjpegServer:
    """A real HTTP MJPEG stream on 127.0.0.1 (what IP frame grabbers serve): each connection
    gets `per_connection` frames, then the stream ends, as when a cable is pulled."""

    def __init__(self, frames, per_connection: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]
        self.connections = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for jpg in jpegs[:per_connection]:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n")
                        self.wfile.write(b"Content-Length: %d\r\n\r\n" % len(jpg) + jpg + b"\r\n")
                        self.wfile.flush()
                        time.sleep(1 / 30)  # a 30 fps grabber
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_live_stream_url_lost_and_back(stand_in):
    """An HTTP MJPEG grabber stream ends (video lost) and comes back on reconnect: the loop
    raises `video_lost`, keeps heartbeating, and clears it when frames flow again."""
    server = _MjpegServer(scene_frames(12, leak=None, size=(48, 64)), per_connection=12)
    try:
        settings = offline(stand_in, capture={"video_timeout_s": 0.3}, calibration={"pixel_spacing_mm": 0.3})
        source = open_source(server.url, reconnect_s=0.5)
        assert source.info.kind == "live"
        model = Model(*stand_in)
        model.warm_up(1)
        seen = []
        stop = threading.Event()
        publisher = EventPublisher(None).open()

        def on_message(msg):
            seen.append((msg["kind"], msg["state"], msg["frame"]))
            if msg["kind"] == "video_lost" and msg["state"] == "cleared":
                stop.set()

        guard = threading.Timer(30.0, stop.set)  # a deadline, not a timing assertion
        guard.start()
        summary = GuidanceLoop(settings, source, model, publisher, on_message=on_message, stop=stop).run()
        guard.cancel()
        publisher.close()
    finally:
        server.close()
    kinds = [(k, s) for k, s, _ in seen]
    assert kinds.index(("video_lost", "raised")) < kinds.index(("video_lost", "cleared"))
    assert server.connections >= 2 and source.reconnects >= 1
    # frame indices keep counting across the outage: the clear is on the second connection
    lost_at = next(f for k, s, f in seen if (k, s) == ("video_lost", "raised"))
    cleared_at = next(f for k, s, f in seen if (k, s) == ("video_lost", "cleared"))
    assert lost_at is not None and cleared_at > lost_at  # the last frame before, a new one after
    assert summary.stopped_by == "signal" and summary.frames_processed >= 2


def test_status_carries_the_bridges_latest_telemetry(tmp_path, stand_in):
    """A telemetry PUB (as firmware_bridge binds it) on loopback: each status carries the
    newest telemetry heard, and null once it is stale."""
    import zmq

    from guidance.alerts.telemetry import InjectorListener

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    listener = InjectorListener(endpoint, stale_s=2.0).start()
    try:
        telemetry = {
            "protocol": "cement-guidance/1",
            "type": "telemetry",
            "source": "firmware_bridge",
            "seq": 1,
            "injector_state": "injecting",
            "plunger_position_mm": 12.5,
            "hold_latched": False,
        }
        deadline = time.monotonic() + 10
        while listener.latest() is None and time.monotonic() < deadline:  # slow joiner
            pub.send_multipart([b"telemetry", json.dumps(telemetry).encode()])
            listener._stop.wait(0.02)
        assert listener.latest()["injector_state"] == "injecting"
        path = write_video(tmp_path / "l.avi", scene_frames(4, leak=None))
        settings = offline(stand_in, calibration={"pixel_spacing_mm": 0.25})
        source = open_source(str(path), pace=False)
        model = Model(*stand_in)
        publisher = EventPublisher(None).open()
        results = []
        GuidanceLoop(settings, source, model, publisher, on_result=results.append, injector=listener).run()
        publisher.close()
        statuses = [m for r in results for m in r.messages if m["type"] == "status"]
        assert len(statuses) == 4
        for m in statuses:
            validate_message(m)
            assert m["injector"]["plunger_position_mm"] == 12.5
        listener.stale_s = 0.0  # nothing new heard since: stale
        assert listener.latest() is None
    finally:
        listener.stop()
        pub.close()
        ctx.term()


def test_the_loop_hides_its_long_lived_objects_from_the_collector_and_gives_them_back(tmp_path, stand_in):
    """A full cyclic collection walks every tracked object (~8 ms with onnxruntime and OpenCV
    loaded): during the loop what existed before it is frozen out of that walk; after it,
    nothing stays frozen (evaluation runs many loops in one process)."""
    import gc

    frozen_during = []
    path = write_video(tmp_path / "loop.mp4", scene_frames(3))
    run_replay(path, offline(stand_in), on_result=lambda r: frozen_during.append(gc.get_freeze_count()))
    assert len(frozen_during) == 3 and min(frozen_during) > 1000
    assert gc.get_freeze_count() == 0
