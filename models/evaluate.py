"""Measure the shipped ONNX model the way the card reports it (no torch needed).

    python -m models.evaluate                       # models/segmenter.onnx, writes models/metrics.json
    python -m models.evaluate --loops 6 --quick     # a fast look
    python -m models.evaluate --model NEW.onnx --baseline models/segmenter.onnx --loops 48 --out NEW.json

Dice is computed at each held-out frame's own resolution (512-1024 px; the logits are
letterbox-cropped and resized back, as the service does), over all frames of a condition:
as drawn (random polarity, text, field of view), and with each hard condition forced:
bone-dark (inverted) and bone-bright polarity, burned-in text, a circular field of view.
Held-out loops come from a seed range that neither training nor validation used. Each
condition's Dice comes with a 95 % bootstrap interval over loops (`dice_ci95`): 16 loops
move cement Dice by about +-0.02. `--baseline OTHER.onnx` runs a second model on the same
loops and reports the paired difference with its interval (how two recipes are compared).
Latency: onnxruntime on the CPU with 2 intra-op threads, 1024 x 1024 input frames.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from guidance.segmentation.preprocess import CLASS_NAMES, LetterboxGeometry, preprocess
from guidance.segmentation.reference import RegistrationReference, register
from models.dataset import loop_fps
from models.sim.loop import LoopConfig, simulate

TEST_SEED_BASE = 7_000_000
CONDITIONS: dict[str, dict] = {
    "as_drawn": {},
    "bone_dark": {"bone_dark": True},
    "bone_bright": {"bone_dark": False},
    "text_overlay": {
        "text": [
            ("ACC 12345 L2 VERTEBROPLASTY", (20, 40), 1.2, 2),
            ("KV 78 MA 2.1 FPS 15", (20, 980), 1.0, 2),
            ("R", (900, 60), 2.0, 3),
            ("12:34:56 29-NOV-2026", (560, 980), 1.0, 2),
        ]
    },
    "circular_fov": {"fov": "centre"},
}


def load_session(path: Path, threads: int = 2) -> tuple[ort.InferenceSession, dict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["guidance"])
    return session, meta


def loop_reference(meta: dict, first_frame: np.ndarray) -> RegistrationReference | None:
    """A two-channel model's reference for a loop: its first frame, preprocessed and prepared
    for registration once, as the service keeps the first frame it saw. None for one channel."""
    if meta["input"].get("channels", 1) != 2:
        return None
    plane, _ = preprocess(first_frame, meta["input"]["size"], meta["normalization"])
    return RegistrationReference.of(plane)


def model_input(
    meta: dict, frame: np.ndarray, reference: RegistrationReference | None
) -> tuple[np.ndarray, LetterboxGeometry]:
    """The frame preprocessed as the service does; a two-channel model also gets the loop's
    reference (loop_reference) registered onto it, as the service registers its reference."""
    x, geometry = preprocess(frame, meta["input"]["size"], meta["normalization"])
    if reference is not None:
        x = np.concatenate([x, register(reference, x)[0]], axis=1)
    return x, geometry


def segment(session: ort.InferenceSession, meta: dict, frame: np.ndarray, first_frame: np.ndarray) -> np.ndarray:
    """Class map at the frame's own resolution (the loop's first frame as the reference)."""
    return segment_with(session, meta, frame, loop_reference(meta, first_frame))


def segment_with(
    session: ort.InferenceSession, meta: dict, frame: np.ndarray, reference: RegistrationReference | None
) -> np.ndarray:
    """segment() with the loop's reference prepared once (loop_reference)."""
    x, geometry = model_input(meta, frame, reference)
    logits = session.run(None, {meta["input"]["name"]: x})[0][0]
    return labels_at_frame_resolution(logits, geometry)


def planes_at_frame_resolution(logits: np.ndarray, geometry: LetterboxGeometry) -> np.ndarray:
    """Logits (C, S, S) -> (C, H, W): letterbox-cropped, each class plane resized back bilinearly."""
    size = (geometry.frame_width, geometry.frame_height)
    return np.stack([cv2.resize(p, size, interpolation=cv2.INTER_LINEAR) for p in geometry.crop(logits)])


