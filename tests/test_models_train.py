"""Training runs end to end (tiny) and exports an ONNX file the runtime accepts; the shipped
model is the one listed in SHA256SUMS, carries its metadata, and segments a demo loop."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_python

from guidance.segmentation.preprocess import CLASS_NAMES
from models.evaluate import load_session, segment

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "segmenter.onnx"
REQUIRED_META = {"name", "version", "input", "resize", "normalization", "classes", "output", "training", "opset"}


@pytest.mark.parametrize(
    "options",
    [
        [],
        [
            "--targets",
            "soft",
            "--ema",
            "0.5",
            "--deep-widths",
            "32,48,64",
            "--version",
            "1.2.3",
            "--upsample",
            "nearest",
        ],
    ],
    ids=["shipped", "soft-ema-deep"],
)
def test_tiny_training_run_exports_a_working_onnx(tmp_path, options):
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
            *options,
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
    # a candidate until it is shipped with a version of its own (or --version names one)
    version = "1.2.3" if options else "0.0.0"
    assert meta["version"] == version and onnx.load(str(out)).model_version == (123 if options else 0)
    assert meta["classes"] == list(CLASS_NAMES) and meta["input"]["size"] == 64
    train, val = meta["training"]["train_seeds"], meta["training"]["val_seeds"]
    assert train[1] <= val[0] or val[1] <= train[0], "train and validation seeds overlap"
    # the default is the two-channel model: the frame and the scene's first frame
    assert meta["input"]["channels"] == 2 and meta["input"]["reference"] == "first_frame"
    assert meta["training"]["channels"] == 2
    logits = session.run(None, {"image": np.zeros((1, 2, 64, 64), np.float32)})[0]
    assert logits.shape == (1, 4, 64, 64)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and "val_dice" in log[-1]
    # what the run trained on and exported is in the file
    if options:
        assert meta["training"]["labels"] == "area_shares" and meta["training"]["ema"] == 0.5
        assert meta["training"]["upsample"] == "nearest"
        resizes = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Resize"]
        assert len(resizes) == 4 and all(b"nearest" in [a.s for a in n.attribute] for n in resizes)
        assert "val_dice_ema" in log[-1] and set(meta["training"]["val_dice_last_weights"]) == set(CLASS_NAMES[1:])
        assert meta["training"]["deep_widths"] == [32, 48, 64]
    else:
        assert meta["training"]["labels"] == "area_majority" and "ema" not in meta["training"]
        assert "deep_widths" not in meta["training"]


@pytest.mark.parametrize(
    ("args", "named"),
    [(["--steps", "0"], "--steps"), (["--deep-widths", "32,40,64"], "--deep-widths"), (["--deep-widths", "32"], "32")],
)
def test_bad_training_arguments_are_refused(args, named):
    res = subprocess.run(
        [sys.executable, "-m", "models.train", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and named in res.stderr and "Traceback" not in res.stderr


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
    pred = segment(session, meta, frames[-1], first_frame=frames[0])
    for cls in (1, 2, 3):
        p, t = pred == cls, truth == cls
        dice = 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())
        assert dice > 0.6, (CLASS_NAMES[cls], dice)


def test_evaluate_refuses_a_missing_model(tmp_path):
    res = run_python("-m", "models.evaluate", "--model", tmp_path / "none.onnx", timeout=60)
    assert res.returncode == 2 and "none.onnx" in res.stderr


def test_held_out_dice_is_pooled_over_loops_with_a_bootstrap_interval_over_loops():
    """models.evaluate's numbers: Dice pooled over every frame of every loop, and a 95 %
    interval from resampling whole loops (same counts, same interval; no spread, no width)."""
    from models.evaluate import dice_ci95, pooled_dice

    # columns: background (unused), body, cement, needle; rows: loops
    inter = np.array([[0, 90, 40, 0], [0, 80, 10, 0], [0, 70, 45, 0], [0, 60, 20, 0]], float)
    total = np.array([[0, 200, 100, 0], [0, 180, 100, 0], [0, 150, 100, 0], [0, 130, 100, 0]], float)
    dice = pooled_dice(inter, total)
    assert dice["vertebral_body"] == round(2 * 300 / 660, 4)
    assert dice["cement"] == round(2 * 115 / 400, 4) and dice["needle"] is None
    ci = dice_ci95(inter, total)
    assert ci == dice_ci95(inter, total) and ci["needle"] is None
    low, high = ci["cement"]
    assert 2 * 10 / 100 <= low < dice["cement"] < high <= 2 * 45 / 100  # within the loops' own range
    same = dice_ci95(np.repeat(inter[:1], 4, axis=0), np.repeat(total[:1], 4, axis=0))
    assert same["cement"] == [0.8, 0.8] and same["vertebral_body"] == [0.9, 0.9]


def test_paired_difference_resamples_the_same_loops_for_both_models():
    from models.evaluate import paired_difference

    inter = np.array([[0, 90, 40, 0], [0, 80, 10, 0], [0, 70, 45, 0], [0, 60, 20, 0]], float)
    total = np.array([[0, 200, 100, 0], [0, 180, 100, 0], [0, 150, 100, 0], [0, 130, 100, 0]], float)
    same = paired_difference((inter, total), (inter, total))
    assert same["cement"]["difference"] == 0.0 and same["cement"]["ci95"] == [0.0, 0.0]
    assert same["needle"] is None  # no needle pixel in either
    # the model finds 2 more cement pixels in every loop: a small gain, but in every scene,
    # so the paired interval lies above 0 although each model's own interval is far wider
    better = inter.copy()
    better[:, 2] += 2
    gain = paired_difference((better, total), (inter, total))["cement"]
    assert gain["difference"] == round(2 * 123 / 400 - 2 * 115 / 400, 4)
    assert 0 < gain["ci95"][0] <= gain["difference"] <= gain["ci95"][1]
    worse = paired_difference((inter, total), (better, total))["cement"]
    assert worse["ci95"][1] < 0


def test_evaluate_compares_with_a_baseline_on_the_same_loops(tmp_path, stand_in):
    baseline, _ = stand_in  # intensity bins, not a trained model: far worse on every loop
    out = tmp_path / "m.json"
    res = run_python(
        *("-m", "models.evaluate", "--quick", "--loops", 2, "--size", 512),
        *("--baseline", baseline, "--out", out),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    paired = report["paired_with_baseline"]["as_drawn"]
    for name, row in paired.items():
        assert row["model"] == report["dice"]["as_drawn"][name]  # the shipped model's own Dice
        assert row["difference"] == round(row["model"] - row["baseline"], 4)
    cement = paired["cement"]
    assert cement["baseline"] < cement["model"] - 0.2 and 0 < cement["ci95"][0] <= cement["difference"]
    low, high = report["dice_ci95"]["as_drawn"]["cement"]
    assert low <= report["dice"]["as_drawn"]["cement"] <= high
    missing = run_python("-m", "models.evaluate", "--baseline", tmp_path / "none.onnx", timeout=60)
    assert missing.returncode == 2 and "none.onnx" in missing.stderr


def test_cement_error_breakdown_accounts_for_every_pixel():
    """The card's error analysis (`models.evaluate --errors`) adds up: true positives plus
    misses are the true cement, plus false cement the predicted cement, each share sums to 1."""
    from models.evaluate import TEST_SEED_BASE, cement_errors, held_out_config
    from models.sim.loop import simulate

    session, meta = load_session(SHIPPED)
    seeds = range(TEST_SEED_BASE + 2, TEST_SEED_BASE + 3)
    report = cement_errors(session, meta, seeds, 512)
    rng = np.random.default_rng(seeds[0])
    loop = simulate(rng, held_out_config(rng, {}, 512))
    true_px = int(sum(np.count_nonzero(t == 2) for t in loop.labels))
    pred_px = int(sum(np.count_nonzero(segment(session, meta, f, loop.frames[0]) == 2) for f in loop.frames))
    px = report["pixels"]
    assert true_px > 0 and px["true_positive"] > 0
    assert px["true_positive"] + px["false_negative"] == true_px
    assert px["true_positive"] + px["false_positive"] == pred_px
    for key in ("false_cement_by_distance_from_true_cement", "missed_cement_by_distance_from_predicted_cement"):
        assert abs(sum(report[key].values()) - 1.0) < 0.01, report[key]
    assert abs(sum(report["false_cement_on_true_class"].values()) - 1.0) < 0.01


def test_two_channel_crops_pair_each_frame_with_an_earlier_frame_of_its_own_loop():
    """Training's reference channel: a window of the loop's first frame (mostly) or of an
    earlier frame of the same loop (service started mid-injection), never another loop's and
    never a later frame; moved by at most --reference-shift pixels (motion between the two)."""
    import torch

    from models import dataset
    from models.train import sample_crops

    REFERENCE_SHIFT_PX = 4

    per_loop = dataset.FRAMES_PER_LOOP
    n, size = 3 * per_loop, 48
    # pixel (y, x) of frame i holds i * 10000 + y * 100 + x: a crop's corner tells where it came from
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.arange(n)[:, None, None] * 10000 + yy * 100 + xx
    labels = torch.zeros(n, size, size, dtype=torch.uint8)
    labels[:, 16:32, 16:32] = 2
    gen = torch.Generator().manual_seed(0)
    firsts = moved = 0
    for _ in range(20):
        x, y = sample_crops(images, labels, 16, 16, gen, channels=2, reference_shift=REFERENCE_SHIFT_PX)
        assert x.shape == (16, 2, 16, 16) and y.shape == (16, 16, 16)
        corner = x[:, :, 0, 0].long()
        frame, ref = corner[:, 0] // 10000, corner[:, 1] // 10000
        assert torch.all(ref <= frame) and torch.all(ref // per_loop == frame // per_loop)
        dy = corner[:, 1] % 10000 // 100 - corner[:, 0] % 10000 // 100
        dx = corner[:, 1] % 100 - corner[:, 0] % 100
        assert torch.all(dy.abs() <= REFERENCE_SHIFT_PX) and torch.all(dx.abs() <= REFERENCE_SHIFT_PX)
        # one window each: the reference crop is a plain translate of the plane
        assert torch.all(x[:, 1, 1:, :] - x[:, 1, :-1, :] == 100) and torch.all(x[:, 1, :, 1:] - x[:, 1, :, :-1] == 1)
        firsts += int((ref % per_loop == 0).sum())
        moved += int(((dy != 0) | (dx != 0)).sum())
    assert 0.65 < firsts / (20 * 16) < 0.95, firsts  # mostly the first frame, not always
    assert moved > 0.5 * 20 * 16  # most references are not perfectly registered
    single, _ = sample_crops(images, labels, 16, 16, torch.Generator().manual_seed(0))
    assert single.shape == (16, 1, 16, 16)
    # the shipped recipe: no shift, and no draw for one (its batches are those of the commit that made it)
    still, _ = sample_crops(images, labels, 16, 16, torch.Generator().manual_seed(0), channels=2)
    corner = still[:, :, 0, 0].long()
    assert torch.all(corner[:, 0] % 10000 == corner[:, 1] % 10000)


def test_training_loops_spread_their_frames_over_seconds_of_breathing():
    """Ten frames per training loop cover 0.7-10 s, so a frame and its reference (the first)
    meet at any phase of breathing, as in the room; frame rates stay valid for the simulator."""
    from models.dataset import FRAMES_PER_LOOP, loop_fps

    rng = np.random.default_rng(0)
    spans = np.array([FRAMES_PER_LOOP / loop_fps(rng, FRAMES_PER_LOOP) for _ in range(2000)])
    assert spans.min() >= 0.66 and spans.max() <= 10.0 + 1e-9
    assert np.mean(spans > 4.0) > 0.4  # most loops see a whole breath (3-6 s period)


def test_frame_sets_give_each_frame_its_loops_first_frame_and_cache_whole(tmp_path):
    from models import dataset

    per_loop = dataset.FRAMES_PER_LOOP
    images = np.arange(3 * per_loop, dtype=np.float16)[:, None, None] * np.ones((1, 4, 4), np.float16)
    refs = dataset.FrameSet(images, np.zeros(images.shape, np.uint8), [0, 1, 2]).first_frames()
    assert [int(r[0, 0]) for r in refs] == [0] * per_loop + [per_loop] * per_loop + [2 * per_loop] * per_loop

    # the cache renders once, then serves the same range, or a shorter one from the same seed
    built = dataset.build_cached(range(5, 8), 32, 1, tmp_path, progress=False, shares=True)
    (cached,) = tmp_path.glob("frames_5_8_32_*.npz")
    again = dataset.build_cached(range(5, 8), 32, 1, tmp_path, progress=False, shares=True)
    shorter = dataset.build_cached(range(5, 7), 32, 1, tmp_path, progress=False, shares=True)
    assert np.array_equal(again.images, built.images) and np.array_equal(again.labels, built.labels)
    assert np.array_equal(shorter.images, built.images[: 2 * per_loop]) and len(shorter) == 2 * per_loop
    # the soft targets travel with them: shares of 255 per pixel, whose majority is the label
    assert built.shares.shape == (len(built), len(CLASS_NAMES), 32, 32)
    assert np.array_equal(again.shares, built.shares) and np.array_equal(shorter.shares, built.shares[: 2 * per_loop])
    assert np.abs(built.shares.sum(1, dtype=np.int32) - 255).max() <= 2
    assert np.mean(built.shares.argmax(1) == built.labels) > 0.99
    # without soft targets no shares are kept (4x the labels' memory), in their own cache file
    plain = dataset.build_cached(range(5, 7), 32, 1, tmp_path, progress=False)
    assert plain.shares is None and np.array_equal(plain.labels, built.labels[: 2 * per_loop])
    assert len(list(tmp_path.glob("frames_5_*.npz"))) == 2
    assert not list(tmp_path.glob("*.partial.npz"))  # no partial file left


def test_training_can_register_references_as_the_service_does():
    """--register-references: a reference crop is cut from the reference registered onto its
    frame (the service's registration), so breathing between the two is gone; the windows and
    the reference frames drawn are those of the plain recipe (no extra random draw)."""
    import cv2
    import torch

    from models import dataset
    from models.train import sample_crops

    per_loop, size = dataset.FRAMES_PER_LOOP, 64
    texture = cv2.GaussianBlur(np.random.default_rng(1).normal(0, 1, (96, 96)).astype(np.float32), (0, 0), 2)
    # breathing: frame k of a loop shows the anatomy of its first frame k px to the right, k // 2 px down
    images = torch.from_numpy(
        np.stack([texture[16 - k // 2 :][:size, 16 - k :][:, :size] for _ in range(2) for k in range(per_loop)])
    )
    labels = torch.zeros(len(images), size, size, dtype=torch.uint8)
    plain, y_plain = sample_crops(images, labels, 16, 32, torch.Generator().manual_seed(3), channels=2)
    registered, y_reg = sample_crops(
        images, labels, 16, 32, torch.Generator().manual_seed(3), channels=2, register_references=True
    )
    assert torch.equal(plain[:, 0], registered[:, 0]) and torch.equal(y_plain, y_reg)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    before = (plain[:, 1] - plain[:, 0]).abs()[inner].mean(dim=(1, 2))
    moved = before > 0.05  # the reference is another frame than the frame
    assert moved.sum() >= 8
    after = (registered[:, 1] - registered[:, 0]).abs()[inner].mean(dim=(1, 2))
    assert torch.all(after[moved] < 0.3 * before[moved]), (before, after)


def test_a_share_of_training_loops_renders_at_the_held_out_sizes():
    """--big-frames S: that share of the training seeds is rendered at 512-1024 px (the
    held-out test's sizes), the rest at 320-768 px; which seeds is fixed by the seed alone, and
    each loop's own random draws are unchanged by it."""
    from models.dataset import _loop_config, renders_big

    seeds = range(1_000_000, 1_000_800)
    assert sum(renders_big(s, 0.0) for s in seeds) == 0
    assert sum(renders_big(s, 1.0) for s in seeds) == len(seeds)
    assert 0.45 < sum(renders_big(s, 0.5) for s in seeds) / len(seeds) < 0.55
    for s in seeds[:40]:
        small = _loop_config(np.random.default_rng(s), False, False)
        big = _loop_config(np.random.default_rng(s), True, False)
        assert 320 <= small.height <= 768 and big.height in (512, 768, 1024)
        assert (big.view, big.leaks, big.bit_depth, big.jpeg) == (small.view, small.leaks, small.bit_depth, small.jpeg)


def test_soft_targets_crop_with_their_frames_and_train_the_same_loss_when_one_hot():
    """--targets soft: the crops carry each class's share of the window's pixels (the same
    windows and frames as the hard labels), and the loss on one-hot shares is the hard loss."""
    import torch
    import torch.nn.functional as F

    from models.train import cross_entropy_loss, dice_loss, sample_crops

    n, size, classes = 4, 32, len(CLASS_NAMES)
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, classes, (n, size, size), generator=gen, dtype=torch.uint8)
    one_hot = F.one_hot(labels.long(), classes).permute(0, 3, 1, 2)
    # frame i's shares: one-hot, except class 0's share carries the frame index (where it is 0)
    shares = (one_hot * 255).to(torch.uint8)
    shares[:, 0] += (torch.arange(n, dtype=torch.uint8)[:, None, None] * 10) * (labels != 0)
    images = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, size, size).contiguous()
    x, hard = sample_crops(images, labels, 8, 16, torch.Generator().manual_seed(0))
    x2, soft = sample_crops(images, labels, 8, 16, torch.Generator().manual_seed(0), shares=shares)
    assert soft.shape == (8, classes, 16, 16) and soft.dtype == torch.float32 and float(soft.max()) <= 1.0
    assert torch.equal(x, x2)  # same windows of the same frames
    fg = hard != 0
    assert torch.equal((soft[:, 1:].argmax(1) + 1)[fg], hard.long()[fg])  # same pixels of the same windows
    frame_of_crop = x[:, 0, 0, 0].long()
    offset = soft[:, 0] * 255 - 255 * (hard == 0)  # what was added to class 0 outside it
    assert torch.allclose(offset.amax((1, 2)), (frame_of_crop * 10).float() * (hard != 0).any((1, 2)), atol=1e-3)

    logits = torch.randn(8, classes, 16, 16, generator=gen)
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    exact = F.one_hot(hard.long(), classes).permute(0, 3, 1, 2).float()
    assert torch.allclose(
        cross_entropy_loss(logits, exact, weights), F.cross_entropy(logits, hard.long(), weight=weights)
    )
    assert torch.allclose(dice_loss(logits, exact), dice_loss(logits, hard))
    # a target between classes costs less with logits between them than with a confident wrong one
    half = exact.clone()
    half[:, :2] = 0.5
    half[:, 2:] = 0.0
    between = torch.zeros(8, classes, 16, 16)
    between[:, :2] = 5.0
    wrong = torch.zeros(8, classes, 16, 16)
    wrong[:, 0] = 10.0
    assert cross_entropy_loss(between, half, weights) < cross_entropy_loss(wrong, half, weights)
