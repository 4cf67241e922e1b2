"""Training runs end to end (tiny) and exports an ONNX file the runtime accepts; the shipped
model is the one listed in SHA256SUMS, carries its metadata, and segments a demo loop."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from guidance.segmentation.preprocess import CLASS_NAMES, preprocess
from models.evaluate import labels_at_frame_resolution, load_session

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "segmenter.onnx"
REQUIRED_META = {"name", "version", "input", "resize", "normalization", "classes", "output", "training", "opset"}


def test_tiny_training_run_exports_a_working_onnx(tmp_path):
    out = tmp_path / "m.onnx"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.train",
            "--train-loops",
            "2",
            "--val-loops",
            "1",
            "--steps",
            "3",
            "--size",
            "64",
            "--crop",
            "32",
            "--batch",
            "2",
            "--workers",
            "1",
            "--out",
            str(out),
            "--log",
            str(tmp_path / "log.jsonl"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert (tmp_path / "SHA256SUMS").read_text() == f"{digest}  m.onnx\n"
    session, meta = load_session(out)
    assert set(meta) >= REQUIRED_META
    assert meta["classes"] == list(CLASS_NAMES) and meta["input"]["size"] == 64
    train, val = meta["training"]["train_seeds"], meta["training"]["val_seeds"]
    assert train[1] <= val[0] or val[1] <= train[0], "train and validation seeds overlap"
    logits = session.run(None, {"image": np.zeros((1, 1, 64, 64), np.float32)})[0]
    assert logits.shape == (1, 4, 64, 64)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and "val_dice" in log[-1]


def test_bad_training_arguments_are_refused():
    res = subprocess.run(
        [sys.executable, "-m", "models.train", "--steps", "0"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "--steps" in res.stderr


def test_shipped_model_is_listed_small_and_described():
    sums = dict(reversed(line.split("  ")) for line in (REPO / "models" / "SHA256SUMS").read_text().splitlines())
    assert sums["segmenter.onnx"] == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert SHIPPED.stat().st_size <= 10 * 1024 * 1024
    meta = json.loads(
        ort.InferenceSession(str(SHIPPED), providers=["CPUExecutionProvider"])
        .get_modelmeta()
        .custom_metadata_map["guidance"]
    )
    assert set(meta) >= REQUIRED_META and meta["classes"] == list(CLASS_NAMES)
    assert meta["training"]["data"].startswith("simulated")


def test_shipped_model_segments_the_bundled_demo():
    """Not a Dice target (the card measures that on held-out loops): the demo's last frame
    must come out with body, cement and needle where the labels put them."""
    import cv2

    cap = cv2.VideoCapture(str(REPO / "models" / "demo" / "posterior_leak.mp4"))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    masks = np.load(REPO / "models" / "demo" / "posterior_leak.masks.npz")["labels"]
    assert len(frames) == len(masks)
    session, meta = load_session(SHIPPED)
    truth = masks[-1]
    x, geometry = preprocess(frames[-1], meta["input"]["size"], meta["normalization"])
    pred = labels_at_frame_resolution(session.run(None, {"image": x})[0][0], geometry)
    for cls in (1, 2, 3):
        p, t = pred == cls, truth == cls
        dice = 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())
        assert dice > 0.6, (CLASS_NAMES[cls], dice)


def test_evaluate_refuses_a_missing_model(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "models.evaluate", "--model", str(tmp_path / "none.onnx")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "none.onnx" in res.stderr


def test_cement_error_breakdown_accounts_for_every_pixel():
    """The card's error analysis (`models.evaluate --errors`) adds up: true positives plus
    misses are the true cement, plus false cement the predicted cement, each share sums to 1."""
    from models.evaluate import TEST_SEED_BASE, cement_errors, held_out_config, segment
    from models.sim.loop import simulate

    session, meta = load_session(SHIPPED)
    seeds = range(TEST_SEED_BASE + 2, TEST_SEED_BASE + 3)
    report = cement_errors(session, meta, seeds, 512)
    rng = np.random.default_rng(seeds[0])
    loop = simulate(rng, held_out_config(rng, {}, 512))
    true_px = int(sum(np.count_nonzero(t == 2) for t in loop.labels))
    pred_px = int(sum(np.count_nonzero(segment(session, meta, f) == 2) for f in loop.frames))
    px = report["pixels"]
    assert true_px > 0 and px["true_positive"] > 0
    assert px["true_positive"] + px["false_negative"] == true_px
    assert px["true_positive"] + px["false_positive"] == pred_px
    for key in ("false_cement_by_distance_from_true_cement", "missed_cement_by_distance_from_predicted_cement"):
        assert abs(sum(report[key].values()) - 1.0) < 0.01, report[key]
    assert abs(sum(report["false_cement_on_true_class"].values()) - 1.0) < 0.01


def test_first_frame_reference_experiment_pairs_each_frame_with_its_loops_first(tmp_path):
    """The experiment behind the card's next step: every frame's reference is frame 0 of its
    own loop, and the script runs end to end (tiny data, a few steps)."""
    from models import dataset
    from models.experiments.first_frame_reference import first_frames

    per_loop = dataset.FRAMES_PER_LOOP
    images = np.arange(3 * per_loop, dtype=np.float16)[:, None, None] * np.ones((1, 4, 4), np.float16)
    refs = first_frames(dataset.FrameSet(images, np.zeros(images.shape, np.uint8), [0, 1, 2]))
    assert [int(r[0, 0]) for r in refs] == [0] * per_loop + [per_loop] * per_loop + [2 * per_loop] * per_loop
    out = tmp_path / "exp.json"
    res = subprocess.run(
        [sys.executable, "-m", "models.experiments.first_frame_reference", "ref", "3", str(out), "2", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "ref" and set(result["val_dice"]) == {"vertebral_body", "cement", "needle"}
