"""Run one loop through the live service's pipeline (`guidance.pipeline.run_replay`, the same
compose()d operators as `guidance run`, no socket bound) and collect what scoring and the
report need. `evaluate_loop` is a top-level function of plain data in and plain data out, so
that it runs the same in this process, in a spawned worker process or on a Dask worker.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guidance.errors import GuidanceError
from guidance.evaluation import overlay
from guidance.evaluation.discovery import LoopRef
from guidance.evaluation.labels import Labels, LabelsError, MaskStream
from guidance.evaluation.scoring import (
    DiceCounter,
    detection_window_frames,
    raises_from_messages,
    score_loop,
)
from guidance.evaluation.summary import latency_stats

log = logging.getLogger(__name__)

MAX_THUMBNAILS = 8  # per loop in the report: findings first, then onsets, then raises
MAX_CANDIDATES = 48  # moments kept while the loop runs, before the scoring picks


@dataclass
class LoopTask:
    """Everything a worker needs for one loop (picklable; paths must be visible to it)."""

    ref: LoopRef
    labels: Labels | None
    settings: object  # the service's settings for run_replay (model, tracker, ...)
    out_dir: str
    video: bool = True
    overlay_max_side: int = 512
    progress: object = None  # a queue-like with put((loop_id, frames_done)) or None
    progress_every: int = 10
    slug: str = ""  # output file stem, unique in the run (default: ref.slug)

    def __post_init__(self) -> None:
        self.slug = self.slug or self.ref.slug


class _Collector:
    """on_result callback: per-frame series, alerts, Dice, overlay video and thumbnails."""

    def __init__(self, task: LoopTask, fps_hint: float | None) -> None:
        self.task = task
        self.masks = MaskStream(task.labels) if task.labels and task.labels.masks_path else None
        self.dice = DiceCounter() if self.masks is not None else None
        self.frames_seen: list[int] = []
        self.series: dict[str, list] = {
            k: [] for k in ("frame", "cement", "posterior", "venous", "flag_posterior", "flag_venous")
        }
        self.units: str | None = None
        self.messages: list[dict] = []
        self.latencies: list[float] = []
        self.stage_latencies: dict[str, list[float]] = {}
        self.thumbnails: list[dict] = []
        self.size: tuple[int, int] | None = None
        self.mask_mismatch: str | None = None
        self.moments = self._moments(task.labels, fps_hint)
        self.video = (
            overlay.OverlayVideo(
                Path(task.out_dir) / "videos" / f"{task.slug}.mp4",
                fps_hint or 15.0,
                task.overlay_max_side,
            )
            if task.video
            else None
        )
        self.active: dict[str, bool] = {}
        self.closed = False

    @staticmethod
    def _moments(labels: Labels | None, fps: float | None) -> dict[int, list[str]]:
        """Frames worth a thumbnail known in advance: onsets and ends of detection windows."""
        out: dict[int, list[str]] = {}
        if labels is None:
            return out
        window = detection_window_frames(fps) if fps else None
        for ev in labels.events:
            out.setdefault(ev.onset_frame, []).append(f"{ev.kind} onset")
            if window is not None:
                out.setdefault(ev.onset_frame + window, []).append(f"{ev.kind} window end")
        return out

    def __call__(self, fr) -> None:  # FrameResult
        idx = int(fr.index)
        geometry = fr.geometry
        scale = fr.image_scale  # a calibrated frame may be corrected at a reduced size
        self.size = (round(geometry.frame_height * scale), round(geometry.frame_width * scale))
        if self.video is not None:
            for gap in range(self.frames_seen[-1] + 1 if self.frames_seen else 0, idx):
                # a frame the pipeline skipped: keep the video in step with the loop
                self.video.write(overlay.skipped_frame(overlay.fit_size(*self.size, self.task.overlay_max_side), gap))
        self.frames_seen.append(idx)
        status = next((m for m in fr.messages if m.get("type") == "status"), None)
        alerts = [m for m in fr.messages if m.get("type") == "alert"]
        self.messages.extend(dict(m) for m in fr.messages if m.get("type") == "alert")
        flags = (status or {}).get("flags") or {}
        areas = (status or {}).get("areas") or {}
        if status is not None:
            self.units = status.get("units", self.units)
        s = self.series
        s["frame"].append(idx)
        s["cement"].append(float(areas.get("cement", 0.0)))
        s["posterior"].append(float(areas.get("posterior", 0.0)))
        s["venous"].append(float(areas.get("venous", 0.0)))
        s["flag_posterior"].append(bool(flags.get("posterior")))
        s["flag_venous"].append(bool(flags.get("venous")))
        lat = dict(fr.latency_ms or {})
        # processing latency: frame picked by the loop -> published. The service's
        # capture_to_publish also holds "capture", which in an unpaced replay is the time the
        # frame waited for the loop (the previous frame's processing), not a grabber's delay.
        if "capture_to_publish" in lat:
            total = lat["capture_to_publish"] - lat.get("capture", 0.0)
        else:
            total = sum(v for k, v in lat.items() if k != "capture" and isinstance(v, int | float))
        self.latencies.append(float(total))
        for k, v in lat.items():
            if isinstance(v, int | float):
                self.stage_latencies.setdefault(k, []).append(float(v))

        if self.masks is not None and self.dice is not None and self.mask_mismatch is None and idx < len(self.masks):
            try:
                truth = self.masks.frame(idx)
            except LabelsError as exc:
                self.mask_mismatch = exc.why
                truth = None
            if truth is None:
                pass
            elif not _same_aspect(truth.shape, self.size):
                self.mask_mismatch = (
                    f"mask size {truth.shape[1]}x{truth.shape[0]} does not match the frame "
                    f"{self.size[1]}x{self.size[0]}"
                )
            else:
                self.dice.add_model_plane(np.asarray(fr.labels), truth)

        raised = [a for a in alerts if a.get("state") == "raised"]
        for a in alerts:
            self.active[a.get("kind", "?")] = a.get("state") == "raised"
        reasons = list(self.moments.get(idx, []))
        reasons += [f"{a.get('kind')} raised" for a in raised]
        if self.video is not None or reasons:
            lines = [(f"frame {idx}", overlay.WHITE)]
            lines += [(f"ALERT {k}", overlay.RED) for k, on in sorted(self.active.items()) if on]
            lines += [
                (f"label: {e.kind} leak since frame {e.onset_frame}", (0, 255, 0))
                for e in (self.task.labels.events if self.task.labels else ())
                if e.onset_frame <= idx
            ]
            max_side = self.task.overlay_max_side
            size = overlay.fit_size(self.size[0], self.size[1], max_side)
            bgr = overlay.render(fr.image, np.asarray(fr.labels), size, flags, lines, fr.status)
            if self.video is not None:
                self.video.write(bgr)
            if reasons and len(self.thumbnails) < MAX_CANDIDATES:
                self.thumbnails.append({"frame": idx, "why": ", ".join(reasons), "png": overlay.png_base64(bgr)})
        prog = self.task.progress
        if prog is not None and len(self.frames_seen) % self.task.progress_every == 0:
            prog.put((self.task.ref.loop_id, self.task.progress_every))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.video is not None:
            self.video.close()
        if self.masks is not None:
            self.masks.close()
        prog = self.task.progress
        if prog is not None:
            rest = len(self.frames_seen) % self.task.progress_every
            if rest:
                prog.put((self.task.ref.loop_id, rest))


def _same_aspect(mask_hw: tuple[int, int], frame_hw: tuple[int, int]) -> bool:
    return abs(mask_hw[0] / mask_hw[1] - frame_hw[0] / frame_hw[1]) <= 0.02 * frame_hw[0] / frame_hw[1]


def base_result(ref: LoopRef) -> dict:
    return {
        "loop_id": ref.loop_id,
        "name": ref.name,
        "source": ref.source,
        "form": ref.form,
        "labels": ref.labels,
        "status": "failed",
        "failure": None,
        "reason": None,
        "frames": 0,
        "fps": None,
        "fps_source": None,
        "size": None,
        "missing_frames": 0,
        "raises": [],
        "technical_alerts": [],
        "score": None,
        "dice": None,
        "dice_counts": None,
        "latency_ms": latency_stats([]),
        "latencies_ms": [],
        "wall_s": None,
        "realtime_factor": None,
        "cpu_s": None,
        "artifacts": {},
        "series": None,
        "thumbnails": [],
        "events": [],
    }


_MODELS: dict[tuple, object] = {}


def shared_model(settings):
    """One loaded, warmed Model per process and model file: a worker that runs many loops
    pays for the session and its warm-up once."""
    from guidance.pipeline import load_model

    seg = settings.segmentation
    key = (settings.model_path, seg.sha256sums, seg.provider, seg.threads)
    if key not in _MODELS:
        model = load_model(settings)
        model.warm_up(seg.warmup_runs)
        _MODELS[key] = model
    return _MODELS[key]


def evaluate_loop(task: LoopTask) -> dict:
    """Run and score one loop. Never raises: a loop that cannot be read or run comes back as
    status "failed" with the reason, so the other loops still complete."""
    from guidance.capture import open_source
    from guidance.pipeline import run_replay  # the live service's pipeline, not a copy

    result = base_result(task.ref)
    result["slug"] = task.slug
    labels = task.labels
    if labels is not None:
        result["events"] = [{"kind": e.kind, "onset_frame": e.onset_frame} for e in labels.events]
    settings = task.settings
    t0 = time.perf_counter()
    collector = None
    try:
        model = shared_model(settings)
        # one thread per loop (the default, scaled by loops): decode on it, not beside it
        inline = settings.segmentation.threads == 1
        source = open_source(task.ref.source, kind="replay", pace=False, fps=settings.capture.fps, inline=inline)
        video_fps = source.info.fps
        fps = labels.fps if labels and labels.fps else video_fps
        result["fps"] = fps
        result["fps_source"] = "labels" if labels and labels.fps else ("video" if fps else None)
        if labels is not None and fps is None:
            source.stop()
            raise LabelsError(labels.path, "fps", "is required: the video carries no frame rate")
        collector = _Collector(task, fps)
        t0 = time.perf_counter()  # the loop's own time, not the model's first load
        result["_cpu0"] = time.process_time()
        run = run_replay(source, settings, on_result=collector, model=model)
        collector.close()
        result["frames_read"] = run.frames_read
        # every alert the loop published, including those of frames that produced no result
        # (a frame_error raise on a skipped frame, calibration_missing before the first frame)
        collector.messages = [dict(m) for m in run.alerts]
    except LabelsError as exc:
        result["failure"] = "labels"
        result["reason"] = str(exc)
        return _finish(result, collector, t0)
    except GuidanceError as exc:
        result["failure"] = "unreadable"
        result["reason"] = f"cannot be read or run: {exc}"
        return _finish(result, collector, t0)
    except Exception as exc:  # a crash on one loop must not take the others down
        log.debug("loop %s failed:\n%s", task.ref.loop_id, traceback.format_exc())
        result["failure"] = "unreadable"
        result["reason"] = f"cannot be read or run: {type(exc).__name__}: {exc}"
        return _finish(result, collector, t0)
    finally:
        if collector is not None:
            collector.close()
    return _finish(result, collector, t0, ok=True)


def _finish(result: dict, col: _Collector | None, t0: float, ok: bool = False) -> dict:
    result = _finish_loop(result, col, t0, ok)
    if len(result["thumbnails"]) > MAX_THUMBNAILS:  # loops that were not scored
        _keep_thumbnails(result)
    return result


def _finish_loop(result: dict, col: _Collector | None, t0: float, ok: bool) -> dict:
    wall = time.perf_counter() - t0
    result["wall_s"] = wall
    cpu0 = result.pop("_cpu0", None)
    # CPU seconds of this process (all its threads) for the loop: on a shared machine a
    # steadier measure of cost than wall time (approximate when loops share a process)
    result["cpu_s"] = time.process_time() - cpu0 if cpu0 is not None else None
    if col is None:
        return result
    # frames the source delivered (decodable or not), so skipped frames at the end count too
    frames = max(result.get("frames_read") or 0, (max(col.frames_seen) + 1) if col.frames_seen else 0)
    result["frames"] = frames
    result["size"] = list(col.size) if col.size else None
    result["missing_frames"] = frames - len(set(col.frames_seen))
    result["latencies_ms"] = col.latencies
    result["latency_ms"] = {
        **latency_stats(col.latencies),
        "stages_p50": {k: float(np.median(v)) for k, v in sorted(col.stage_latencies.items())},
    }
    result["series"] = {**col.series, "units": col.units}
    result["thumbnails"] = col.thumbnails
    raises = raises_from_messages(col.messages)
    result["raises"] = [{"kind": r.kind, "frame": r.frame} for r in raises]
    result["technical_alerts"] = [
        {"kind": m.get("kind"), "state": m.get("state"), "frame": m.get("frame")}
        for m in col.messages
        if m.get("category") == "technical"
    ]
    result["alerts"] = [
        {"kind": m.get("kind"), "state": m.get("state"), "frame": m.get("frame"), "priority": m.get("priority")}
        for m in col.messages
    ]
    if col.video is not None and col.video.frames:
        result["artifacts"]["video"] = f"videos/{col.video.path.name}"
    fps = result["fps"]
    if fps and frames:
        result["realtime_factor"] = (frames / fps) / wall if wall > 0 else None
    if not ok:
        return result
    labels = col.task.labels
    if frames == 0:
        result["failure"] = "unreadable"
        result["reason"] = "cannot be read or run: no frame could be read"
        return result
    if labels is None:
        result["status"] = "unscored"
        result["reason"] = "no labels file"
        return result
    late = [e for e in labels.events if e.onset_frame >= frames]
    if late:
        result["failure"] = "labels"
        result["reason"] = str(
            LabelsError(
                labels.path, "events[].onset_frame", f"onset {late[0].onset_frame} is beyond the loop's {frames} frames"
            )
        )
        return result
    if col.masks is not None:
        if col.mask_mismatch:
            result["failure"] = "labels"
            result["reason"] = str(LabelsError(labels.path, "masks", col.mask_mismatch))
            return result
        if len(col.masks) != frames:
            result["failure"] = "labels"
            result["reason"] = str(
                LabelsError(labels.path, "masks", f"has {len(col.masks)} frames, the loop has {frames}")
            )
            return result
        # frames the pipeline skipped (corrupt) count as predicted background: every truth
        # pixel of theirs is a false negative
        skipped = sorted(set(range(frames)) - set(col.frames_seen))
        if skipped:
            again = MaskStream(labels)
            try:
                for idx in skipped:
                    truth = again.frame(idx)
                    col.dice.add(np.zeros_like(truth), truth)
            finally:
                again.close()
        result["dice_counts"] = col.dice.counts()
        result["dice"] = col.dice.dice()
    result["score"] = score_loop(labels.events, raises, fps, frames)
    result["status"] = "scored"
    _caption_findings(result)
    return result


def _caption_findings(result: dict) -> None:
    """Say on each thumbnail what the scoring made of its moment (miss, false alert), and
    keep the ones that matter most: misses and false alerts, then onsets, then raises."""
    score = result["score"]
    missed = {(e["kind"], e["onset_frame"]) for e in score["events"] if not e["detected"]}
    missed_end = {(e["kind"], e["window_end_frame"]) for e in score["events"] if not e["detected"]}
    false = {(a["kind"], a["frame"]) for a in score["false_alerts"]}
    kind_of = {"posterior_leak": "posterior", "venous_leak": "venous"}
    for t in result["thumbnails"]:
        notes = []
        for kind in ("posterior", "venous"):
            if (kind, t["frame"]) in missed and f"{kind} onset" in t["why"]:
                notes.append(f"{kind} MISSED")
            if (kind, t["frame"]) in missed_end and f"{kind} window end" in t["why"]:
                notes.append(f"{kind} still not raised")
        for alert, kind in kind_of.items():
            if (kind, t["frame"]) in false and f"{alert} raised" in t["why"]:
                notes.append(f"{kind} FALSE ALERT")
        if notes:
            t["why"] += " - " + ", ".join(notes)
        t["rank"] = 0 if notes else 1 if "onset" in t["why"] else 2
    _keep_thumbnails(result)


def _keep_thumbnails(result: dict) -> None:
    ranked = sorted(result["thumbnails"], key=lambda t: (t.get("rank", 2), t["frame"]))
    keep = sorted(ranked[:MAX_THUMBNAILS], key=lambda t: t["frame"])
    for t in keep:
        t.pop("rank", None)
    result["thumbnails"] = keep
