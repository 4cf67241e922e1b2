"""Scoring, exactly as /work/shared/spec/recorded-loops.md says. Pure: no I/O, no clocks.

- An event is detected when an alert of its kind is raised at a frame f with
  onset <= f <= onset + ceil(1.0 s * fps); its delay is f - onset frames (the first such raise).
- A raised alert is false when its kind has no event in the loop, or when it is raised before
  the onset of every event of its kind (i.e. before the earliest one). A raise after an onset
  is not false even outside the detection window: the leak it reports is real.
- False alerts are counted per minute of fluoroscopy (frames / fps / 60).
- Dice per class is pooled over all frames that have masks: 2*sum|P&T| / (sum|P| + sum|T|).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from guidance.evaluation.labels import EVENT_KINDS, Event

# protocol alert kind -> labelled event kind (docs/protocol.md)
ALERT_KIND_TO_EVENT: dict[str, str] = {"posterior_leak": "posterior", "venous_leak": "venous"}
DETECTION_WINDOW_S = 1.0
DICE_CLASSES: dict[int, str] = {1: "vertebral_body", 2: "cement", 3: "needle"}


@dataclass(frozen=True)
class AlertRaise:
    kind: str  # labelled-event kind: "posterior" | "venous"
    frame: int
    alert_id: str | None = None


def raises_from_messages(messages: Iterable[Mapping]) -> list[AlertRaise]:
    """Clinical alert raises among published protocol messages, in publishing order."""
    out = []
    for msg in messages:
        if msg.get("type") != "alert" or msg.get("state") != "raised":
            continue
        kind = ALERT_KIND_TO_EVENT.get(msg.get("kind", ""))
        if kind is None or msg.get("frame") is None:
            continue  # technical alerts are reported, not scored
        out.append(AlertRaise(kind, int(msg["frame"]), msg.get("alert_id")))
    return out


def detection_window_frames(fps: float) -> int:
    """ceil(1.0 s * fps) frames after the onset (inclusive bound)."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    # rounded to 1e-6 first so that a rate derived from a frame time (1000/66.666667 ms) that
    # lands a hair above an integer does not widen the window by a whole frame
    return math.ceil(round(DETECTION_WINDOW_S * fps, 6))


def score_events(events: Sequence[Event], raises: Sequence[AlertRaise], fps: float) -> list[dict]:
    """One row per labelled event: detected, by which raise, delay in frames and ms."""
    window = detection_window_frames(fps)
    rows = []
    for ev in events:
        hits = sorted(
            r.frame for r in raises if r.kind == ev.kind and ev.onset_frame <= r.frame <= ev.onset_frame + window
        )
        f = hits[0] if hits else None
        rows.append(
            {
                "kind": ev.kind,
                "onset_frame": ev.onset_frame,
                "window_end_frame": ev.onset_frame + window,
                "detected": f is not None,
                "detect_frame": f,
                "delay_frames": None if f is None else f - ev.onset_frame,
                "delay_ms": None if f is None else (f - ev.onset_frame) / fps * 1000.0,
            }
        )
    return rows


def false_alerts(events: Sequence[Event], raises: Sequence[AlertRaise]) -> list[dict]:
    """Raises of a kind without an event, or before the (earliest) onset of that kind."""
    first_onset: dict[str, int] = {}
    for ev in events:
        first_onset[ev.kind] = min(ev.onset_frame, first_onset.get(ev.kind, ev.onset_frame))
    rows = []
    for r in raises:
        if r.kind not in first_onset:
            rows.append({"kind": r.kind, "frame": r.frame, "reason": "no event of this kind"})
        elif r.frame < first_onset[r.kind]:
            rows.append({"kind": r.kind, "frame": r.frame, "reason": "before the onset"})
    return rows


def minutes(n_frames: int, fps: float) -> float:
    return n_frames / fps / 60.0


def rate_per_minute(count: int, n_minutes: float) -> float | None:
    return count / n_minutes if n_minutes > 0 else None


