"""The guidance loop: small operators with one job each, wired in `compose()`.

    capture ─▶ calibrate ─▶ segment ─▶ track ─▶ publish ─▶ ZeroMQ PUB (+ JSONL alert log)
    (Source)    grey, undistort,  onnxruntime  pure       status every frame, alerts on
                mm/px, FOV        class map    tracker    raise/clear; heartbeat thread

The same composed pipeline runs live (`GuidanceLoop.run`) and offline (`run_replay`, as fast as
possible, optionally without a socket). A bad frame or a model failure on one frame becomes a
technical alert and the frame is skipped; silence from the video becomes `video_lost` and
clears when frames come back.
"""

from __future__ import annotations

import gc
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from guidance.alerts.publisher import EventPublisher
from guidance.capture import Frame, Source, SourceInfo, open_source
from guidance.errors import GuidanceError
from guidance.segmentation.model import Model, RehearsalCut
from guidance.segmentation.preprocess import LetterboxGeometry
from guidance.segmentation.reference import ReferenceFrame
from guidance.settings import Settings
from guidance.tracking import TrackerConfig, TrackerState, TrackGeometry, TrackStatus, track

log = logging.getLogger("guidance.loop")
Op = TypeVar("Op")

STAGES = ("capture", "calibrate", "segment", "track", "publish")


class FrameError(Exception):
    """This frame cannot be used (malformed, undecodable): alert, skip, go on."""


class ModelRunError(Exception):
    """The model failed on this frame: alert, skip, go on."""


@dataclass
class FrameResult:
    """What one processed frame produced (handed to `on_result`)."""

    index: int
    capture_mono_ns: int
    image: np.ndarray  # the frame as segmented: grey, after calibration (see image_scale)
    labels: np.ndarray  # uint8 class map at model resolution, cropped to the frame area
    geometry: LetterboxGeometry
    status: TrackStatus
    messages: list[dict]  # every protocol message for this frame, exactly as published
    latency_ms: dict[str, float]
    image_scale: float = 1.0  # frame pixels per `image` pixel (> 1: corrected at a reduced size)


@dataclass
class Context:
    """What flows between operators for one frame."""

    frame: Frame
    picked_ns: int
    image: np.ndarray | None = None
    image_scale: float = 1.0  # frame pixels per image pixel (calibrated frames may be reduced)
    mm_per_px: float | None = None  # per frame pixel
    valid: np.ndarray | None = None  # image-size bool: inside FOV and not burned-in text
    labels: np.ndarray | None = None
    geometry: LetterboxGeometry | None = None
    label_valid: np.ndarray | None = None
    density: np.ndarray | None = None  # the frame as the model read it, class-map sized, grey window units
    reference_frame: int | None = None  # the frame a two-channel model read as the reference
    # (reference frame, dx, dy): the scene's move since then in model px, where it was measured
    scene_shift: tuple[int, float, float] | None = None
    status: TrackStatus | None = None
    messages: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # the stages, as published
    detail: dict[str, float] = field(default_factory=dict)  # finer timings, kept off the wire


# -- operators ---------------------------------------------------------------------------------


