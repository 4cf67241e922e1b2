"""summary.json building, its JSON Schema, --fail-under, and report.html structure, from
hand-made loop results (the end-to-end tests run the real pipeline: test_eval_cli.py)."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest

from guidance.errors import BadInputError
from guidance.evaluation.discovery import LoopRef
from guidance.evaluation.labels import Event
from guidance.evaluation.report import latency_histogram_svg, render_report
from guidance.evaluation.runner import base_result
from guidance.evaluation.scoring import AlertRaise, DiceCounter, score_loop
from guidance.evaluation.summary import (
    build_summary,
    check_fail_under,
    exit_code,
    load_schema,
    parse_fail_under,
    without_timing,
)

ROOT = Path(__file__).resolve().parents[1]


def thumb() -> str:
    ok, buf = cv2.imencode(".png", np.full((20, 30, 3), 128, np.uint8))
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


def fake_result(loop_id: str, events, raises, frames=90, fps=15.0, status="scored") -> dict:
    r = base_result(LoopRef(loop_id, loop_id, f"/data/{loop_id}.mp4", "video", None))
    r.update(
        status=status,
        frames=frames,
        fps=fps,
        fps_source="labels",
        size=[64, 48],
        slug=loop_id,
        events=[{"kind": e.kind, "onset_frame": e.onset_frame} for e in events],
    )
    r["raises"] = [{"kind": a.kind, "frame": a.frame} for a in raises]
    r["series"] = {
        "frame": list(range(frames)),
        "cement": [float(i) for i in range(frames)],
        "posterior": [float(max(0, i - 40)) for i in range(frames)],
        "venous": [0.0] * frames,
        "flag_posterior": [i >= 42 for i in range(frames)],
        "flag_venous": [False] * frames,
        "units": "mm",
    }
    r["latencies_ms"] = [10.0 + (i % 7) for i in range(frames)]
    r["latency_ms"] = {"n": frames, "p50": 13.0, "p99": 16.0, "max": 16.0}
    r["thumbnails"] = [{"frame": 41, "why": "posterior onset", "png": thumb()}]
    r["technical_alerts"] = [{"kind": "frame_error", "state": "raised", "frame": 7}]
    if status == "scored":
        r["score"] = score_loop(events, raises, fps, frames)
        d = DiceCounter()
        d.add(np.array([[2, 2], [0, 1]], np.uint8), np.array([[2, 0], [0, 1]], np.uint8))
        r["dice_counts"], r["dice"] = d.counts(), d.dice()
    elif status == "unscored":
        r["reason"] = "no labels file"
    return r


@pytest.fixture
def results():
    hit = fake_result("hit", [Event("posterior", 41)], [AlertRaise("posterior", 42)])
    miss = fake_result("miss", [Event("venous", 20)], [AlertRaise("posterior", 3)])
    unscored = fake_result("nolabels", [], [], status="unscored")
    failed = base_result(LoopRef("broken", "broken", "/data/broken.dcm", "dicom", None))
    failed["reason"] = "cannot be read or run: not a DICOM file"
    failed["failure"] = "unreadable"
    return [miss, failed, hit, unscored]


def test_summary_matches_schema_and_counts(results):
    s = build_summary(results, {"tool": "t", "started_utc": "x", "executor": "serial", "wall_s": 1.0})
    jsonschema.validate(s, load_schema())
    assert [r["loop_id"] for r in s["loops"]] == ["broken", "hit", "miss", "nolabels"]
    assert s["counts"] == {"loops": 4, "scored": 2, "unscored": 1, "failed": 1, "frames": 270}
    det = s["detection"]
    assert det["per_kind"]["posterior"]["sensitivity"] == 1.0
    assert det["per_kind"]["venous"]["sensitivity"] == 0.0
    assert det["overall"]["false_alerts"] == 1
    assert det["minutes"] == pytest.approx(2 * 90 / 15 / 60)
    assert s["dice"]["cement"] == pytest.approx(2 * 2 / (4 + 2))
    assert s["latency_ms"]["n"] == 270
    assert exit_code(s) == 1  # a failed loop

    # the schema is not a rubber stamp
    broken = copy.deepcopy(s)
    broken["loops"][1]["status"] = "done"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema())
    broken = copy.deepcopy(s)
    del broken["detection"]["per_kind"]["venous"]["delay_ms_p90"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema())


def test_without_timing_drops_only_timing(results):
    s = build_summary(results, {"tool": "t", "started_utc": "x", "executor": "serial", "wall_s": 1.0})
    t = without_timing(s)
    assert "run" not in t and "latency_ms" not in t
    assert all("wall_s" not in r and "latency_ms" not in r for r in t["loops"])
    assert t["detection"] == s["detection"] and t["dice"] == s["dice"]


def test_fail_under_parsing_and_bounds(results):
    assert parse_fail_under("sensitivity=0.9, false_alerts_per_min=1.0") == {
        "sensitivity": 0.9,
        "false_alerts_per_min": 1.0,
    }
    for bad in ("sensitivity", "sens=0.9", "sensitivity=high"):
        with pytest.raises(BadInputError, match="--fail-under"):
            parse_fail_under(bad)
    ok = [r for r in results if r["loop_id"] in ("hit", "nolabels")]
    s = build_summary(ok, {})
    assert exit_code(s) == 0
    s["fail_under"] = check_fail_under(
        s, parse_fail_under("sensitivity=1.0,false_alerts_per_min=0,delay_frames_p90=1,dice_cement=0.6")
    )
    assert s["fail_under"]["met"] and exit_code(s) == 0
    s["fail_under"] = check_fail_under(s, {"delay_ms_median": 10.0})  # 1 frame = 66.7 ms
    assert not s["fail_under"]["met"] and exit_code(s) == 1
    assert s["fail_under"]["results"][0]["op"] == "<="
    # a threshold on a metric that was not measured cannot pass
    s["fail_under"] = check_fail_under(s, {"sensitivity_venous": 0.0})
    assert s["fail_under"]["results"][0]["value"] is None and exit_code(s) == 1
    # the intervals' pessimistic ends: a perfect score on a handful of events is not a pass
    overall = s["detection"]["overall"]
    gate = parse_fail_under("sensitivity_lower95=0.9,false_alerts_per_min_upper95=100")
    s["fail_under"] = check_fail_under(s, gate)
    low, fa_high = s["fail_under"]["results"]
    assert overall["sensitivity"] == 1.0 and low["value"] == overall["sensitivity_ci95"][0] < 0.9
    assert low["op"] == ">=" and not low["met"] and exit_code(s) == 1
    assert fa_high["op"] == "<=" and fa_high["met"]
    assert fa_high["value"] == overall["false_alerts_per_min_ci95"][1] > overall["false_alerts_per_min"]
    posterior = check_fail_under(s, {"sensitivity_lower95_posterior": 0.1})["results"][0]
    assert posterior["value"] == s["detection"]["per_kind"]["posterior"]["sensitivity_ci95"][0]
    assert check_fail_under(s, {"sensitivity_lower95_venous": 0.0})["results"][0]["value"] is None


def test_labels_failure_found_while_running_is_exit_2(results):
    bad = base_result(LoopRef("x", "x", "/x.mp4", "video", "/x.labels.json"))
    bad["reason"] = "labels /x.labels.json: field 'masks': has 3 frames, the loop has 4"
    bad["failure"] = "labels"
    assert exit_code(build_summary([results[2], bad], {})) == 2


class Structure(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_and_has_every_part(results):
    s = build_summary(results, {"tool": "t", "started_utc": "x", "executor": "serial", "wall_s": 1.0})
    details = {r["loop_id"]: r for r in results}
    details["broken"]["slug"] = "broken"
    page = render_report(s, details, [v for r in results for v in r["latencies_ms"]])
    parser = Structure()
    parser.feed(page)
    tags = parser.tags
    text = " ".join(parser.text)
    # self-contained: no script, stylesheet link, or URL other than data: and in-page anchors
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object")]
    for _t, attrs in tags:
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:image/png;base64,", "#", "videos/")), attrs
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # one timeline per loop that ran, a latency histogram, the findings table
    assert sum(1 for t, a in tags if t == "svg" and a.get("class") == "timeline") == 3
    assert sum(1 for t, a in tags if t == "svg" and a.get("class") == "histogram") == 1
    ids = {a.get("id") for _t, a in tags}
    assert {"detection", "dice", "findings", "failed", "loop-hit", "loop-miss"} <= ids
    findings = [a for t, a in tags if t == "tr" and a.get("class") == "finding"]
    assert len(findings) == 2  # the venous miss and the posterior false alert
    assert "no venous raise in frames 20..35" in text
    assert "not a DICOM file" in text
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert len(imgs) == 3
    png = base64.b64decode(imgs[0].split(",", 1)[1])
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == (20, 30, 3)
    # false alert drawn hollow, true raise filled
    assert "(false alert)" in page
    json.dumps(s)  # summary stays JSON-able


@pytest.mark.parametrize(
    ("labels_shape", "size"), [((64, 64), (128, 128)), ((60, 80), (96, 128)), ((50, 50), (50, 50))]
)
def test_overlay_colours_each_class_over_the_grey_frame(labels_shape, size):
    # a horizontal ramp, the class map in four vertical bands (background, body, cement, needle)
    from guidance.evaluation import overlay

    h, w = size
    frame = np.tile(np.linspace(0, 255, 4 * w).astype(np.uint8), (4 * h, 1))
    labels = np.zeros(labels_shape, np.uint8)
    for c in range(4):
        labels[:, c * labels_shape[1] // 4 : (c + 1) * labels_shape[1] // 4] = c
    out = overlay.render(frame, labels, size, {}, [])
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    grey = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    rows = slice(h // 2, h)  # below any text
    for c in range(4):
        # the middle of each band, away from where nearest scaling puts its edges
        col = slice(c * w // 4 + w // 16, (c + 1) * w // 4 - w // 16)
        expected = grey[rows, col, None] * (1 - overlay.ALPHA) + overlay.CLASS_COLOURS[c] * overlay.ALPHA
        if c == 0:
            expected = np.repeat(grey[rows, col, None], 3, axis=2)  # no class: the frame as it is
        assert np.abs(out[rows, col].astype(np.float32) - expected).max() <= 1.0, c


@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")),
    reason="no Chromium on this machine (apt-get install -y chromium)",
)
def test_report_renders_in_headless_chromium(results, tmp_path):
    """scripts/screenshot_report.py: the page as a browser draws it, with the timelines'
    posterior red and venous blue, the text and the thumbnails (not a blank page)."""
    s = build_summary(results, {"tool": "t", "started_utc": "x", "executor": "serial", "wall_s": 1.0})
    details = {r["loop_id"]: r for r in results}
    details["broken"]["slug"] = "broken"
    report = tmp_path / "report.html"
    report.write_text(render_report(s, details, [v for r in results for v in r["latencies_ms"]]))
    png = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(report), "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    shot = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert shot is not None and shot.shape[1] == 1280 and shot.shape[0] >= 1000
    b, g, r = (shot[..., i].astype(int) for i in range(3))
    assert int(((r > 170) & (g < 100) & (b < 100)).sum()) >= 30  # posterior marks
    assert int(((b > 150) & (r < 100)).sum()) >= 30  # venous marks
    dark = (shot.max(axis=2) < 90).mean()
    assert 0.002 < dark < 0.5  # text drawn, page not black


@pytest.mark.parametrize("spread", [1.0, 0.05], ids=["apart", "close"])
def test_latency_histogram_text_stays_inside_and_apart(spread):
    """The axis title below the tick labels, both inside the drawing (a baseline on its bottom
    edge cut the title's descenders); the p50 and p99 labels on rows of their own (close
    percentiles overlapped), each inside the drawing (a p99 near the right edge ran off it)."""
    svg = latency_histogram_svg(list(np.random.default_rng(0).normal(12.0, spread, 270)))
    height = int(svg.split('height="', 1)[1].split('"', 1)[0])
    width = int(svg.split('width="', 1)[1].split('"', 1)[0])
    texts = [
        (float(t.split('x="', 1)[1].split('"', 1)[0]), float(t.split('y="', 1)[1].split('"', 1)[0]), t)
        for t in svg.split("<text ")[1:]
    ]
    title = next(y for _, y, t in texts if "per-frame latency" in t)
    ticks = {y for _, y, t in texts if 'text-anchor="middle">' in t and "per-frame" not in t}
    assert len(ticks) == 1 and title - ticks.pop() >= 10 and title <= height - 3
    p50, p99 = (next((x, y, t) for x, y, t in texts if f">p{q} " in t) for q in (50, 99))
    assert p99[1] - p50[1] >= 10
    for x, _, t in (p50, p99):
        assert 0 <= x <= width and ('text-anchor="end"' in t or x <= width - 60)


def test_overlay_marks_the_trackers_wall_line_and_leaks():
    """The tracker's findings on the overlay (class-map pixels scaled to the overlay): the
    leaks' pixels in their kind's colour inside a box of that colour, the wall line along the
    body in light grey; nothing of it where the status has none."""
    from guidance.evaluation import overlay
    from guidance.tracking import TrackStatus

    frame = np.full((256, 256), 100, np.uint8)
    labels = np.zeros((64, 64), np.uint8)
    body = np.zeros((64, 64), bool)
    body[20:40, 10:30] = True  # the treated body; its posterior wall the line x = 29.5
    posterior, venous = np.zeros_like(body), np.zeros_like(body)
    posterior[28:30, 40:42] = True
    venous[50:52, 50:53] = True
    status = TrackStatus(
        posterior=True,
        venous=False,
        areas={"cement": 0.0, "posterior": 4.0, "venous": 6.0},
        posterior_depth=4.0,
        units="px",
        candidate={"posterior": True, "venous": True},
        evidence={"posterior": None, "venous": None},
        events=(),
        body_found=True,
        posterior_side="right",
        wall=(0.0, 1.0, 29.5, 30.0, 1.0, 0.0),
        masks={"posterior": posterior, "venous": venous, "body": body},
    )
    plain = overlay.render(frame, labels, (256, 256), {}, [])
    out = overlay.render(frame, labels, (256, 256), {}, [], status)
    # 4 overlay px per class-map px: the posterior pixels at rows 112..119, columns 160..167
    assert (out[113:119, 161:167] == overlay.RED).all() and (out[201:207, 201:211] == overlay.BLUE).all()
    # boxed: the box's sides, clear of the pixels, in the same colour
    red = (out == overlay.RED).all(axis=2)
    assert red[105:125, 145:152].any() and red[105:125, 176:183].any()
    # the wall line: x = 29.5 class-map px -> 120 overlay px, along the body's rows (80..160)
    wall = (np.abs(out.astype(int) - overlay.WALL_COLOUR).sum(axis=2) < 60)[:, 116:124]
    assert wall[84:156].any(axis=1).mean() > 0.9 and not wall[:70].any() and not wall[170:].any()
    changed = (out != plain).any(axis=2)
    assert not changed[:, :100].any()  # nothing else drawn
    none = overlay.render(frame, labels, (256, 256), {}, [], replace(status, wall=None, masks={}))
    assert (none == plain).all()
