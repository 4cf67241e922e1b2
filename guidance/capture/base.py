"""The device interface every source implements, and the 1-deep newest-frame hand-over."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_previous = 0


@contextlib.contextmanager
def quiet_opencv():
    """Probing a source that may not be video, or reading video by a path OpenCV warns about
    on every frame: OpenCV/FFmpeg must not print their own lines (the user gets one clear line
    from us). OpenCV's level is process-wide: the first of overlapping users (reader threads)
    silences it, the last restores it."""
    global _quiet_depth, _quiet_previous
    logging_ = cv2.utils.logging
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_previous = logging_.getLogLevel()
            logging_.setLogLevel(logging_.LOG_LEVEL_SILENT)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logging_.setLogLevel(_quiet_previous)


@dataclass(frozen=True)
class SourceInfo:
    """What the source knows about itself (None where it does not)."""

    name: str
    kind: str  # "live", "replay" or "simulated"
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    pixel_spacing_mm: float | None = None
    posterior_side: str | None = None  # "left"/"right" when the acquisition says so
    view: str | None = None  # "lateral"/"ap" when the acquisition says so
    frame_count: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Frame:
    """One captured frame. `image` is None when the frame arrived but could not be decoded
    (`error` then says why): the loop raises a technical alert and skips it."""

    index: int
    capture_mono_ns: int
    image: np.ndarray | None
    info: SourceInfo
    error: str | None = None


def to_grey(image: np.ndarray) -> np.ndarray:
    """Colour (BGR/BGRA, as OpenCV decodes video) -> grey; grey passes through untouched."""
    if image.ndim == 3:
        if image.shape[2] == 1:
            return image[..., 0]
        if image.shape[2] == 3:
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        if image.shape[2] == 4:
            return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    return image


class NewestFrameSlot:
    """A buffer of one between a reader thread and the loop.

    Lossy (live, paced replay): a new frame replaces an unread one, and the replaced frame is
    counted as dropped; the loop always gets the newest frame, never a queue of stale ones.
    Lossless (replay as fast as possible): the reader waits until the loop took the frame.
    """

    def __init__(self, lossy: bool) -> None:
        self.lossy = lossy
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._closed = False
        self._waiting = 0  # loops blocked in get(): the consumer is idle
        self.dropped = 0

    def put(self, frame: Frame, stop: threading.Event) -> None:
        with self._cond:
            if not self.lossy:
                while self._frame is not None and not stop.is_set():
                    self._cond.wait(0.1)
                # as fast as possible: the frame "arrives" when the loop can take it, so the
                # latency measures the pipeline, not a queue the reader filled ahead of it
                frame.capture_mono_ns = time.monotonic_ns()
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()

    def close(self) -> None:
        """No more frames will come (end of a replay)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get(self, timeout_s: float) -> Frame | None:
        with self._cond:
            if self._frame is None and not self._closed:
                self._waiting += 1
                self._cond.notify_all()  # wakes a reader waiting for the loop to idle
                self._cond.wait(timeout_s)
                self._waiting -= 1
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return frame

    def wait_consumer_idle(self, deadline_ns: int, stop: threading.Event) -> None:
        """Block until the loop waits for a frame (its previous one is done), or deadline."""
        with self._cond:
            while not (self._waiting and self._frame is None) and not stop.is_set():
                left = (deadline_ns - time.monotonic_ns()) / 1e9
                if left <= 0:
                    return
                self._cond.wait(min(left, 0.05))

    @property
    def ready(self) -> bool:
        """A frame is waiting to be read."""
        with self._cond:
            return self._frame is not None

    @property
    def exhausted(self) -> bool:
        with self._cond:
            return self._closed and self._frame is None


