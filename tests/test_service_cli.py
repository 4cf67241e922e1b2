"""`python -m guidance run` as a process: real sockets, real files, signals, exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import retime_mp4, scene_frames, validate_message, write_video

ROOT = Path(__file__).resolve().parent.parent


def guidance(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "guidance", "run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def model_args(stand_in) -> list[str]:
    onnx_path, sums = stand_in
    return ["--model", str(onnx_path), "--sha256sums", str(sums)]


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line
    proc.kill()
    raise AssertionError(f"no line starting {prefix!r}; stderr: {proc.stderr.read()}")


def test_run_publishes_prints_alerts_logs_and_exits_0(tmp_path, stand_in):
    loop = write_video(tmp_path / "leak.mp4", scene_frames(30, onset=8), fps=30.0)
    log = tmp_path / "alerts.jsonl"
    proc = guidance(
        "--source",
        str(loop),
        *model_args(stand_in),
        "--address",
        "tcp://127.0.0.1:*",
        "--alert-log",
        str(log),
        "--heartbeat-ms",
        "200",
    )
    endpoint = wait_for_line(proc, "publishing on").split()[2].rstrip(",")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    received = []
    try:
        while sub.poll(5000):
            topic, payload = sub.recv_multipart()
            msg = json.loads(payload)
            assert topic.decode() == msg["type"]
            validate_message(msg)
            received.append(msg)
            if msg["type"] == "heartbeat" and msg["state"] == "stopping":
                break
    finally:
        sub.close()
        ctx.term()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "ALERT RAISED  posterior_leak [high]" in out and "done (end)" in out
    assert received and received[-1]["state"] == "stopping"
    seqs = [m["seq"] for m in received]
    assert seqs == sorted(seqs)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [m["seq"] for m in logged] == list(range(1, len(logged) + 1))  # nothing lost
    for m in logged:
        validate_message(m)
        assert {"type", "seq", "frame"} <= set(m)
    # what the console heard is exactly what was logged
    by_seq = {m["seq"]: m for m in logged}
    assert all(by_seq[m["seq"]] == m for m in received)
    # paced at 30 fps: a frame may be dropped under load, never queued; none is lost silently
    statuses = [m for m in logged if m["type"] == "status"]
    assert len(statuses) + statuses[-1]["dropped_frames"] == 30


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_exit_0(tmp_path, stand_in, sig):
    log = tmp_path / "alerts.jsonl"
    proc = guidance(
        "--source",
        "simulated:posterior",
        *model_args(stand_in),
        "--address",
        "none",
        "--alert-log",
        str(log),
    )
    wait_for_line(proc, "frame ")  # running: a line a second
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "done (signal)" in out and "Traceback" not in err
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["type"] == "heartbeat" and last["state"] == "stopping"


@pytest.mark.parametrize("what", ["missing", "text", "dir", "refused", "device"])
def test_bad_source_one_line_exit_2(tmp_path, stand_in, what):
    source = {
        "missing": tmp_path / "nope.mp4",
        "text": tmp_path / "notes.avi",
        "dir": tmp_path / "frames",
        "refused": "rtsp://127.0.0.1:1/stream",  # nothing listens on port 1
        "device": "57",  # no such capture device
    }[what]
    if what == "text":
        source.write_text("not a video")
    if what == "dir":
        source.mkdir()
    proc = guidance("--source", str(source), *model_args(stand_in), "--address", "none")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(source) in lines[0] and "expected" in lines[0]
    assert "Traceback" not in err


def test_missing_or_corrupt_model_refuses_to_start(tmp_path, stand_in):
    loop = write_video(tmp_path / "l.mp4", scene_frames(3))
    proc = guidance("--source", str(loop), "--model", str(tmp_path / "none.onnx"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and str(tmp_path / "none.onnx") in err
    assert len(err.strip().splitlines()) == 1
    onnx_path, sums = stand_in
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10])
    proc = guidance("--source", str(loop), *model_args(stand_in))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "sha256 mismatch" in err and str(onnx_path) in err
    assert "Traceback" not in err


def test_bad_flag_values_exit_2(tmp_path, stand_in):
    toml = tmp_path / "s.toml"
    toml.write_text("[alerts]\nheartbeat_ms = 0\n")
    proc = guidance("--config", str(toml), *model_args(stand_in))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "heartbeat_ms" in err and "Traceback" not in err


def test_run_says_when_a_recording_is_paced_at_its_own_frame_times(tmp_path, stand_in):
    """A video with variable frame timing replays at its timestamps, and the start line says
    so; the same file with --fps replays evenly and says nothing of it."""
    loop = retime_mp4(write_video(tmp_path / "pulsed.mp4", scene_frames(6), fps=15.0), [512, 1536] * 3)
    for extra, paced in (([], True), (["--fps", "15"], False)):
        proc = subprocess.run(
            [sys.executable, "-m", "guidance", "run", "--source", str(loop), *model_args(stand_in)]
            + ["--address", "tcp://127.0.0.1:*", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        source_line = next(line for line in proc.stdout.splitlines() if line.startswith("source "))
        assert ("paced at its video timestamps" in source_line) == paced, source_line
        assert "6 frames processed" in proc.stdout