def score_loop(events: Sequence[Event], raises: Sequence[AlertRaise], fps: float, n_frames: int) -> dict:
    """Everything the spec scores for one loop, except Dice (see DiceCounter)."""
    ev_rows = score_events(events, raises, fps)
    fa_rows = false_alerts(events, raises)
    mins = minutes(n_frames, fps)
    per_kind = {}
    for kind in EVENT_KINDS:
        ev_k = [e for e in ev_rows if e["kind"] == kind]
        fa_k = [a for a in fa_rows if a["kind"] == kind]
        per_kind[kind] = {
            "events": len(ev_k),
            "detected": sum(e["detected"] for e in ev_k),
            "raises": sum(r.kind == kind for r in raises),
            "false_alerts": len(fa_k),
            "false_alerts_per_min": rate_per_minute(len(fa_k), mins),
        }
    return {
        "minutes": mins,
        "events": ev_rows,
        "false_alerts": fa_rows,
        "per_kind": per_kind,
        "false_alerts_total": len(fa_rows),
        "false_alerts_per_min": rate_per_minute(len(fa_rows), mins),
    }


# ---- segmentation ----------------------------------------------------------------------


# an integer factor of 2, 4 or 8 -> the unsigned type that holds that many uint8 pixels
_REPEAT_WORD = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def labels_at_mask_resolution(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Model-resolution class map (already cropped to the frame area of the letterbox)
    -> mask resolution, nearest neighbour (class ids must not be blended).

    For the usual case (1024 -> 256 -> 1024: both sides a factor 2, 4 or 8) each class id is
    repeated by a multiply into one machine word of f copies, and rows by np.repeat: the same
    pixels as cv2.resize(INTER_NEAREST), ~10x faster, which matters once per scored frame."""
    h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    f = height // h
    word = _REPEAT_WORD.get(f)
    if word is None or (height, width) != (h * f, w * f) or labels.dtype != np.uint8:
        return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
    ones = int.from_bytes(b"\x01" * f, "little")  # 0x0101...: f copies of a byte
    wide = (labels.astype(word) * word(ones)).view(np.uint8).reshape(h, 1, w * f)
    return np.repeat(wide, f, axis=1).reshape(height, width)


class DiceCounter:
    """Pooled Dice per class: intersection and sizes summed over frames."""

    def __init__(self) -> None:
        self.inter = np.zeros(4, dtype=np.int64)
        self.pred = np.zeros(4, dtype=np.int64)
        self.truth = np.zeros(4, dtype=np.int64)
        self.frames = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {pred.shape} and mask {truth.shape} differ")
        self._count(pred.astype(np.uint8, copy=False) << 2, truth.astype(np.uint8, copy=False))

    def add_model_plane(self, labels: np.ndarray, truth: np.ndarray) -> None:
        """add() for a model-resolution class map scored at the mask's resolution: the shift
        by 2 is done on the small plane, before the nearest-neighbour upscale, and when the
        upscale is by a whole factor each model pixel's count is simply f * f mask pixels."""
        small = labels.astype(np.uint8, copy=False)
        h, w = small.shape
        f = truth.shape[0] // h if h else 0
        pred_counts = None
        if f and truth.shape == (h * f, w * f):
            pred_counts = np.bincount(small.ravel(), minlength=4)[:4].astype(np.int64) * f * f
        pred4 = labels_at_mask_resolution(small << 2, *truth.shape)
        self._count(pred4, truth.astype(np.uint8, copy=False), pred_counts)

    def _count(self, pred4: np.ndarray, truth: np.ndarray, pred_counts: np.ndarray | None = None) -> None:
        """One frame's intersection and sizes per class, from pred * 4 and the mask (classes
        0..3: masks are validated, predictions come from a 4-class argmax).

        Counted by comparisons (vectorised) rather than a 16-bin histogram of pred * 4 + truth:
        a histogram of a frame that is mostly one value increments one counter a million times
        in a row, and that dependency made cv2.calcHist take ~3 ms at 1024x1024 on real masks
        (0.4 ms on noise). Class 0's counts are what the others leave."""
        total = truth.size
        code = cv2.add(pred4, truth)  # pred * 4 + truth: 5c where both say class c

        def count(plane: np.ndarray, value: int) -> int:
            return cv2.countNonZero(cv2.compare(plane, value, cv2.CMP_EQ))

        inter = [total - cv2.countNonZero(code)] + [count(code, 5 * c) for c in (1, 2, 3)]
        truth_n = [count(truth, c) for c in (1, 2, 3)]
        if pred_counts is None:
            pred_n = [count(pred4, 4 * c) for c in (1, 2, 3)]
            pred_counts = np.array([total - sum(pred_n), *pred_n], np.int64)
        self.inter += np.array(inter, np.int64)
        self.pred += pred_counts
        self.truth += np.array([total - sum(truth_n), *truth_n], np.int64)
        self.frames += 1

    def add_counts(self, counts: Mapping) -> None:
        self.inter += np.asarray(counts["intersection"], dtype=np.int64)
        self.pred += np.asarray(counts["predicted"], dtype=np.int64)
        self.truth += np.asarray(counts["truth"], dtype=np.int64)
        self.frames += int(counts["frames"])

    def counts(self) -> dict:
        return {
            "frames": self.frames,
            "intersection": self.inter.tolist(),
            "predicted": self.pred.tolist(),
            "truth": self.truth.tolist(),
        }

    def dice(self) -> dict[str, float | None]:
        """None for a class absent from both prediction and truth (Dice undefined)."""
        out: dict[str, float | None] = {}
        for cls, name in DICE_CLASSES.items():
            denom = int(self.pred[cls] + self.truth[cls])
            out[name] = None if denom == 0 or self.frames == 0 else 2.0 * int(self.inter[cls]) / denom
        return out


# ---- aggregation over loops ------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """numpy's default (linear interpolation) percentile; None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> list[float] | None:
    """95 % Wilson score interval of a proportion (sensitivity over few events needs one)."""
    if trials == 0:
        return None
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _poisson_cdf(k: int, mean: float) -> float:
    """P(X <= k) for X ~ Poisson(mean), summed in log space (no overflow for large k)."""
    if mean <= 0:
        return 1.0
    logs = [-mean + i * math.log(mean) - math.lgamma(i + 1) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def poisson_rate_interval(count: int, n_minutes: float, alpha: float = 0.05) -> list[float] | None:
    """Exact (Garwood) 95 % interval of an event rate per minute from `count` events seen in
    `n_minutes`: 3 false alerts in 10 minutes is a rate between 0.06 and 0.88 per minute."""
    if n_minutes <= 0:
        return None

    def solve(target: float, k: int) -> float:
        # the mean at which P(X <= k) == target (the CDF falls as the mean grows)
        lo, hi = 0.0, max(10.0, 4.0 * (k + 1))
        while _poisson_cdf(k, hi) > target:
            hi *= 2
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _poisson_cdf(k, mid) > target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if count == 0 else solve(1 - alpha / 2, count - 1)
    upper = solve(alpha / 2, count)
    return [lower / n_minutes, upper / n_minutes]


def aggregate_detection(loop_scores: Sequence[dict]) -> dict:
    """Per kind over scored loops: sensitivity, delays, false alerts per minute; and overall."""
    total_minutes = sum(s["minutes"] for s in loop_scores)
    out: dict = {"per_kind": {}}
    all_events = [e for s in loop_scores for e in s["events"]]
    for kind in (*EVENT_KINDS, None):
        evs = [e for e in all_events if kind is None or e["kind"] == kind]
        hits = [e for e in evs if e["detected"]]
        fa = sum(s["per_kind"][kind]["false_alerts"] if kind else s["false_alerts_total"] for s in loop_scores)
        row = {
            "events": len(evs),
            "detected": len(hits),
            "sensitivity": len(hits) / len(evs) if evs else None,
            "sensitivity_ci95": wilson_interval(len(hits), len(evs)),
            "delay_frames_median": percentile([e["delay_frames"] for e in hits], 50),
            "delay_frames_p90": percentile([e["delay_frames"] for e in hits], 90),
            "delay_ms_median": percentile([e["delay_ms"] for e in hits], 50),
            "delay_ms_p90": percentile([e["delay_ms"] for e in hits], 90),
            "false_alerts": fa,
            "false_alerts_per_min": rate_per_minute(fa, total_minutes),
            "false_alerts_per_min_ci95": poisson_rate_interval(fa, total_minutes),
        }
        if kind is None:
            out["overall"] = row
        else:
            out["per_kind"][kind] = row
    out["minutes"] = total_minutes
    return out