class Source:
    """connect() -> start() -> read() ... -> stop().

    connect() validates and opens the device or file and raises BadInputError naming it when
    it cannot be used; start() starts the reader thread; read(timeout) returns the newest
    frame or None when none came in time; `ended` turns true when a replay is exhausted.
    """

    info: SourceInfo

    def __init__(self, lossy: bool) -> None:
        self._slot = NewestFrameSlot(lossy)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_read = 0  # every frame that left the device, dropped or not
        self.connected = False  # False while a live device is lost
        # called on the reader thread as each frame comes (the loop cuts its keep-warm pass
        # short with it): must be quick and must not raise
        self.on_frame: Callable[[], None] | None = None

    # -- to implement -------------------------------------------------------------------
    def connect(self) -> SourceInfo:
        raise NotImplementedError

    def _run(self) -> None:
        """Reader thread body: read frames and hand them to self._deliver()."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close the device or file (reader thread already stopped)."""

    # -- shared -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded_run, name=f"capture-{self.info.kind}", daemon=True)
        self._thread.start()

    def _guarded_run(self) -> None:
        try:
            self._run()
        finally:
            self._slot.close()

    def _deliver(self, frame: Frame) -> None:
        self.frames_read += 1
        self._slot.put(frame, self._stop)
        hook = self.on_frame
        if hook is not None:
            hook()

    def read(self, timeout_s: float = 0.1) -> Frame | None:
        return self._slot.get(timeout_s)

    @property
    def ended(self) -> bool:
        return self._slot.exhausted

    @property
    def frame_waiting(self) -> bool:
        """A frame has come and not been read yet (read() would return it at once)."""
        return self._slot.ready

    @property
    def realtime(self) -> bool:
        """Frames come at the source's own pace (live, paced replay), not when the loop asks."""
        return self._slot.lossy

    @property
    def dropped_frames(self) -> int:
        return self._slot.dropped

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self._release()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ReplaySource(Source):
    """A recorded loop: frames come from `_decode()` (an iterator of image-or-error), handed
    over at the loop's fps (paced, lossy like a live grabber) or as fast as the loop takes
    them (lossless).

    `inline=True` (lossless only) decodes each frame in `read()`, on the loop's own thread,
    instead of in a reader thread: for offline evaluation with one core per loop, where a
    reader thread can only take turns with the loop on that core, and the turns cost
    (measured ~10 % of a 1024 px loop's evaluation on one core)."""

    def __init__(self, path: str, pace: bool, fps: float | None = None, inline: bool = False) -> None:
        super().__init__(lossy=pace)
        if inline and pace:
            raise ValueError("inline decoding is for lossless replay (pace=False)")
        self.path = path
        self.pace = pace
        self.inline = inline
        self._fps_override = fps
        self._inline_frames: Iterator[np.ndarray | Exception] | None = None
        # the recording's own frame times (ns from its first frame), where it carries them and
        # no fps was forced: paced replay keeps them (a pulsed run's uneven gaps included)
        self.frame_offsets_ns: list[int] | None = None

    def _decode(self) -> Iterator[np.ndarray | Exception]:
        raise NotImplementedError

    def _offset_ns(self, index: int, period_ns: int) -> int:
        """When frame `index` is due, from the replay's start: its recorded time where the
        recording gives one (a video's once that frame is decoded), else one frame period
        after the last time known."""
        offsets = self.frame_offsets_ns
        if not offsets:
            return index * period_ns
        if index < len(offsets):
            return offsets[index]
        return offsets[-1] + (index - len(offsets) + 1) * period_ns

    def _frame(self, index: int, item: np.ndarray | Exception) -> Frame:
        stamp = time.monotonic_ns()
        if isinstance(item, Exception):
            return Frame(index, stamp, None, self.info, error=str(item) or repr(item))
        return Frame(index, stamp, item, self.info)

    def start(self) -> None:
        if not self.inline:
            super().start()
            return
        self._inline_frames = iter(self._decode())

    def read(self, timeout_s: float = 0.1) -> Frame | None:
        if self._inline_frames is None:
            return super().read(timeout_s)
        item = None if self._stop.is_set() else next(self._inline_frames, None)
        if item is None:
            self._slot.close()  # `ended` from now on
            self._inline_frames = iter(())
            return None
        frame = self._frame(self.frames_read, item)
        self.frames_read += 1
        return frame

    def _run(self) -> None:
        fps = self.info.fps or 0.0
        period_ns = int(1e9 / fps) if (self.pace and fps > 0) else 0
        frames = iter(self._decode())
        decode_ns = 0  # running estimate of one frame's decode time
        t0 = time.monotonic_ns()
        index = 0
        while not self._stop.is_set():
            due = t0 + self._offset_ns(index, period_ns)
            if period_ns and index:
                # A grabber delivers decoded frames without taking CPU from the loop; a file
                # must be decoded. Decode while the loop idles, or just in time if it never
                # does, so replaying does not slow the very processing it measures.
                self._slot.wait_consumer_idle(due - 2 * decode_ns, self._stop)
            start = time.monotonic_ns()
            item = next(frames, None)
            if item is None:
                return
            decode_ns = max(int(0.9 * decode_ns), time.monotonic_ns() - start)
            if period_ns:  # release it at the instant the grabber would have delivered it
                due = t0 + self._offset_ns(index, period_ns)  # a video's frame time: known now
                while (now := time.monotonic_ns()) < due:
                    if self._stop.wait((due - now) / 1e9):
                        return
            self._deliver(self._frame(index, item))
            index += 1
