"""The operating point (models/operating_point.py): a class's logit moved by a constant written
into the head convolution, recorded in the metadata, and the Dice it is chosen by measured as
models.evaluate measures Dice. Real onnxruntime on the shipped graph."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from conftest import build_stand_in, run_python

from guidance.segmentation.model import Model
from guidance.segmentation.preprocess import CEMENT, preprocess
from models.evaluate import CONDITIONS, TEST_SEED_BASE, dice_counts, load_session, pooled_dice
from models.operating_point import dice_by_bias

SHIPPED = "models/segmenter.onnx"
SHIPPED_VERSION = Model(SHIPPED).info.version


def _logits(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0][0]


def test_apply_moves_one_logit_and_says_so(tmp_path):
    out = tmp_path / "biased.onnx"
    res = run_python("-m", "models.operating_point", "--apply", "-0.5", "-o", out, "--version", "9.9.9")
    assert res.returncode == 0, res.stderr
    assert "cement logit -0.5" in res.stdout
    # a demo frame, as the service feeds it (the frame beside itself as the reference)
    cap = cv2.VideoCapture("models/demo/venous_leak.mp4")
    for _ in range(60):
        ok, bgr = cap.read()
    assert ok
    x, _ = preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), 256)
    x = np.concatenate([x, x], axis=1)
    before, after = _logits(SHIPPED, x), _logits(out, x)
    moved = after - before
    assert np.allclose(moved[CEMENT], -0.5, atol=1e-4)
    assert np.allclose(np.delete(moved, CEMENT, axis=0), 0.0, atol=1e-4)
    assert (np.argmax(after, 0) == CEMENT).sum() < (np.argmax(before, 0) == CEMENT).sum()
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["guidance"])
    shipped = json.loads({p.key: p.value for p in onnx.load(SHIPPED).metadata_props}["guidance"])
    already = shipped["output"].get("logit_bias", [0.0] * 4)  # biases add up
    assert meta["version"] == "9.9.9"
    assert meta["output"]["logit_bias"] == [b - 0.5 if c == CEMENT else b for c, b in enumerate(already)]
    assert meta["history"][-1].startswith(f"{SHIPPED_VERSION} -> 9.9.9: cement logit -0.5")
    # listed in the SHA256SUMS beside it: the service's loader takes it
    assert Model(out).info.version == "9.9.9"


def test_apply_refuses_what_it_cannot_move(tmp_path):
    stand_in = build_stand_in(tmp_path / "stand_in.onnx", 64)  # its output is no convolution
    res = run_python("-m", "models.operating_point", "--model", stand_in, "--apply", "-0.5", "-o", tmp_path / "o.onnx")
    assert res.returncode == 2 and "stand_in.onnx" in res.stderr and "not a convolution" in res.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    res = run_python("-m", "models.operating_point", "--model", junk, "--apply", "-0.5", "-o", tmp_path / "o.onnx")
    assert res.returncode == 2 and "not an ONNX model" in res.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_tuning_dice_at_zero_bias_is_models_evaluate_dice():
    """The Dice the bias is chosen by is the card's Dice: same loops, same number at bias 0."""
    found = dice_by_bias(SHIPPED, 1, biases=(0.0, -0.5), seed_base=TEST_SEED_BASE)
    session, meta = load_session(SHIPPED, threads=1)
    inter, total = dice_counts(session, meta, CONDITIONS["as_drawn"], range(TEST_SEED_BASE, TEST_SEED_BASE + 1), 0)
    assert abs(found[0.0] - pooled_dice(inter, total)["cement"]) < 1e-4
    assert found[-0.5] != found[0.0]
