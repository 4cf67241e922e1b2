"""`report.html`: one self-contained page (inline CSS and SVG, base64 PNG thumbnails, no
script, no external asset) to open in any browser, also offline in a hospital network."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

from guidance import DISCLAIMER
from guidance.evaluation.scoring import DICE_CLASSES, detection_window_frames

KIND_COLOUR = {"posterior": "#d62728", "venous": "#1f77b4"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;
background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:18px 0 6px}
.disclaimer{color:#8a4b00;font-size:13px;margin-bottom:14px}
table{border-collapse:collapse;font-size:13px;margin:6px 0;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eee} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:600} .bad{color:#c62828;font-weight:600} .muted{color:#777}
.loop{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;margin:14px 0}
.thumbs{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;font-size:11px;max-width:210px}
figure img{display:block;border:1px solid #999} svg{background:#fff}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.sw{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin-right:4px}
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _f(x: float | None, digits: int = 2, unit: str = "") -> str:
    if x is None:
        return '<span class="muted">n/a</span>'
    return f"{x:.{digits}f}{unit}"


def _runs(flags: Sequence[bool], frames: Sequence[int]) -> list[tuple[int, int]]:
    """(first, last) frame of each run of set flags."""
    runs, start, prev = [], None, None
    for f, on in zip(frames, flags, strict=True):
        if on and start is None:
            start = f
        if not on and start is not None:
            runs.append((start, prev))
            start = None
        prev = f
    if start is not None:
        runs.append((start, prev))
    return runs


def timeline_svg(row: dict, detail: dict, width: int = 920, height: int = 210) -> str:
    """Areas over frames, flag bands, alert raises (triangles; hollow = false alert) against
    labelled onsets (dashed) and their detection windows (shaded)."""
    series = detail.get("series") or {}
    frames = series.get("frame") or []
    n = max(row.get("frames") or 0, (max(frames) + 1) if frames else 0, 1)
    left, right, top, plot_h = 60, 10, 22, 120
    band_y = top + plot_h + 8
    x_of = lambda f: left + (f + 0.5) * (width - left - right) / n  # noqa: E731
    fw = max(1.0, (width - left - right) / n)
    peak = max([1e-9] + [max(series.get(k) or [0]) for k in ("cement", "posterior", "venous")])
    units = series.get("units") or "px"
    y_of = lambda a: top + plot_h - a / peak * plot_h  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" class="timeline" '
        f'aria-label="timeline {_e(row["loop_id"])}">'
    ]
    out.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{plot_h}" fill="none" stroke="#bbb"/>'
    )
    out.append(f'<text x="4" y="{top + 10}" font-size="10">{peak:.0f} {units}²</text>')
    out.append(f'<text x="4" y="{top + plot_h}" font-size="10">0</text>')
    fps = row.get("fps")
    window = detection_window_frames(fps) if fps else 0
    for ev in detail.get("events") or []:
        c = KIND_COLOUR[ev["kind"]]
        x0 = x_of(ev["onset_frame"]) - fw / 2
        x1 = x_of(min(ev["onset_frame"] + window, n - 1)) + fw / 2
        out.append(
            f'<rect x="{x0:.1f}" y="{top}" width="{max(1, x1 - x0):.1f}" height="{plot_h}" fill="{c}" opacity="0.10"/>'
        )
        out.append(
            f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top}" y2="{top + plot_h}" stroke="{c}" '
            f'stroke-dasharray="4 3" stroke-width="1.5"><title>{ev["kind"]} onset, frame '
            f"{ev['onset_frame']}</title></line>"
        )
    for key, colour in (("cement", "#555"), ("posterior", KIND_COLOUR["posterior"]), ("venous", KIND_COLOUR["venous"])):
        values = series.get(key) or []
        if values:
            pts = " ".join(f"{x_of(f):.1f},{y_of(a):.1f}" for f, a in zip(frames, values, strict=True))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.3"/>')
    for i, (key, colour) in enumerate(
        (("flag_posterior", KIND_COLOUR["posterior"]), ("flag_venous", KIND_COLOUR["venous"]))
    ):
        y = band_y + i * 12
        out.append(f'<text x="4" y="{y + 9}" font-size="10">{key.removeprefix("flag_")}</text>')
        for a, b in _runs(series.get(key) or [], frames):
            out.append(
                f'<rect x="{x_of(a) - fw / 2:.1f}" y="{y}" width="{x_of(b) - x_of(a) + fw:.1f}" '
                f'height="9" fill="{colour}"/>'
            )
    false_frames = {(a["kind"], a["frame"]) for a in ((row.get("score") or {}).get("false_alerts") or [])}
    for r in row.get("raises") or []:
        c = KIND_COLOUR[r["kind"]]
        x = x_of(r["frame"])
        false = (r["kind"], r["frame"]) in false_frames
        fill = "#fff" if false else c
        out.append(
            f'<path d="M{x - 5:.1f},{top - 12} L{x + 5:.1f},{top - 12} L{x:.1f},{top - 2} Z" '
            f'fill="{fill}" stroke="{c}" stroke-width="1.5"><title>{r["kind"]} raised at frame '
            f"{r['frame']}{' (false alert)' if false else ''}</title></path>"
        )
    for a in row.get("technical_alerts") or []:
        if a.get("state") == "raised" and a.get("frame") is not None:
            x = x_of(a["frame"])
            out.append(
                f'<circle cx="{x:.1f}" cy="{top - 7}" r="3" fill="#999"><title>{_e(a["kind"])} '
                f"at frame {a['frame']}</title></circle>"
            )
    # frame axis
    step = max(1, 10 ** math.floor(math.log10(max(n, 10))) // 2)
    for f in range(0, n, step):
        out.append(f'<text x="{x_of(f):.1f}" y="{height - 4}" font-size="9" text-anchor="middle">{f}</text>')
    out.append("</svg>")
    return "".join(out)


def latency_histogram_svg(latencies: Sequence[float], width: int = 560, height: int = 190) -> str:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" class="histogram" role="img" aria-label="latency histogram">'
    ]
    if not latencies:
        out.append('<text x="10" y="20" font-size="12">no frames</text></svg>')
        return "".join(out)
    vals = sorted(latencies)
    hi = vals[min(len(vals) - 1, int(0.999 * len(vals)))] * 1.05 or 1.0
    bins = 40
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, int(v / hi * bins))] += 1
    # the plot, the tick labels below it, and the axis title below them (clear of the edge)
    left, bottom, plot_w, plot_h = 40, height - 34, width - 50, height - 50
    top_count = max(counts)
    bw = plot_w / bins
    for i, c in enumerate(counts):
        h = c / top_count * plot_h
        out.append(
            f'<rect x="{left + i * bw:.1f}" y="{bottom - h:.1f}" width="{bw - 1:.1f}" '
            f'height="{h:.1f}" fill="#4c72b0"><title>{i * hi / bins:.1f}-{(i + 1) * hi / bins:.1f} ms: '
            f"{c}</title></rect>"
        )
    for row, (q, colour) in enumerate(((50, "#2ca02c"), (99, "#d62728"))):
        v = float(np.percentile(vals, q))  # as in the summary (linear interpolation)
        x = left + min(v, hi) / hi * plot_w
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom - plot_h}" y2="{bottom}" '
            f'stroke="{colour}" stroke-dasharray="3 2"/>'
        )
        # each label on its own row (the two lines may be close), right of its line or, where
        # it would run off the plot, left of it
        tx, anchor = (x + 2, "start") if x < width - 70 else (x - 2, "end")
        out.append(
            f'<text x="{tx:.1f}" y="{bottom - plot_h + 10 + 12 * row}" font-size="10" fill="{colour}" '
            f'text-anchor="{anchor}">p{q} {v:.1f} ms</text>'
        )
    for i in range(0, 5):
        x = left + plot_w * i / 4
        out.append(f'<text x="{x:.1f}" y="{bottom + 12}" font-size="10" text-anchor="middle">{hi * i / 4:.0f}</text>')
    out.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" font-size="10" text-anchor="middle">'
        "per-frame latency (picked -> published), ms</text></svg>"
    )
    return "".join(out)


def _ci(ci: list[float] | None) -> str:
    return f" <span class=muted>[{ci[0]:.2f}, {ci[1]:.2f}]</span>" if ci else ""


def _metrics_table(summary: dict) -> str:
    det = summary["detection"]
    rows = []
    for kind in ("posterior", "venous", "overall"):
        m = det["overall"] if kind == "overall" else det["per_kind"][kind]
        rows.append(
            f"<tr><td>{kind}</td><td class=num>{m['detected']}/{m['events']}</td>"
            f"<td class=num>{_f(m['sensitivity'], 3)}{_ci(m.get('sensitivity_ci95'))}</td>"
            f"<td class=num>{_f(m['delay_frames_median'], 1)} / {_f(m['delay_frames_p90'], 1)}</td>"
            f"<td class=num>{_f(m['delay_ms_median'], 0)} / {_f(m['delay_ms_p90'], 0)}</td>"
            f"<td class=num>{m['false_alerts']}</td><td class=num>{_f(m['false_alerts_per_min'], 2)}"
            f"{_ci(m.get('false_alerts_per_min_ci95'))}</td></tr>"
        )
    return (
        "<table id=detection><tr><th>kind</th><th>detected</th><th>sensitivity [95 % CI]</th>"
        "<th>delay frames median / p90</th><th>delay ms median / p90</th><th>false alerts</th>"
        "<th>false alerts / min [95 % CI]</th></tr>" + "".join(rows) + "</table>"
    )


def _findings(summary: dict, details: dict[str, dict]) -> str:
    rows = []
    for row in summary["loops"]:
        score = row.get("score")
        if not score:
            continue
        for ev in score["events"]:
            if not ev["detected"]:
                rows.append(
                    (
                        row["loop_id"],
                        "miss",
                        ev["kind"],
                        ev["onset_frame"],
                        f"no {ev['kind']} raise in frames {ev['onset_frame']}..{ev['window_end_frame']}",
                    )
                )
        for fa in score["false_alerts"]:
            rows.append((row["loop_id"], "false alert", fa["kind"], fa["frame"], fa["reason"]))
    if not rows:
        return "<p id=findings>No misses and no false alerts.</p>"
    body = "".join(
        f"<tr class='finding'><td><a href='#loop-{_e(details[lid]['slug'])}'>{_e(lid)}</a></td>"
        f"<td class=bad>{what}</td><td>{kind}</td><td class=num>{frame}</td><td>{_e(why)}</td></tr>"
        for lid, what, kind, frame, why in rows
    )
    return (
        "<table id=findings><tr><th>loop</th><th>finding</th><th>kind</th><th>frame</th>"
        f"<th>detail</th></tr>{body}</table>"
    )


def _loop_section(row: dict, detail: dict) -> str:
    status = row["status"]
    cls = {"scored": "ok", "unscored": "muted", "failed": "bad"}[status]
    parts = [
        f"<section class=loop id='loop-{_e(detail['slug'])}'><h3>{_e(row['loop_id'])} "
        f"<span class={cls}>{status}</span></h3>"
    ]
    if row.get("reason"):
        parts.append(f"<p class={'bad' if status == 'failed' else 'muted'}>{_e(row['reason'])}</p>")
    facts = [f"{row.get('frames') or 0} frames"]
    if row.get("fps"):
        facts.append(f"{row['fps']:g} fps ({row.get('fps_source')})")
    if row.get("size"):
        facts.append(f"{row['size'][1]}x{row['size'][0]} px")
    if row.get("missing_frames"):
        facts.append(f"{row['missing_frames']} frames skipped by the pipeline")
    video = (row.get("artifacts") or {}).get("video")
    link = f", overlay video: <a href='{_e(video)}'>{_e(video)}</a>" if video else ""
    parts.append(f"<p class=muted>{_e(', '.join(facts))}{link}</p>")
    if detail.get("series") and detail["series"].get("frame"):
        parts.append(timeline_svg(row, detail))
    if row.get("dice"):
        parts.append("<p>Dice: " + ", ".join(f"{k} {_f(v, 3)}" for k, v in row["dice"].items()) + "</p>")
    thumbs = detail.get("thumbnails") or []
    if thumbs:
        parts.append("<div class=thumbs>")
        for t in thumbs:
            parts.append(
                f"<figure><img alt='frame {t['frame']}' src='data:image/png;base64,{t['png']}'>"
                f"<figcaption>frame {t['frame']}: {_e(t['why'])}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def render_report(summary: dict, details: dict[str, dict], latencies: Sequence[float]) -> str:
    """details: loop_id -> the loop's full result (series, thumbnails, slug)."""
    counts = summary["counts"]
    dice = summary["dice"]
    lat = summary["latency_ms"]
    run = summary.get("run") or {}
    fail_under = summary.get("fail_under")
    head = (
        f"<!DOCTYPE html><html lang=en><head><meta charset='utf-8'>"
        f"<title>cement-guidance evaluation</title><style>{CSS}</style></head><body>"
    )
    parts = [
        head,
        "<h1>cement-guidance offline evaluation</h1>",
        f"<p class=disclaimer>{_e(DISCLAIMER)}</p>",
        f"<p>{counts['loops']} loops ({counts['scored']} scored, {counts['unscored']} unscored, "
        f"<span class={'bad' if counts['failed'] else 'ok'}>{counts['failed']} failed</span>), "
        f"{counts['frames']} frames, {summary['detection']['minutes']:.2f} min scored. "
        f"Exit code {summary['exit_code']}.</p>",
    ]
    if run:
        parts.append(
            "<p class=muted>"
            + _e(", ".join(f"{k}: {v}" for k, v in run.items() if not isinstance(v, dict | list)))
            + "</p>"
        )
    parts.append("<h2>Detection</h2>" + _metrics_table(summary))
    parts.append(
        "<h2>Segmentation (Dice, pooled over masked frames)</h2><table id=dice><tr>"
        + "".join(f"<th>{n}</th>" for n in DICE_CLASSES.values())
        + "<th>frames</th></tr><tr>"
        + "".join(f"<td class=num>{_f(dice[n], 3)}</td>" for n in DICE_CLASSES.values())
        + f"<td class=num>{dice['frames']}</td></tr></table>"
    )
    if fail_under:
        parts.append(
            "<h2>Thresholds (--fail-under)</h2><table id=fail-under><tr><th>metric</th>"
            "<th>bound</th><th>value</th><th>met</th></tr>"
            + "".join(
                f"<tr><td>{c['metric']}</td><td class=num>{c['op']} {c['bound']:g}</td>"
                f"<td class=num>{_f(c['value'], 3)}</td><td class={'ok' if c['met'] else 'bad'}>"
                f"{'yes' if c['met'] else 'NO'}</td></tr>"
                for c in fail_under["results"]
            )
            + "</table>"
        )
    parts.append(
        f"<h2>Latency</h2><p>p50 {_f(lat['p50'], 1, ' ms')}, p99 {_f(lat['p99'], 1, ' ms')}, "
        f"max {_f(lat['max'], 1, ' ms')} over {lat['n']} frames (as fast as possible, "
        f"not paced).</p>" + latency_histogram_svg(latencies)
    )
    parts.append("<h2>Misses and false alerts</h2>" + _findings(summary, details))
    failed = [r for r in summary["loops"] if r["status"] == "failed"]
    if failed:
        parts.append(
            "<h2>Failed loops</h2><table id=failed><tr><th>loop</th><th>reason</th></tr>"
            + "".join(f"<tr><td>{_e(r['loop_id'])}</td><td>{_e(r['reason'])}</td></tr>" for r in failed)
            + "</table>"
        )
    parts.append(
        "<h2>Loops</h2><p class=legend>"
        "<span><i class=sw style='background:#555'></i>cement area</span>"
        f"<span><i class=sw style='background:{KIND_COLOUR['posterior']}'></i>posterior</span>"
        f"<span><i class=sw style='background:{KIND_COLOUR['venous']}'></i>venous</span>"
        "<span>dashed: labelled onset, shaded: detection window</span>"
        "<span>▼ raise (hollow: false alert), ● technical alert</span></p>"
        "<p class=legend>Thumbnails and overlay videos: vertebral body green, cement yellow, "
        "needle cyan; the posterior wall line the tracker fitted light grey; cement it calls a "
        "posterior leak red, a venous leak blue, each boxed; a red or blue bar while the alert "
        "flag is set.</p>"
    )
    for row in summary["loops"]:
        parts.append(_loop_section(row, details.get(row["loop_id"], {"slug": row["loop_id"]})))
    parts.append("</body></html>")
    return "".join(parts)
