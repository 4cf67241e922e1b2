"""The pure tracker, frame by frame on synthetic class maps (no model, no files, no clock)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from guidance.segmentation.preprocess import (
    CEMENT,
    NEEDLE,
    VERTEBRAL_BODY,
    LetterboxGeometry,
    letterbox_labels,
)
from guidance.tracking import TrackerConfig, TrackerState, TrackGeometry, track
from guidance.tracking import tracker as tracker_module

H, W = 64, 64
BODY = (16, 44, 16, 40)  # y0, y1, x0, x1: posterior wall at x = 39 (image right)


def scene(posterior_px: int = 0, venous_px: int = 0, needle: bool = True, side: str = "right") -> np.ndarray:
    """A lateral class map: body, cement inside it, a needle entering from `side`, and square
    leaks of the given edge lengths behind the wall / in front of the anterior wall."""
    labels = np.zeros((H, W), np.uint8)
    y0, y1, x0, x1 = BODY
    labels[y0:y1, x0:x1] = VERTEBRAL_BODY
    labels[26:34, 24:32] = CEMENT
    if needle:
        cols = slice(30, W) if side == "right" else slice(0, 26)
        labels[36:38, cols] = NEEDLE
    if posterior_px:
        wall_out = x1 + 2 if side == "right" else x0 - 2 - posterior_px
        labels[18 : 18 + posterior_px, wall_out : wall_out + posterior_px] = CEMENT
    if venous_px:
        front = x0 - 3 - venous_px if side == "right" else x1 + 3
        labels[20 : 20 + venous_px, front : front + venous_px] = CEMENT
    return labels


MM = TrackGeometry(frame_per_px=4.0, mm_per_frame_px=0.25)  # 1 class-map pixel = 1 mm
PX = TrackGeometry(frame_per_px=1.0)


def run(frames, geo=MM, cfg=None):
    cfg = cfg or TrackerConfig()
    state = TrackerState()
    out = []
    for labels in frames:
        status, state = track(labels, geo, state, cfg)
        out.append(status)
    return out


def test_clean_injection_raises_nothing():
    statuses = run([scene() for _ in range(10)])
    assert not any(s.posterior or s.venous or s.events for s in statuses)
    assert statuses[-1].body_found
    assert statuses[-1].areas["cement"] == pytest.approx(64.0)  # 8x8 px at 1 mm^2 each
    assert statuses[-1].posterior_side == "right"  # inferred from the needle's entry


def test_posterior_leak_raises_on_second_visible_frame_with_evidence():
    frames = [scene()] * 5 + [scene(posterior_px=3)] * 5
    statuses = run(frames)
    assert [s.posterior for s in statuses] == [False] * 6 + [True] * 4
    assert statuses[6].events == (("posterior", "raised"),)
    assert not any(s.venous for s in statuses)
    s = statuses[6]
    assert s.units == "mm"
    assert s.areas["posterior"] == pytest.approx(9.0)
    # leak columns x = 42..44 behind a wall at x = 39.5: deepest ~5 mm past it
    assert 4.0 <= s.posterior_depth <= 6.0
    ev = s.evidence["posterior"]
    # frame pixels: class-map x 42..44 -> frame (x + 0.5) * 4 - 0.5
    assert ev.box[0] == pytest.approx(42 * 4 - 0.5, abs=0.01)  # left edge of pixel 42
    assert ev.centroid[0] == pytest.approx(43.5 * 4 - 0.5)


def test_one_noisy_frame_raises_nothing():
    frames = [scene()] * 3 + [scene(posterior_px=3)] + [scene()] * 3 + [scene(venous_px=3)] + [scene()]
    statuses = run(frames)
    assert not any(s.posterior or s.venous for s in statuses)
    assert statuses[3].candidate["posterior"] and statuses[7].candidate["venous"]


def test_noise_that_jumps_around_raises_nothing():
    a, b = scene(posterior_px=2), scene()
    b[30:32, 42:44] = CEMENT  # behind the wall too, but nowhere near the first blob
    statuses = run([scene(), a, b, scene()])
    assert all(s.candidate["posterior"] for s in statuses[1:3])
    assert not any(s.posterior for s in statuses)


def test_venous_leak_is_extravertebral_cement_elsewhere():
    statuses = run([scene(venous_px=3)] * 3)
    assert [s.venous for s in statuses] == [False, True, True]
    assert not any(s.posterior for s in statuses)
    assert statuses[1].areas["venous"] == pytest.approx(9.0)


def _filled_to_a_thin_rim(breach: bool) -> np.ndarray:
    """Cement filling the body's anterior-superior corner up to a cortical rim one pixel thick
    (a thin rim the tracker's opening takes away with the bridges it is meant for), the rim
    broken or not."""
    labels = scene()
    y0, y1, x0, x1 = BODY
    labels[y0 - 1 : y0 + 6, x0 - 1 : x0 + 10] = VERTEBRAL_BODY  # the corner bulges 1 px out
    labels[y0 : y0 + 6, x0 : x0 + 9] = CEMENT  # filled up to that rim
    labels[y0 + 6 : 28, x0 + 4 : x0 + 9] = CEMENT  # joined to the cement from the needle
    labels[y0 + 6 : 28, x0 + 9 : 24] = CEMENT
    if breach:  # the rim breaks and cement leaves the bone through the top
        labels[y0 - 5 : y0, x0 + 2 : x0 + 5] = CEMENT
    return labels


HALF_MM = TrackGeometry(frame_per_px=2.0, mm_per_frame_px=0.25)  # 1 class-map pixel = 0.5 mm


def test_cement_that_fills_the_body_up_to_its_rim_is_not_a_leak():
    """The hull is made from the bone opened by 3x3: a rim one pixel thick goes, and the cement
    under it would lie outside the hull. Bone of the treated vertebra that still closes it off
    from soft tissue says it is inside; once it borders soft tissue it is a leak."""
    quiet = run([_filled_to_a_thin_rim(breach=False)] * 4, geo=HALF_MM)
    assert not any(s.venous or s.posterior or s.events for s in quiet)
    assert quiet[-1].areas["venous"] == 0
    frames = [_filled_to_a_thin_rim(breach=False)] * 2 + [_filled_to_a_thin_rim(breach=True)] * 3
    leak = run(frames, geo=HALF_MM)
    assert [s.venous for s in leak] == [False, False, False, True, True]
    assert leak[-1].areas["venous"] >= 6.0  # the breach (15 px) and the cement under the rim beside it


def test_enclosed_cement_deeper_than_a_rim_is_still_a_leak():
    """Fail-safe: the same picture at 1 mm per pixel puts the enclosed cement more than
    `rim_reach_mm` (3 mm) outside the hull; that is no cortical rim, whatever is labelled bone
    around it, and it is raised."""
    statuses = run([_filled_to_a_thin_rim(breach=False)] * 3, geo=MM)
    assert [s.venous for s in statuses] == [False, True, True]
    relaxed = run([_filled_to_a_thin_rim(breach=False)] * 3, geo=MM, cfg=TrackerConfig(rim_reach_mm=10.0))
    assert not any(s.venous for s in relaxed)


def test_cement_along_the_needle_is_not_venous():
    labels = scene()
    labels[38:40, 42:50] = CEMENT  # backflow along the cannula, 3-10 mm outside the body
    # the canal told to lie left: this side of the body is then where venous spread is judged
    geo = replace(MM, posterior_side="left")
    statuses = run([labels] * 4, geo=geo, cfg=TrackerConfig(needle_margin_mm=3.0))
    assert not any(s.venous or s.posterior for s in statuses)
    assert statuses[-1].areas["venous"] == 0
    # the needle margin is what quiets it: without it the same cement is a venous leak
    assert run([labels] * 4, geo=geo, cfg=TrackerConfig(needle_margin_mm=0.0))[-1].venous


def test_clear_only_after_sustained_absence():
    cfg = TrackerConfig(clear_frames=4)
    frames = [scene(posterior_px=3)] * 3 + [scene()] * 3 + [scene(posterior_px=3)] + [scene()] * 5
    statuses = run(frames, cfg=cfg)
    flags = [s.posterior for s in statuses]
    # raised at 1; a 3-frame gap does not clear it; the 4th leak-free frame after 6 clears it
    assert flags == [False, True, True, True, True, True, True, True, True, True, False, False]
    assert statuses[10].events == (("posterior", "cleared"),)


def test_posterior_side_from_config_and_left_side():
    frames = [scene(posterior_px=3, side="left")] * 3
    statuses = run(frames)  # inferred from the needle entering from the left
    assert statuses[-1].posterior_side == "left" and statuses[-1].posterior
    fixed = TrackGeometry(frame_per_px=4.0, mm_per_frame_px=0.25, posterior_side="right")
    statuses = run(frames, geo=fixed)  # told right: the left blob is not posterior
    assert not any(s.posterior for s in statuses)
    assert statuses[-1].venous


def test_threshold_in_mm_and_in_pixels():
    # a 1x1 leak: 1 mm^2 at 1 mm/px (meets 1 mm^2), 16 frame px^2 at 4 frame px per map px
    one = scene()
    one[20, 42] = CEMENT
    assert run([one] * 2)[-1].posterior
    # under the area threshold: not raised by default (the depth rule is off) ...
    assert not run([one] * 2, cfg=TrackerConfig(area_threshold_mm2=2.0))[-1].posterior
    # ... raised with the depth rule on when it lies 2 mm or more behind the wall ...
    assert run([one] * 2, cfg=TrackerConfig(area_threshold_mm2=2.0, posterior_depth_mm=2.0))[-1].posterior
    # ... and not when that depth rule asks for more than its ~3 mm
    deep_only = TrackerConfig(area_threshold_mm2=2.0, posterior_depth_mm=5.0)
    assert not run([one] * 2, cfg=deep_only)[-1].posterior
    px_geo = TrackGeometry(frame_per_px=4.0)
    out = run([one] * 2, geo=px_geo)
    assert out[-1].units == "px" and out[-1].areas["posterior"] == pytest.approx(16.0)
    assert out[-1].posterior
    assert not run([one] * 2, geo=px_geo, cfg=TrackerConfig(area_threshold_px=20.0))[-1].posterior


def test_cement_within_hull_tolerance_is_not_a_leak():
    labels = scene()
    labels[20:24, 40] = CEMENT  # touching the wall: within 1 mm of the hull
    tolerant = TrackerConfig(hull_tolerance_mm=1.0)
    assert not any(s.candidate["posterior"] or s.candidate["venous"] for s in run([labels] * 3, cfg=tolerant))
    strict = TrackerConfig(hull_tolerance_mm=0.0)
    assert run([labels] * 3, cfg=strict)[-1].posterior  # the same pixels, no tolerance


def test_cement_far_from_the_body_is_not_a_leak():
    labels = scene()
    labels[50:53, 58:61] = CEMENT  # a stray blob 18 mm behind the wall, nothing in between
    statuses = run([labels] * 4)
    assert not any(s.candidate["posterior"] or s.candidate["venous"] for s in statuses)
    near = scene()
    near[22:25, 44:47] = CEMENT  # the same blob 4 mm from the wall: a leak
    assert run([near] * 2)[-1].posterior


def test_an_ap_view_judges_no_posterior_spread():
    """In an AP view the canal lies along the beam: no wall line, no posterior verdict, and
    extravertebral cement beside the body is reported venous."""
    ap = replace(MM, view="ap")
    state = TrackerState()
    for _ in range(3):
        status, state = track(scene(posterior_px=3), ap, state)
    assert not status.posterior and status.venous
    assert status.wall is None and status.posterior_side is None and status.areas["posterior"] == 0
    assert run([scene(posterior_px=3)] * 3)[-1].posterior  # the same map, lateral


def test_no_body_no_alert():
    labels = np.zeros((H, W), np.uint8)
    labels[10:20, 10:20] = CEMENT
    statuses = run([labels] * 3)
    assert not statuses[-1].body_found
    assert not any(s.posterior or s.venous for s in statuses)


def test_fov_mask_hides_cement_outside_it():
    labels = scene(posterior_px=3)
    valid = np.ones((H, W), bool)
    valid[:, 41:] = False
    state = TrackerState()
    for _ in range(3):
        status, state = track(labels, MM, state, TrackerConfig(), valid)
    assert not status.posterior and status.areas["posterior"] == 0


def _same_status(a, b) -> bool:
    masks_a, masks_b = a.masks, b.masks
    return replace(a, masks={}) == replace(b, masks={}) and all(
        np.array_equal(masks_a[k], masks_b[k]) for k in set(masks_a) | set(masks_b)
    )


def test_tracker_is_pure():
    """The same inputs give the same status, every field and mask; the inputs and the
    previous state are left as they were (the state is returned, never changed in place)."""
    frames = [scene()] * 2 + [scene(posterior_px=3)] * 3
    copies = [f.copy() for f in frames]
    a, b = run(frames), run(frames)
    assert all(_same_status(x, y) for x, y in zip(a, b, strict=True))
    assert all(np.array_equal(f, c) for f, c in zip(frames, copies, strict=True))
    state = TrackerState()
    for f in frames[:3]:
        _, state = track(f, MM, state)
    leak = scene(posterior_px=3)
    first, after_first = track(leak, MM, state)
    second, after_second = track(leak, MM, state)  # the same previous state again
    assert _same_status(first, second) and first.events == (("posterior", "raised"),)
    for k in (after_first.posterior, after_second.posterior):
        assert (k.active, k.over, k.under) == (True, 2, 0)
    assert np.array_equal(after_first.posterior.mask, after_second.posterior.mask)
    assert state.posterior.over == 1 and not state.posterior.active  # untouched by either call


def _filled_and_moved_up(dy: int) -> np.ndarray:
    """The scene moved `dy` px up (breathing) with cement filling the body up to its (moved)
    superior endplate: only a strip of bone below the needle is still labelled as bone."""
    labels = np.roll(scene(), -dy, axis=0)
    y0, y1, x0, x1 = BODY
    top = labels[y0 - dy : y1 - dy - 8, x0:x1]
    top[top == VERTEBRAL_BODY] = CEMENT
    return labels


def test_remembered_body_moves_with_the_measured_scene_shift():
    """Cement hides the body; the tracker uses the body as it last saw it, moved by breathing.
    Here no other vertebra is in view to follow, so only the image registration's shift
    (TrackGeometry.scene_shift, against the same reference frame) can move it: with it, cement
    up to the moved endplate is inside the body; without it, 5 mm of it stand outside."""
    frames = [scene()] * 2 + [_filled_and_moved_up(5)] * 4
    shifts = [(0, 0.0, 0.0)] * 2 + [(0, 0.2, -5.1)] * 4  # (reference frame, dx, dy) model px

    def run_with(scene_shifts):
        state, out = TrackerState(), []
        for labels, shift in zip(frames, scene_shifts, strict=True):
            status, state = track(labels, replace(MM, scene_shift=shift), state)
            out.append(status)
        return out

    followed = run_with(shifts)
    assert not any(s.venous or s.posterior or s.candidate["venous"] for s in followed)
    assert followed[-1].body_found
    # unmeasured, or measured against another reference frame since (not comparable): the
    # body stays where it was seen, and the cement above its old endplate reads as a leak
    for unusable in ([None] * 6, [(0, 0.0, 0.0)] * 2 + [(7, 0.0, 0.0)] * 4):
        last = run_with(unusable)[-1]
        assert last.venous and last.evidence["venous"].box[1] < (BODY[0] - 0.5) * 4


def _density(labels: np.ndarray, venous_density: float | None, bone_dark: bool = False) -> np.ndarray:
    """The frame as the model read it (grey window units): soft tissue 0.3, bone 0.55, needle
    and cement 0.9; the venous square (scene(venous_px=3)) at `venous_density`."""
    density = np.select([labels == VERTEBRAL_BODY, labels == CEMENT, labels == NEEDLE], [0.55, 0.9, 0.9], 0.3).astype(
        np.float32
    )
    if venous_density is not None:
        density[20:23, 10:13] = venous_density
    return 1.0 - density if bone_dark else density


@pytest.mark.parametrize("bone_dark", [False, True])
def test_venous_cement_must_show_as_added_density(bone_dark):
    """The model drew cement outside the body: raised where the frame shows added density
    there (either polarity), not where the frame shows only soft tissue."""
    labels = scene(venous_px=3)

    def raised(venous_density: float, valid=None) -> bool:
        density = _density(labels, venous_density, bone_dark)
        state = TrackerState()
        for _ in range(3):
            status, state = track(labels, MM, state, TrackerConfig(), valid, density)
        return status.venous

    assert raised(0.9) and raised(0.45)  # cement, faint cement: 15 % of the window over tissue
    assert not raised(0.3) and not raised(0.2)  # nothing there, or less dense than tissue
    assert raised(0.3 + 0.03) and not raised(0.3 + 0.02)  # the line: 2.5 % of the grey window
    # the same blob with the soft tissue around it outside the field of view: nothing to
    # compare with, kept (fail-safe)
    valid = np.ones((H, W), bool)
    valid[16:27, 6:16] = False
    valid[20:23, 10:13] = True
    assert raised(0.3, valid)


def test_posterior_cement_is_not_held_to_the_density_check():
    """Posterior leaks run under the posterior elements and the pedicles; a thin one may not
    stand out from what is around it in a lateral view: the canal must not wait for it."""
    labels = scene(posterior_px=3)
    density = _density(labels, None)
    density[18:21, 42:45] = 0.3  # no added density behind the wall
    state = TrackerState()
    for _ in range(3):
        status, state = track(labels, MM, state, TrackerConfig(), None, density)
    assert status.posterior


def test_the_depth_rule_raises_on_a_speck_only_where_the_frame_shows_it():
    """With the depth rule on (posterior_depth_mm), cement well behind the wall raises even
    under the area threshold, but a speck of a pixel or two must then show as added density:
    the model's specks beside the wall would otherwise raise a high-priority alarm. Off (the
    default) such a speck raises nothing, whatever the frame shows."""
    labels = scene()
    labels[20:22, 44] = CEMENT  # 2 px (0.5 mm^2 at 0.5 mm/px), 2.25 mm behind the wall
    depth_rule = TrackerConfig(posterior_depth_mm=2.0)

    def raised(density, cfg: TrackerConfig = depth_rule) -> bool:
        state = TrackerState()
        for _ in range(3):
            status, state = track(labels, HALF_MM, state, cfg, None, density)
        # under the area threshold, past the depth rule's line
        assert status.areas["posterior"] < cfg.area_threshold_mm2 and status.posterior_depth >= 2.0
        return status.posterior

    shown = _density(labels, None)
    hidden = shown.copy()
    hidden[20:22, 44] = 0.3  # as the soft tissue around it
    assert raised(None) and raised(shown) and raised(1.0 - shown)
    assert not raised(hidden) and not raised(1.0 - hidden)
    assert TrackerConfig().posterior_depth_mm is None
    assert not raised(None, TrackerConfig()) and not raised(shown, TrackerConfig())


DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"


@pytest.mark.parametrize("name", ["posterior_leak", "venous_leak", "clean"])
def test_tracker_on_the_demo_loops_ground_truth(name):
    """The shipped demo loops' label masks, letterboxed to the model's 256 as a perfect
    segmenter would give them: each leak is raised within the spec's 1 s window of its
    onset, and nothing else is raised."""
    meta = json.loads((DEMO / f"{name}.labels.json").read_text())
    masks = np.load(DEMO / meta["masks"])["labels"]
    g = LetterboxGeometry.fit(masks.shape[1], masks.shape[2], 256)
    geo = TrackGeometry(frame_per_px=1 / g.scale, mm_per_frame_px=meta["pixel_spacing_mm"])
    state, raised = TrackerState(), {}
    for i, frame_labels in enumerate(masks):
        status, state = track(g.crop(letterbox_labels(frame_labels, g)), geo, state)
        for kind, what in status.events:
            if what == "raised":
                raised.setdefault(kind, i)
    assert status.posterior_side == meta["posterior_side"]  # inferred from the needle
    onsets = {e["kind"]: e["onset_frame"] for e in meta["events"]}
    assert set(raised) == set(onsets)
    window = math.ceil(meta["fps"])
    for kind, onset in onsets.items():
        assert onset <= raised[kind] <= onset + window


# The tracker's fast paths must give what the plain OpenCV calls they replace give, bit for bit.


def test_shift_by_copy_is_warp_affines_nearest():
    """Clear of half a pixel the remembered body is moved by a copy; near a half (where
    warpAffine rounds pixel by pixel) by warpAffine itself. Both read as warpAffine."""
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.3
    shifts = [(3.2, -1.7), (-0.6, 0.2), (12.9, 40.1), (-60.0, 2.0), (1.5, 0.2), (2.505, -3.499), (0.2, -7.51)]
    for dx, dy in shifts:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        want = cv2.warpAffine(mask.view(np.uint8), m, (53, 37), flags=cv2.INTER_NEAREST, borderValue=0)
        assert np.array_equal(tracker_module._shift(mask, dx, dy), want.view(bool)), (dx, dy)


def test_labelling_numbers_components_as_opencvs_default():
    """_label/_label_stats (BBDT) number components as connectedComponents' default does:
    the treated body and the cement's main blob are picked by argmax, ties to the first."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = cv2.dilate((rng.random((61, 47)) < 0.08).view(np.uint8), np.ones((2, 2), np.uint8)).view(bool)
        count, comp = cv2.connectedComponents(mask.view(np.uint8), connectivity=8)
        n, c = tracker_module._label(mask)
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        n2, c2, s2 = tracker_module._label_stats(mask)
        assert n == n2 == count and np.array_equal(c, comp) and np.array_equal(c2, comp)
        assert np.array_equal(s2, stats)


def test_distance_to_the_hull_on_its_rows_is_the_whole_maps():
    """The tracker measures the distance to the hull on the rows of the hull and the
    candidates only (all columns): the same floats as on the whole map."""
    rng = np.random.default_rng(2)
    for _ in range(100):
        h, w = rng.integers(8, 120, 2)
        hull = np.zeros((h, w), np.uint8)
        corners = np.stack([rng.integers(0, w, 5), rng.integers(0, h, 5)], 1).astype(np.int32)
        cv2.fillConvexPoly(hull, cv2.convexHull(corners), 1)
        full = cv2.distanceTransform(1 - hull, cv2.DIST_L2, 5)
        _, hy, _, hh = cv2.boundingRect(hull)
        top, bottom = min(hy, int(rng.integers(0, h))), max(hy + hh, int(rng.integers(1, h + 1)))
        strip = cv2.distanceTransform(np.ascontiguousarray(1 - hull[top:bottom]), cv2.DIST_L2, 5)
        assert np.array_equal(strip, full[top:bottom])
