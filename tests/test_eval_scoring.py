"""Scoring per recorded-loops.md, on hand-made alert lists and labels (pure functions)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance.evaluation.labels import Event
from guidance.evaluation.scoring import (
    AlertRaise,
    DiceCounter,
    aggregate_detection,
    detection_window_frames,
    false_alerts,
    labels_at_mask_resolution,
    raises_from_messages,
    score_events,
    score_loop,
)

P, V = "posterior", "venous"


def raise_(kind: str, frame: int) -> AlertRaise:
    return AlertRaise(kind, frame)


@pytest.mark.parametrize(("fps", "window"), [(15.0, 15), (30.0, 30), (7.5, 8), (29.97, 30), (1.0, 1)])
def test_window_is_ceil_of_one_second(fps, window):
    assert detection_window_frames(fps) == window


def test_alert_exactly_at_onset_is_detected_with_zero_delay():
    [row] = score_events([Event(P, 40)], [raise_(P, 40)], 15.0)
    assert row["detected"] and row["detect_frame"] == 40
    assert row["delay_frames"] == 0 and row["delay_ms"] == 0.0


def test_alert_at_onset_plus_window_is_detected_one_later_is_missed():
    [hit] = score_events([Event(P, 40)], [raise_(P, 55)], 15.0)
    assert hit["detected"] and hit["delay_frames"] == 15
    assert hit["delay_ms"] == pytest.approx(1000.0)
    [miss] = score_events([Event(P, 40)], [raise_(P, 56)], 15.0)
    assert not miss["detected"] and miss["delay_frames"] is None and miss["window_end_frame"] == 55


def test_alert_one_frame_before_onset_misses_and_is_false():
    events = [Event(V, 20)]
    raises = [raise_(V, 19)]
    [row] = score_events(events, raises, 15.0)
    assert not row["detected"]
    assert false_alerts(events, raises) == [{"kind": V, "frame": 19, "reason": "before the onset"}]


def test_alert_of_the_other_kind_neither_detects_nor_counts_as_true():
    events = [Event(P, 10)]
    raises = [raise_(V, 11)]
    assert not score_events(events, raises, 15.0)[0]["detected"]
    assert false_alerts(events, raises) == [{"kind": V, "frame": 11, "reason": "no event of this kind"}]


def test_no_events_every_raise_is_false_and_rate_is_per_minute():
    raises = [raise_(P, 5), raise_(V, 100), raise_(P, 200)]
    s = score_loop([], raises, fps=15.0, n_frames=450)  # 30 s of fluoroscopy
    assert s["events"] == []
    assert s["false_alerts_total"] == 3
    assert s["false_alerts_per_min"] == pytest.approx(6.0)
    assert s["per_kind"][P]["false_alerts"] == 2 and s["per_kind"][V]["false_alerts"] == 1
    assert s["per_kind"][P]["false_alerts_per_min"] == pytest.approx(4.0)


def test_clean_loop_without_raises_scores_zero_false_alerts():
    s = score_loop([], [], fps=15.0, n_frames=150)
    assert s["false_alerts_per_min"] == 0.0 and s["minutes"] == pytest.approx(1 / 6)


def test_two_events_of_the_same_kind_scored_separately():
    events = [Event(V, 10), Event(V, 60)]
    # the first raise detects the first event only; a raise between them (after an onset) is
    # not false; the second event is detected by the raise at 62
    raises = [raise_(V, 12), raise_(V, 40), raise_(V, 62)]
    rows = score_events(events, raises, 15.0)
    assert [r["detect_frame"] for r in rows] == [12, 62]
    assert [r["delay_frames"] for r in rows] == [2, 2]
    assert false_alerts(events, raises) == []


def test_second_event_without_its_own_raise_is_missed():
    events = [Event(V, 10), Event(V, 60)]
    rows = score_events(events, [raise_(V, 12)], 15.0)
    assert [r["detected"] for r in rows] == [True, False]


def test_multiple_raises_in_the_window_first_one_gives_the_delay():
    events = [Event(P, 30)]
    raises = [raise_(P, 25), raise_(P, 33), raise_(P, 31), raise_(P, 40)]
    [row] = score_events(events, raises, 30.0)
    assert row["detect_frame"] == 31 and row["delay_frames"] == 1
    assert row["delay_ms"] == pytest.approx(1000 / 30)
    assert false_alerts(events, raises) == [{"kind": P, "frame": 25, "reason": "before the onset"}]


def test_raises_from_protocol_messages_keep_only_clinical_raises():
    msgs = [
        {"type": "status", "frame": 1},
        {"type": "alert", "kind": "posterior_leak", "state": "raised", "frame": 3, "alert_id": "s:1"},
        {"type": "alert", "kind": "posterior_leak", "state": "cleared", "frame": 9, "alert_id": "s:1"},
        {"type": "alert", "kind": "frame_error", "state": "raised", "frame": 4, "alert_id": "s:2"},
        {"type": "alert", "kind": "venous_leak", "state": "raised", "frame": 12, "alert_id": "s:3"},
    ]
    assert raises_from_messages(msgs) == [AlertRaise(P, 3, "s:1"), AlertRaise(V, 12, "s:3")]


def test_aggregate_pools_events_and_minutes_over_loops():
    a = score_loop([Event(P, 10), Event(V, 50)], [raise_(P, 12), raise_(V, 20)], 15.0, 900)
    b = score_loop([Event(P, 5)], [raise_(P, 9)], 15.0, 900)
    c = score_loop([], [raise_(V, 3)], 15.0, 900)
    agg = aggregate_detection([a, b, c])
    assert agg["minutes"] == pytest.approx(3.0)
    p = agg["per_kind"][P]
    assert (p["events"], p["detected"], p["sensitivity"]) == (2, 2, 1.0)
    assert p["delay_frames_median"] == pytest.approx(3.0)
    assert p["delay_frames_p90"] == pytest.approx(2 + 0.9 * 2)
    v = agg["per_kind"][V]
    assert (v["events"], v["detected"], v["sensitivity"]) == (1, 0, 0.0)
    assert v["delay_ms_median"] is None
    assert v["false_alerts"] == 2 and v["false_alerts_per_min"] == pytest.approx(2 / 3)
    assert agg["overall"]["sensitivity"] == pytest.approx(2 / 3)
    assert agg["overall"]["false_alerts_per_min"] == pytest.approx(2 / 3)


def test_aggregate_without_events_leaves_sensitivity_undefined():
    agg = aggregate_detection([score_loop([], [], 15.0, 150)])
    assert agg["overall"]["sensitivity"] is None and agg["overall"]["false_alerts"] == 0


def test_dice_pooled_per_class():
    truth = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros((2, 4, 4), np.uint8)
    truth[0, :2, :2] = 2  # 4 cement px
    pred[0, :2, :1] = 2  # 2 px, both correct
    truth[1, 3, 3] = 3
    pred[1, 0, 0] = 3  # needle wrong
    pred[1, 2:, 2:] = 1  # body predicted, absent in truth
    d = DiceCounter()
    for i in range(2):
        d.add(pred[i], truth[i])
    dice = d.dice()
    assert dice["cement"] == pytest.approx(2 * 2 / (2 + 4))
    assert dice["needle"] == 0.0
    assert dice["vertebral_body"] == 0.0
    empty = DiceCounter()
    empty.add(np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8))
    assert empty.dice() == {"vertebral_body": None, "cement": None, "needle": None}
    merged = DiceCounter()
    merged.add_counts(d.counts())
    assert merged.dice() == dice


def test_model_resolution_map_is_compared_at_mask_resolution():
    # 2x upsampling by nearest neighbour keeps classes and doubles each pixel
    small = np.array([[0, 2], [3, 1]], np.uint8)
    big = labels_at_mask_resolution(small, 4, 4)
    assert big.dtype == np.uint8 and big.shape == (4, 4)
    assert (big[:2, 2:] == 2).all() and (big[2:, :2] == 3).all()
    assert set(np.unique(big)) <= {0, 1, 2, 3}
    assert math.isclose(float((big == 2).mean()), 0.25)


@pytest.mark.parametrize(
    ("small", "big"),
    [
        ((256, 256), (1024, 1024)),
        ((128, 96), (256, 192)),
        ((64, 64), (512, 512)),
        ((90, 120), (270, 360)),
        ((70, 70), (100, 100)),
    ],
)
def test_mask_resolution_fast_paths_match_opencv_nearest(small, big):
    # factors 2, 4, 8 take the word-repeat path; 3 and non-integer ones cv2.resize: the same
    # pixels either way, and add_model_plane pools the same counts as add() on the upscaled map
    rng = np.random.default_rng(sum(small))
    labels = rng.integers(0, 4, small, dtype=np.uint8)
    truth = rng.integers(0, 4, big, dtype=np.uint8)
    up = labels_at_mask_resolution(labels, *big)
    assert np.array_equal(up, cv2.resize(labels, big[::-1], interpolation=cv2.INTER_NEAREST))
    truth[: big[0] // 2] = 0  # mostly one class, as real masks are
    plain, fast = DiceCounter(), DiceCounter()
    plain.add(up, truth)
    fast.add_model_plane(labels, truth)
    assert plain.counts() == fast.counts()
    expected = {
        "frames": 1,
        "intersection": [int(np.count_nonzero((up == c) & (truth == c))) for c in range(4)],
        "predicted": [int(np.count_nonzero(up == c)) for c in range(4)],
        "truth": [int(np.count_nonzero(truth == c)) for c in range(4)],
    }
    assert fast.counts() == expected


# ---- properties over random alert lists -----------------------------------------------

kinds = st.sampled_from([P, V])


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.builds(Event, kinds, st.integers(0, 300)), max_size=4),
    raises=st.lists(st.builds(AlertRaise, kinds, st.integers(0, 400)), max_size=8),
    fps=st.sampled_from([7.5, 15.0, 25.0, 30.0]),
)
def test_scoring_invariants(events, raises, fps):
    window = detection_window_frames(fps)
    rows = score_events(events, raises, fps)
    assert len(rows) == len(events)
    for ev, row in zip(events, rows, strict=True):
        in_window = [
            r.frame for r in raises if r.kind == ev.kind and ev.onset_frame <= r.frame <= ev.onset_frame + window
        ]
        assert row["detected"] == bool(in_window)
        if in_window:
            assert row["detect_frame"] == min(in_window)
            assert 0 <= row["delay_frames"] <= window
            assert row["delay_ms"] == pytest.approx(row["delay_frames"] / fps * 1000)
    fa = false_alerts(events, raises)
    # a raise is false exactly when no event of its kind started at or before it
    expected_false = [r for r in raises if not any(e.kind == r.kind and e.onset_frame <= r.frame for e in events)]
    assert [(a["kind"], a["frame"]) for a in fa] == [(r.kind, r.frame) for r in expected_false]
    # a raise that detects an event is never a false alert
    detecting = {(row["kind"], row["detect_frame"]) for row in rows if row["detected"]}
    assert not detecting & {(a["kind"], a["frame"]) for a in fa}


def test_wilson_interval():
    from guidance.evaluation.scoring import wilson_interval

    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    lo, hi = wilson_interval(0, 4)
    assert lo == 0.0 and hi == pytest.approx(0.4899, abs=1e-3)


def test_false_alert_rate_interval_is_the_exact_poisson_one():
    """Garwood's exact 95 % limits for a Poisson count, as tabulated (e.g. Ulm 1990): 0 -> [0,
    3.689], 1 -> [0.0253, 5.572], 3 -> [0.619, 8.767], 10 -> [4.795, 18.390]; per minute here."""
    from guidance.evaluation.scoring import poisson_rate_interval

    assert poisson_rate_interval(2, 0.0) is None
    assert poisson_rate_interval(0, 1.0) == [0.0, pytest.approx(3.689, abs=1e-3)]
    assert poisson_rate_interval(1, 1.0) == [pytest.approx(0.0253, abs=1e-4), pytest.approx(5.572, abs=1e-3)]
    assert poisson_rate_interval(3, 10.0) == [pytest.approx(0.0619, abs=1e-4), pytest.approx(0.8767, abs=1e-4)]
    assert poisson_rate_interval(10, 2.0) == [pytest.approx(4.795 / 2, abs=1e-3), pytest.approx(18.390 / 2, abs=1e-3)]
    low, high = poisson_rate_interval(400, 100.0)  # many events: about rate +- 1.96 sqrt(rate / minutes)
    assert low == pytest.approx(4 - 1.96 * 0.2, abs=0.02) and high == pytest.approx(4 + 1.96 * 0.2, abs=0.03)