class CalibrateOp:
    """Grey, undistorted frame in detector-independent terms: mm/px, field of view, text.

    With a calibration, a frame larger than twice `working_side` (the model's input: it reads
    no finer detail) is corrected straight to a whole fraction of its size, at least that large
    (`Calibration.undistort(reduce=k)`): a 1024 px frame for a 256 px model at 512 px, about a
    third of the full-size correction's cost. `calibration.full_resolution` turns that off."""

    name = "calibrate"

    def __init__(self, settings: Settings, info: SourceInfo, working_side: int | None = None) -> None:
        self.calibration = None
        self.polarity: str | None = None
        self.working_side = None if settings.calibration.full_resolution else working_side
        self._valid_cache: dict[tuple[int, int], np.ndarray] = {}
        if settings.calibration.file:
            from calibration import load_calibration  # only when asked: calibration is optional

            angulation = settings.calibration.angulation
            self.calibration = (
                load_calibration(settings.calibration.file, angulation=angulation)
                if angulation
                else load_calibration(settings.calibration.file)
            )
            if info.width and info.height:  # made for other frames: refuse to start (calibration)
                self.calibration.check_size(info.width, info.height)
                self.calibration.prepare(self.reduce_for(info.height, info.width))  # not on frame 1
        self.mm_per_px = (
            settings.calibration.pixel_spacing_mm
            or (self.calibration.pixel_spacing_mm if self.calibration else None)
            or info.pixel_spacing_mm
        )

    @staticmethod
    def grey(image: np.ndarray) -> np.ndarray:
        if image is None or image.size == 0 or image.ndim not in (2, 3):
            raise FrameError(f"malformed frame: shape {getattr(image, 'shape', None)}")
        if image.dtype not in (np.uint8, np.uint16):
            raise FrameError(f"malformed frame: dtype {image.dtype} (expected 8- or 16-bit)")
        if image.ndim == 3:
            channels = image.shape[2]
            if channels == 1:
                image = image[..., 0]
            elif channels == 3:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            elif channels == 4:
                image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
            else:
                raise FrameError(f"malformed frame: {channels} channels")
        if min(image.shape) < 8:
            raise FrameError(f"malformed frame: {image.shape[1]}x{image.shape[0]} pixels")
        return image

    def reduce_for(self, height: int, width: int) -> int:
        """Whole factor the corrected frame is reduced by (1: full size)."""
        if not self.working_side:
            return 1
        return max(1, max(height, width) // (2 * self.working_side))

    def compute(self, ctx: Context) -> None:
        image = self.grey(ctx.frame.image)
        if self.calibration is not None:
            reduce = self.reduce_for(*image.shape[:2])
            try:
                key = image.shape[:2]
                if key not in self._valid_cache:  # FOV and burned-in text are fixed per set-up
                    self._valid_cache[key] = self._valid_mask(self.calibration.undistort(image), reduce)
                image = self.calibration.undistort(image, reduce)
            except (GuidanceError, ValueError, cv2.error) as exc:  # e.g. a frame of another size
                raise FrameError(f"frame does not fit the calibration: {exc}") from exc
            ctx.valid = self._valid_cache[key]
            ctx.image_scale = key[1] / image.shape[1]
        ctx.image = image
        ctx.mm_per_px = self.mm_per_px

    def rehearse(self, ctx: Context) -> None:
        self.compute(ctx)  # pure but for its caches, which a rehearsed frame has filled already

    def _valid_mask(self, corrected: np.ndarray, reduce: int) -> np.ndarray:
        """Field of view and no burned-in text, found once on a full-size corrected frame (thin
        strokes stay visible there), at the size frames are corrected to."""
        from calibration import intensity

        fov = np.asarray(self.calibration.fov_mask(corrected.shape[:2]), bool)
        text = np.asarray(intensity.text_mask(corrected), bool)
        self.polarity = intensity.detect_polarity(corrected, fov & ~text)
        log.info("calibration: %s, polarity %s", self.calibration, self.polarity)
        if reduce == 1:
            return fov & ~text
        w, h = self.calibration.reduced_size(reduce)
        # a reduced pixel with any text in it is text
        text_small = cv2.resize(text.view(np.uint8) * np.uint8(255), (w, h), interpolation=cv2.INTER_AREA) > 0
        return np.asarray(self.calibration.fov_mask((h, w)), bool) & ~text_small


class SegmentOp:
    """onnxruntime: frame -> class map at model resolution (cropped to the frame)."""

    name = "segment"

    def __init__(self, model: Model, reference_min_correlation: float = 0.85) -> None:
        self.model = model
        # two-channel models read the scene's first frame beside each frame
        self.reference = ReferenceFrame(reference_min_correlation) if model.takes_reference else None
        self._label_valid: dict[tuple, np.ndarray] = {}

    def compute(self, ctx: Context) -> None:
        self._segment(ctx, rehearsal=False)

    def rehearse(self, ctx: Context) -> None:
        """The same work on the same frame, the reference held as it is."""
        self._segment(ctx, rehearsal=True)

    def _segment(self, ctx: Context, rehearsal: bool) -> None:
        t0 = time.perf_counter()
        try:
            x, geometry = self.model.preprocess(ctx.image)
        except (ValueError, cv2.error) as exc:
            raise FrameError(f"frame cannot be preprocessed: {exc}") from exc
        reference = None
        if self.reference is not None and rehearsal:
            reference = self.reference.rehearse(x)
        elif self.reference is not None:
            taken = self.reference.taken
            reference = self.reference.for_frame(x, ctx.image.shape[:2], ctx.frame.index)
            ctx.reference_frame = self.reference.frame
            ctx.scene_shift = self.reference.scene_shift
            if self.reference.taken != taken:
                log.info("reference frame %d (%s)", ctx.frame.index, self.reference.last_reason)
        t1 = time.perf_counter()
        if rehearsal:  # a failure here is the keep-warm pass's (a cut one raises RehearsalCut)
            labels = geometry.crop(self.model.infer(x, reference, rehearsal=True))
        else:
            try:
                labels = geometry.crop(self.model.infer(x, reference))
            except Exception as exc:  # onnxruntime raises its own types  # noqa: BLE001
                raise ModelRunError(f"model failed on the frame: {exc}") from exc
        ctx.detail["preprocess"] = (t1 - t0) * 1e3
        ctx.detail["inference"] = (time.perf_counter() - t1) * 1e3
        ctx.labels, ctx.geometry = labels, geometry
        ctx.density = self.model.window_units(x, geometry)
        if ctx.valid is not None:
            key = (id(ctx.valid), labels.shape)
            if key not in self._label_valid:
                h, w = labels.shape
                small = cv2.resize(ctx.valid.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                self._label_valid[key] = small.astype(bool)
            ctx.label_valid = self._label_valid[key]


class TrackOp:
    """The pure tracker, holding its state between frames."""

    name = "track"

    def __init__(self, settings: Settings, info: SourceInfo) -> None:
        t = settings.tracker
        self.config = TrackerConfig(
            raise_frames=t.raise_frames,
            clear_frames=t.clear_frames,
            area_threshold_mm2=t.area_threshold_mm2,
            area_threshold_px=t.area_threshold_px,
            hull_tolerance_mm=t.hull_tolerance_mm,
            needle_margin_mm=t.needle_margin_mm,
        )
        self.side = t.posterior_side if t.posterior_side != "auto" else info.posterior_side
        # posterior spread needs the lateral view; unknown: lateral, the view injections are watched in
        self.view = t.view if t.view != "auto" else (info.view or "lateral")
        self.state = TrackerState()

    # no rehearse(): the keep-warm pass leaves the tracker out (short, last, and its warmth
    # was worth less than starting the pass 1.7 ms later: bench/latency.py, session 13)

    def compute(self, ctx: Context) -> None:
        geo = TrackGeometry(
            frame_per_px=ctx.geometry.frame_pixels_per_model_pixel() * ctx.image_scale,
            mm_per_frame_px=ctx.mm_per_px,
            posterior_side=self.side,
            scene_shift=ctx.scene_shift,
            view=self.view,
        )
        ctx.status, self.state = track(ctx.labels, geo, self.state, self.config, ctx.label_valid, ctx.density)


KIND_ALERT = {"posterior": "posterior_leak", "venous": "venous_leak"}


def _leak_sentence(kind: str, state: str, ev: dict | None) -> str:
    what = (
        "Posterior cement leak (behind the posterior wall)"
        if kind == "posterior"
        else "Venous cement leak (extravertebral)"
    )
    if state == "cleared":
        return f"{what} no longer seen."
    if ev is None:
        return f"{what} detected."
    extra = f", {ev['depth']:.1f} {ev['units']} past the wall" if kind == "posterior" else ""
    return f"{what}: {ev['area']:.1f} {ev['units']}^2{extra}."


class PublishOp:
    """Alerts first (they are what matters), then the frame's status."""

    name = "publish"

    def __init__(self, publisher: EventPublisher, source: Source, injector=None) -> None:
        self.publisher = publisher
        self.source = source
        self.injector = injector  # InjectorListener or None: the bridge's latest telemetry

    def compute(self, ctx: Context) -> None:
        t0 = time.perf_counter()
        status, frame = ctx.status, ctx.frame.index
        for kind, state in status.events:
            ev = status.evidence.get(kind)
            evd = ev.as_dict() if ev is not None else None
            sentence = _leak_sentence(kind, state, evd)
            msg = (
                self.publisher.raise_alert(KIND_ALERT[kind], frame, sentence, evd)
                if state == "raised"
                else self.publisher.clear_alert(KIND_ALERT[kind], frame, sentence, evd)
            )
            if msg is not None:
                ctx.messages.append(msg)
        ctx.timings["publish"] = (time.perf_counter() - t0) * 1e3
        msg = self.publisher.status(
            frame,
            ctx.frame.capture_mono_ns,
            ctx.timings,
            flags={"posterior": status.posterior, "venous": status.venous},
            areas=status.areas,
            posterior_depth=status.posterior_depth,
            units=status.units,
            dropped_frames=self.source.dropped_frames,
            injector=self.injector.latest() if self.injector is not None else None,
            reference_frame=ctx.reference_frame,
        )
        ctx.messages.append(msg)


@dataclass
class Pipeline:
    """The composed operators; `process()` runs one frame through them, timing each."""

    source: Source
    operators: list
    publisher: EventPublisher

    def operator(self, kind: type[Op]) -> Op:
        """The composed operator of that class."""
        return next(op for op in self.operators if isinstance(op, kind))

    def process(self, frame: Frame) -> Context:
        ctx = Context(frame=frame, picked_ns=time.monotonic_ns())
        ctx.timings["capture"] = (ctx.picked_ns - frame.capture_mono_ns) / 1e6
        if frame.image is None:
            raise FrameError(frame.error or "frame could not be decoded")
        for op in self.operators:
            if op.name == "publish":
                op.compute(ctx)  # times itself: its send is the end of the measurement
                continue
            t0 = time.perf_counter()
            op.compute(ctx)
            ctx.timings[op.name] = (time.perf_counter() - t0) * 1e3
        return ctx

    def rehearse(self, frame: Frame, cut_short: Callable[[], bool] | None = None) -> Context:
        """Run an already processed frame again through the operators that rehearse
        (calibrate, segment: the costly part), changing no operator's state: the keep-warm
        pass (GuidanceLoop). Nothing is sent. Before each operator `cut_short()` may end the
        pass (a new frame has come: it goes first), and Model.cut_rehearsal() ends its
        inference."""
        ctx = Context(frame=frame, picked_ns=time.monotonic_ns())
        for op in self.operators:
            if cut_short is not None and cut_short():
                break
            if hasattr(op, "rehearse"):
                try:
                    op.rehearse(ctx)
                except RehearsalCut:
                    break
        return ctx


def compose(settings: Settings, source: Source, model: Model, publisher: EventPublisher, injector=None) -> Pipeline:
    """capture -> calibrate -> segment -> track -> publish, in one readable place."""
    info = source.info
    return Pipeline(
        source,
        [
            CalibrateOp(settings, info, working_side=model.size),
            SegmentOp(model, settings.segmentation.reference_min_correlation),
            TrackOp(settings, info),
            PublishOp(publisher, source, injector),
        ],
        publisher,
    )


# -- running -----------------------------------------------------------------------------------


@dataclass
class RunSummary:
    source: str
    model: str
    frames_read: int = 0
    frames_processed: int = 0
    frames_skipped: int = 0
    dropped_frames: int = 0
    dropped_messages: int = 0
    messages_sent: int = 0
    alerts: list[dict] = field(default_factory=list)  # every alert message, in order
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # per stage, per frame
    wall_s: float = 0.0
    stopped_by: str = "end"  # end | signal | max_frames
    rehearsals: int = 0  # keep-warm passes run (GuidanceLoop.keep_warm)
    rehearsal_overlaps: int = 0  # frames that came while one ran (it was cut short for them)

    @property
    def fps(self) -> float:
        return self.frames_processed / self.wall_s if self.wall_s > 0 else 0.0

    def percentiles(self, stage: str = "capture_to_publish") -> dict[str, float]:
        values = np.asarray(self.latency_ms.get(stage, []), float)
        if values.size == 0:
            return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
        return {
            "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99)),
            "max": float(values.max()),
        }


KEEP_WARM_MARGIN_NS = 1_500_000  # a keep-warm pass is planned to end this long before the next frame


class FramePeriod:
    """The time between a source's frames as they come: the median of the last few capture
    intervals once there are four, before that the source's nominal fps (0: unknown). A grabber
    that reports no frame rate, or the wrong one, is still followed."""

    def __init__(self, fps: float | None) -> None:
        self.nominal_ns = int(1e9 / fps) if fps else 0
        self._intervals: deque[int] = deque(maxlen=9)
        self._last_ns: int | None = None

    def observe(self, capture_ns: int) -> int:
        """Take a frame's capture time; returns the period (ns) as now known."""
        if self._last_ns is not None and capture_ns > self._last_ns:
            self._intervals.append(capture_ns - self._last_ns)
        self._last_ns = capture_ns
        if len(self._intervals) >= 4:
            return int(statistics.median(self._intervals))
        return self.nominal_ns


class GuidanceLoop:
    """Owns the loop around a composed pipeline: technical alerts, counters, stop."""

    def __init__(
        self,
        settings: Settings,
        source: Source,
        model: Model,
        publisher: EventPublisher,
        on_result: Callable[[FrameResult], None] | None = None,
        on_message: Callable[[dict], None] | None = None,
        stop: threading.Event | None = None,
        injector=None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.model = model
        self.publisher = publisher
        self.on_result = on_result
        self.on_message = on_message
        self.stop = stop or threading.Event()
        self.pipeline = compose(settings, source, model, publisher, injector)
        self.summary = RunSummary(
            source=source.info.name,
            model=model.describe(),
            latency_ms={k: [] for k in ("capture_to_publish", *STAGES)},
        )
        self._overruns = 0
        self._in_budget = 0
        self.keep_warm = settings.loop.keep_warm and source.realtime
        self._period = FramePeriod(source.info.fps)
        self._pass_ns: deque[int] = deque(maxlen=16)  # the last keep-warm passes' times
        self._last_pass_ns = 0
        self._rehearsal_end_ns = 0

    def _emit(self, msg: dict | None, into: list[dict] | None = None) -> None:
        if msg is None:
            return
        if into is not None:
            into.append(msg)
        if msg["type"] == "alert":
            self.summary.alerts.append(msg)
            if self.on_message is not None:
                self.on_message(msg)

    def _check_view(self) -> None:
        if self.pipeline.operator(TrackOp).view == "ap":
            self._emit(
                self.publisher.raise_alert(
                    "posterior_not_assessed",
                    None,
                    "AP view: posterior spread into the canal cannot be judged (the canal lies along "
                    "the beam); extravertebral cement is reported as venous. Watch the lateral view.",
                )
            )

    def _check_calibration(self) -> None:
        calibrate = self.pipeline.operator(CalibrateOp)
        if calibrate.mm_per_px is None:
            self._emit(
                self.publisher.raise_alert(
                    "calibration_missing",
                    None,
                    "No calibration and no pixel spacing from the source: areas and depths are in "
                    "pixels, thresholds in pixels.",
                )
            )

    def _latency_watch(self, index: int, c2p: float, into: list[dict]) -> None:
        budget = self.settings.loop.latency_budget_ms
        if not budget:
            return
        n = self.settings.loop.overrun_frames
        if c2p > budget:
            self._overruns, self._in_budget = self._overruns + 1, 0
            if self._overruns >= n:
                self._emit(
                    self.publisher.raise_alert(
                        "latency_overrun",
                        index,
                        f"Capture-to-publish latency over {budget:.0f} ms for {n} frames (last {c2p:.0f} ms).",
                    ),
                    into,
                )
        else:
            self._overruns, self._in_budget = 0, self._in_budget + 1
            if self._in_budget >= n and self.publisher.is_active("latency_overrun"):
                self._emit(
                    self.publisher.clear_alert("latency_overrun", index, f"Latency back within {budget:.0f} ms."),
                    into,
                )

    def _handle(self, frame: Frame) -> None:
        s = self.summary
        pub = self.publisher
        try:
            ctx = self.pipeline.process(frame)
        except FrameError as exc:
            s.frames_skipped += 1
            self._emit(pub.raise_alert("frame_error", frame.index, f"Frame {frame.index} skipped: {exc}"[:300]))
            log.warning("frame %d skipped: %s", frame.index, exc)
            return
        except ModelRunError as exc:
            s.frames_skipped += 1
            self._emit(pub.raise_alert("model_error", frame.index, f"Frame {frame.index} not segmented: {exc}"[:300]))
            log.warning("frame %d: %s", frame.index, exc)
            return
        for msg in ctx.messages:
            self._emit(msg)
        extra: list[dict] = []
        for kind in ("frame_error", "model_error"):  # a good frame ends those episodes
            if pub.is_active(kind):
                self._emit(
                    pub.clear_alert(kind, frame.index, f"Frame {frame.index} processed normally again."),
                    extra,
                )
        status_msg = next(m for m in ctx.messages if m["type"] == "status")
        latency = dict(status_msg["latency_ms"])
        self._latency_watch(frame.index, latency["capture_to_publish"], extra)
        ctx.messages.extend(extra)
        s.frames_processed += 1
        for key, value in {**latency, **ctx.detail}.items():
            s.latency_ms.setdefault(key, []).append(value)
        if self.on_result is not None:
            self.on_result(
                FrameResult(
                    index=frame.index,
                    capture_mono_ns=frame.capture_mono_ns,
                    image=ctx.image,
                    labels=ctx.labels,
                    geometry=ctx.geometry,
                    status=ctx.status,
                    messages=ctx.messages,
                    latency_ms=latency,
                    image_scale=ctx.image_scale,
                )
            )

    def _warm_at(self, frame: Frame, process_ns: int) -> int:
        """When to rehearse `frame`, processed in `process_ns`, so that the pass ends
        KEEP_WARM_MARGIN_NS before the next frame is due; 0 when there is no time for one.
        A pass runs after the idle gap, as cold as a frame would: its time varies, so it is
        planned by nearly the longest of the last passes (at first, by the frame's own time)."""
        if not self.keep_warm:
            return 0
        period_ns = self._period.observe(frame.capture_mono_ns)
        if frame.image is None or not period_ns:
            return 0
        if frame.capture_mono_ns < self._rehearsal_end_ns:  # it came during the pass, which needed longer
            self.summary.rehearsal_overlaps += 1
            self._pass_ns.append(self._last_pass_ns + self._rehearsal_end_ns - frame.capture_mono_ns)
        # the second longest of the last 16 (one host hiccup does not hold for 16 frames)
        lead = sorted(self._pass_ns)[-2] if len(self._pass_ns) >= 2 else process_ns
        at = frame.capture_mono_ns + period_ns - lead - KEEP_WARM_MARGIN_NS
        return at if at > time.monotonic_ns() else 0

    def _rehearse(self, frame: Frame) -> None:
        """The keep-warm pass. The loop idles between frames; on a shared machine its caches
        go cold meanwhile and the next frame's inference runs up to 2x slower than back to
        back (bench/idle_gap.py). Running the last frame through calibration and segmentation
        again (nothing published, no state changed) just before the next is due makes that
        frame find them warm, for most of one frame's CPU time more per frame; a frame that
        comes during the pass cuts it short (at the next operator, or inside inference).
        Optional: if it fails, it is turned off for the run and the loop goes on."""
        t0 = time.monotonic_ns()
        self.model.arm_rehearsal()
        self.source.on_frame = self.model.cut_rehearsal
        try:
            self.pipeline.rehearse(frame, cut_short=lambda: self.source.frame_waiting)
        except Exception as exc:  # noqa: BLE001 - the frame itself was processed; this is extra
            self.keep_warm = False
            log.warning("keep-warm pass failed, turned off for this run: %s", exc)
            return
        finally:
            self.source.on_frame = None
        self._rehearsal_end_ns = time.monotonic_ns()
        self._last_pass_ns = self._rehearsal_end_ns - t0
        if not self.source.frame_waiting:  # whole: a cut one is counted when its frame is taken
            self._pass_ns.append(self._last_pass_ns)
        self.summary.rehearsals += 1

    def run(self) -> RunSummary:
        s, pub, source = self.summary, self.publisher, self.source
        cfg = self.settings
        fps = source.info.fps or 0.0
        timeout_s = max(cfg.capture.video_timeout_s, 3.0 / fps if fps else 0.0)
        self._check_calibration()
        self._check_view()
        pub.state = "running"
        # What exists now (modules, the model, the session) lives as long as the loop: take it
        # out of the cyclic garbage collector's sight, so that a full collection in the middle
        # of a frame walks only what the loop itself made (a ms-scale pause otherwise).
        gc.collect()
        gc.freeze()
        source.start()
        t_start = time.monotonic()
        last_frame_at = t_start
        warm_at_ns, last = 0, None  # keep-warm: when to rehearse which frame
        try:
            while not self.stop.is_set():
                wait_s = 0.05 if not warm_at_ns else min(0.05, max(0.0, (warm_at_ns - time.monotonic_ns()) / 1e9))
                frame = source.read(wait_s)
                now = time.monotonic()
                if frame is None:
                    if source.ended:
                        break
                    if warm_at_ns and time.monotonic_ns() >= warm_at_ns:
                        warm_at_ns = 0
                        self._rehearse(last)
                        continue
                    if now - last_frame_at > timeout_s and not pub.is_active("video_lost"):
                        pub.state = "video_lost"
                        self._emit(
                            pub.raise_alert(
                                "video_lost",
                                pub.last_frame,
                                f"No video from {source.info.name} for {now - last_frame_at:.1f} s.",
                            )
                        )
                        log.warning("video lost: %s", source.info.name)
                    continue
                last_frame_at = now
                if pub.is_active("video_lost"):
                    pub.state = "running"
                    self._emit(pub.clear_alert("video_lost", frame.index, f"Video from {source.info.name} is back."))
                started_ns = time.monotonic_ns()
                self._handle(frame)
                warm_at_ns, last = self._warm_at(frame, time.monotonic_ns() - started_ns), frame
                if cfg.loop.max_frames and s.frames_processed + s.frames_skipped >= cfg.loop.max_frames:
                    s.stopped_by = "max_frames"
                    break
            else:
                s.stopped_by = "signal"
        finally:
            gc.unfreeze()  # many loops in one process (evaluation): collectable again
            source.stop()
            s.wall_s = time.monotonic() - t_start
            s.frames_read = source.frames_read
            s.dropped_frames = source.dropped_frames
            pub.dropped_frames = s.dropped_frames
            s.dropped_messages = pub.dropped_messages
            s.messages_sent = pub.sent
        return s


def load_model(settings: Settings) -> Model:
    seg = settings.segmentation
    return Model(settings.model_path, seg.sha256sums, provider=seg.provider, threads=seg.threads)


def make_publisher(settings: Settings) -> EventPublisher:
    a = settings.alerts
    return EventPublisher(
        a.address,
        sndhwm=a.sndhwm,
        linger_ms=a.linger_ms,
        heartbeat_ms=a.heartbeat_ms,
        alert_log=a.log,
    )


def run_replay(
    source: str | Path | Source,
    settings: Settings | None = None,
    on_result: Callable[[FrameResult], None] | None = None,
    model: Model | None = None,
) -> RunSummary:
    """Run the SAME composed pipeline as live on a recorded loop, as fast as possible and
    lossless. With `settings.alerts.address` None no socket is bound (many can run in
    parallel); messages are still built, logged when `alerts.log` is set, and handed to
    `on_result` with each frame. Pass `model` to share one loaded Model between runs."""
    settings = settings or Settings()
    if isinstance(source, Source):
        src = source
        if not hasattr(src, "info"):
            src.connect()
    else:
        src = open_source(str(source), kind="auto", pace=False, fps=settings.capture.fps)
    model = model or load_model(settings)
    if not model.warm:
        model.warm_up(settings.segmentation.warmup_runs)
    publisher = make_publisher(settings).open()
    try:
        if settings.alerts.address:
            publisher.start_heartbeat()
        loop = GuidanceLoop(settings, src, model, publisher, on_result=on_result)
        return loop.run()
    finally:
        publisher.close()