def labels_at_frame_resolution(logits: np.ndarray, geometry: LetterboxGeometry) -> np.ndarray:
    return np.argmax(planes_at_frame_resolution(logits, geometry), axis=0).astype(np.uint8)


def held_out_config(rng: np.random.Generator, condition: dict, size: int) -> LoopConfig:
    h = int(rng.choice([512, 768, 1024])) if size == 0 else size
    w = int(rng.choice([h, h * 4 // 3 // 16 * 16]))
    forced = dict(condition)
    if forced.get("fov") == "centre":
        forced["fov"] = (w / 2, h / 2, min(h, w) * float(rng.uniform(0.42, 0.5)))
    if "text" in forced:  # scale the overlay to the frame
        forced["text"] = [
            (t, (int(x * w / 1024), int(y * h / 1024)), s * w / 1024, th) for t, (x, y), s, th in forced["text"]
        ]
    leaks = [frozenset(), frozenset({"posterior"}), frozenset({"venous"}), frozenset({"posterior", "venous"})]
    return LoopConfig(
        height=h,
        width=w,
        frames=8,
        fps=loop_fps(rng, 8),  # 8 frames over 0.7-10 s: references at any phase of breathing
        leaks=leaks[int(rng.integers(0, 4))],
        view=str(rng.choice(["lateral", "ap"], p=[0.75, 0.25])),
        bit_depth=int(rng.choice([8, 12, 16])),
        jpeg=bool(rng.random() < 0.4),
        imaging=forced,
    )


def held_out_frames(meta: dict, condition: dict, seeds: range, size: int):
    """Every frame of the held-out loops of `seeds` under `condition`, as (the loop's position
    in `seeds`, frame, true class map, the loop's reference: its first frame, prepared once)."""
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        loop = simulate(rng, held_out_config(rng, condition, size))
        reference = loop_reference(meta, loop.frames[0])
        for frame, truth in zip(loop.frames, loop.labels, strict=True):
            yield i, frame, truth, reference


def dice_counts(session, meta, condition: dict, seeds: range, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out loop and class: overlap |P & T| and |P| + |T| over the loop's frames
    (arrays of shape loops x classes; background's column is left 0)."""
    inter = np.zeros((len(seeds), len(CLASS_NAMES)))
    total = np.zeros((len(seeds), len(CLASS_NAMES)))
    for i, frame, truth, reference in held_out_frames(meta, condition, seeds, size):
        pred = segment_with(session, meta, frame, reference)
        for c in range(1, len(CLASS_NAMES)):
            p, t = pred == c, truth == c
            inter[i, c] += np.count_nonzero(p & t)
            total[i, c] += np.count_nonzero(p) + np.count_nonzero(t)
    return inter, total


def pooled_dice(inter: np.ndarray, total: np.ndarray) -> dict[str, float | None]:
    """Dice over all frames of all loops pooled (2 sum|P & T| / sum(|P| + |T|)), per class."""
    i, t = inter.sum(axis=0), total.sum(axis=0)
    return {CLASS_NAMES[c]: round(float(2 * i[c] / t[c]), 4) if t[c] else None for c in range(1, len(CLASS_NAMES))}


def _loop_resamples(loops: int, draws: int, seed: int) -> np.ndarray:
    """draws x loops indices: whole loops drawn with replacement (a loop's frames are not
    independent of each other). Fixed seed, so the same counts give the same interval."""
    return np.random.default_rng(seed).integers(0, loops, size=(draws, loops))


def _resampled_dice(inter: np.ndarray, total: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """draws x classes pooled Dice of each resample (nan where a class has no pixel)."""
    i, t = inter[picks].sum(axis=1), total[picks].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(t > 0, 2 * i / np.maximum(t, 1), np.nan)


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    return [round(float(q), 4) for q in np.percentile(values, [2.5, 97.5])] if values.size else None


def dice_ci95(inter: np.ndarray, total: np.ndarray, draws: int = 2000, seed: int = 0) -> dict[str, list | None]:
    """95 % percentile-bootstrap interval of the pooled Dice, resampling whole loops: how far
    a set of this many loops can move the number."""
    d = _resampled_dice(inter, total, _loop_resamples(len(inter), draws, seed))
    return {CLASS_NAMES[c]: _interval(d[:, c]) for c in range(1, len(CLASS_NAMES))}


def paired_difference(
    model: tuple[np.ndarray, np.ndarray], baseline: tuple[np.ndarray, np.ndarray], draws: int = 2000, seed: int = 0
) -> dict[str, dict | None]:
    """Model minus baseline, both run on the same loops: the pooled Dice difference per class
    and its 95 % interval from resampling the same loops for both (each loop is the same scene
    for the two models, so their difference varies far less than either Dice)."""
    picks = _loop_resamples(len(model[0]), draws, seed)
    diff = _resampled_dice(*model, picks) - _resampled_dice(*baseline, picks)
    a, b = pooled_dice(*model), pooled_dice(*baseline)
    out: dict[str, dict | None] = {}
    for c in range(1, len(CLASS_NAMES)):
        name = CLASS_NAMES[c]
        if a[name] is None or b[name] is None:
            out[name] = None
            continue
        out[name] = {
            "model": a[name],
            "baseline": b[name],
            "difference": round(a[name] - b[name], 4),
            "ci95": _interval(diff[:, c]),
        }
    return out


ERROR_BANDS_PX = (2, 5, 15, 50)  # distance from the other mask, in pixels of a 1024 px frame


def cement_errors(session, meta, seeds: range, size: int) -> dict:
    """Where cement goes wrong (as-drawn frames): false cement by distance from the true
    cement and by the true class under it, missed cement by distance from the predicted
    cement. Boundary errors sit within a few pixels; look-alikes lie far away."""
    edges = (0, *ERROR_BANDS_PX, np.inf)
    fp_by_distance = np.zeros(len(edges) - 1)
    fn_by_distance = np.zeros(len(edges) - 1)
    fp_on_class = np.zeros(len(CLASS_NAMES))
    true_positive = 0
    for _, frame, truth, reference in held_out_frames(meta, {}, seeds, size):
        pred = segment_with(session, meta, frame, reference) == 2
        true = truth == 2
        to_1024 = 1024 / max(truth.shape)
        if true.any():
            away_from_truth = cv2.distanceTransform((~true).view(np.uint8), cv2.DIST_L2, 3) * to_1024
        else:
            away_from_truth = np.full(truth.shape, np.inf, np.float32)
        if pred.any():
            away_from_pred = cv2.distanceTransform((~pred).view(np.uint8), cv2.DIST_L2, 3) * to_1024
        else:
            away_from_pred = np.full(truth.shape, np.inf, np.float32)
        false_pos, false_neg = pred & ~true, true & ~pred
        fp_by_distance += np.histogram(away_from_truth[false_pos], edges)[0]
        fn_by_distance += np.histogram(away_from_pred[false_neg], edges)[0]
        fp_on_class += np.bincount(truth[false_pos], minlength=len(CLASS_NAMES))
        true_positive += int(np.count_nonzero(pred & true))
    bands = [f"<{b} px" for b in ERROR_BANDS_PX] + [f">={ERROR_BANDS_PX[-1]} px"]
    share = lambda v: {b: round(float(x / max(v.sum(), 1)), 3) for b, x in zip(bands, v, strict=True)}  # noqa: E731
    fp, fn = float(fp_by_distance.sum()), float(fn_by_distance.sum())
    return {
        "pixels": {"true_positive": true_positive, "false_positive": int(fp), "false_negative": int(fn)},
        "precision": round(true_positive / max(true_positive + fp, 1), 4),
        "recall": round(true_positive / max(true_positive + fn, 1), 4),
        "false_cement_by_distance_from_true_cement": share(fp_by_distance),
        "false_cement_on_true_class": {
            CLASS_NAMES[c]: round(float(fp_on_class[c] / max(fp, 1)), 3) for c in range(len(CLASS_NAMES)) if c != 2
        },
        "missed_cement_by_distance_from_predicted_cement": share(fn_by_distance),
    }


def latency(session, meta, runs: int = 200) -> dict[str, float]:
    rng = np.random.default_rng(0)
    loop = simulate(rng, LoopConfig(height=1024, width=1024, frames=4, leaks=frozenset({"posterior"})))
    frame = loop.frames[-1]
    name = meta["input"]["name"]
    reference = loop_reference(meta, loop.frames[0])
    x, _ = model_input(meta, frame, reference)
    for _ in range(20):  # warm-up, not measured
        session.run(None, {name: x})
    model_ms, pre_ms = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        x, _ = model_input(meta, frame, reference)  # the reference prepared once, as the service does
        t1 = time.perf_counter()
        session.run(None, {name: x})
        t2 = time.perf_counter()
        pre_ms.append((t1 - t0) * 1e3)
        model_ms.append((t2 - t1) * 1e3)
    pct = lambda v, q: round(float(np.percentile(v, q)), 2)  # noqa: E731
    return {
        "model_p50_ms": pct(model_ms, 50),
        "model_p99_ms": pct(model_ms, 99),
        "preprocess_1024_p50_ms": pct(pre_ms, 50),
        "preprocess_1024_p99_ms": pct(pre_ms, 99),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, default=Path(__file__).with_name("segmenter.onnx"))
    p.add_argument("--loops", type=int, default=24, help="held-out loops per condition (8 frames each)")
    p.add_argument("--size", type=int, default=0, help="frame height; 0: random of 512, 768, 1024")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="default: metrics.json beside the model")
    p.add_argument("--quick", action="store_true", help="as-drawn condition only, fewer latency runs")
    p.add_argument("--errors", action="store_true", help="also break the cement errors down (as-drawn frames)")
    p.add_argument(
        "--latency-only", action="store_true", help="re-measure latency only, into the existing metrics file"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another model run on the same loops: paired Dice differences with 95 %% intervals",
    )
    args = p.parse_args(argv)
    if not args.model.is_file():
        print(f"models.evaluate: error: model file {args.model} not found", file=sys.stderr)
        return 2
    if args.baseline is not None and not args.baseline.is_file():
        print(f"models.evaluate: error: baseline model file {args.baseline} not found", file=sys.stderr)
        return 2
    session, meta = load_session(args.model, args.threads)
    baseline = load_session(args.baseline, args.threads) if args.baseline and not args.latency_only else None
    results: dict = {
        "model": args.model.name,
        "version": meta.get("version"),
        "parameters": meta.get("parameters"),
        "flops": 2 * int(meta.get("macs", 0)),
        "input_size": meta["input"]["size"],
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "held_out_seeds": [TEST_SEED_BASE, TEST_SEED_BASE + args.loops],
        "dice": {},
        "dice_ci95": {},
    }
    out = args.out or args.model.with_name("metrics.json")
    if args.latency_only and out.is_file():
        machine = results["machine"]
        results = json.loads(out.read_text())
        results["machine"] = machine  # the latency below is measured with these threads
    conditions = {} if args.latency_only else {"as_drawn": CONDITIONS["as_drawn"]} if args.quick else CONDITIONS
    for name, condition in conditions.items():
        t0 = time.monotonic()
        seeds = range(TEST_SEED_BASE, TEST_SEED_BASE + args.loops)
        counts = dice_counts(session, meta, condition, seeds, args.size)
        results["dice"][name] = pooled_dice(*counts)
        results["dice_ci95"][name] = dice_ci95(*counts)
        print(
            f"{name:>13}: {json.dumps(results['dice'][name])}  95 % CI over loops "
            f"{json.dumps(results['dice_ci95'][name])}  ({time.monotonic() - t0:.0f} s)",
            flush=True,
        )
        if baseline is not None:
            paired = paired_difference(counts, dice_counts(*baseline, condition, seeds, args.size))
            results.setdefault("paired_with_baseline", {"baseline": args.baseline.name})[name] = paired
            print(
                f"{'':>13}  minus {args.baseline.name}: "
                + ", ".join(f"{k} {v['difference']:+.4f} {v['ci95']}" for k, v in paired.items() if v is not None),
                flush=True,
            )
    if args.errors:
        t0 = time.monotonic()
        seeds = range(TEST_SEED_BASE, TEST_SEED_BASE + args.loops)
        results["cement_errors"] = cement_errors(session, meta, seeds, args.size)
        print(f"cement errors: {json.dumps(results['cement_errors'])}  ({time.monotonic() - t0:.0f} s)", flush=True)
    results["latency"] = latency(session, meta, runs=50 if args.quick else 300)
    print(f"latency ({args.threads} threads): {json.dumps(results['latency'])}")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
