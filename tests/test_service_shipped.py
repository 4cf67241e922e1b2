"""End to end with the shipped model (models/segmenter.onnx) on the bundled demo loops, and
the no-argument `guidance run`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import validate_message

from guidance.pipeline import run_replay
from guidance.segmentation.model import Model
from guidance.settings import Settings, default_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"


@pytest.fixture(scope="module")
def shipped_model() -> Model:
    model = Model(default_model())
    model.warm_up(2)
    return model


# Known shortfalls of the shipped model (models/CARD.md), kept visible: strict xfails fail
# the suite the day they start passing, so the marks come off with a better model. (0.4.2
# raised the posterior demo 18 frames after its onset; 0.5.0 raises it at 15, in the window.)
KNOWN_MODEL_SHORTFALLS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MODEL_SHORTFALLS[name]))
        if name in KNOWN_MODEL_SHORTFALLS
        else name
        for name in ("posterior_leak", "venous_leak", "clean")
    ],
)
def test_demo_loops_raise_their_events_and_nothing_else(name, shipped_model):
    meta = json.loads((DEMO / f"{name}.labels.json").read_text())
    settings = Settings().replace(alerts={"address": None})
    messages = []
    summary = run_replay(
        DEMO / f"{name}.mp4", settings, on_result=lambda r: messages.extend(r.messages), model=shipped_model
    )
    for m in messages:
        validate_message(m)
    assert summary.frames_processed == summary.frames_read > 0
    raised = {}
    for m in summary.alerts:
        if m["category"] == "physiological" and m["state"] == "raised":
            raised.setdefault(m["kind"].removesuffix("_leak"), m["frame"])
    onsets = {e["kind"]: e["onset_frame"] for e in meta["events"]}
    window = math.ceil(meta["fps"])
    for kind, onset in onsets.items():  # every leak raised within the spec's 1 s window
        assert kind in raised and onset <= raised[kind] <= onset + window, (kind, onset, raised)
    # and nothing else: no kind the loop does not have (a false posterior alarm holds the
    # injector), and no alarm while nothing has leaked
    assert set(raised) == set(onsets), (raised, onsets)
    first = min(onsets.values(), default=len(messages) + 1)
    assert all(frame >= first for frame in raised.values()), (raised, onsets)
    # the loop carries its spacing: everything is in mm, no calibration alert
    assert not any(m["kind"] == "calibration_missing" for m in summary.alerts)


def test_guidance_run_without_arguments(tmp_path):
    """The default run: bundled demo loop, shipped model, exits 0 at the end of the loop with
    the posterior leak alert printed. Only the address is moved off the default port (other
    runs on this machine may hold it)."""
    env = dict(os.environ, GUIDANCE_ALERTS_ADDRESS="tcp://127.0.0.1:*")
    proc = subprocess.run(
        [sys.executable, "-m", "guidance", "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "ALERT RAISED  posterior_leak [high]" in proc.stdout
    assert "done (end)" in proc.stdout and "Traceback" not in proc.stderr
