"""Live video: a frame grabber on the C-arm's video output (device index or /dev/videoN), a
video file opened as if live, or a stream URL that OpenCV's FFmpeg opens (udp://, rtsp://,
http://). A reader thread keeps only the newest frame; every frame it replaces unread is
counted as dropped. When the video stops, the reader reopens the device until it returns."""

from __future__ import annotations

import time

import cv2

from guidance.capture.base import Frame, Source, SourceInfo, quiet_opencv, to_grey
from guidance.errors import BadInputError

EXPECTED = "a capture device index, a /dev/video device, a video path or a stream URL"


class LiveSource(Source):
    def __init__(self, target: str | int, reconnect_s: float = 0.5, fps: float | None = None) -> None:
        super().__init__(lossy=True)
        self.target = target
        self.reconnect_s = reconnect_s
        self._fps_override = fps
        self._cap: cv2.VideoCapture | None = None
        self.reconnects = 0

    def _open(self) -> cv2.VideoCapture | None:
        # one decoding thread for a stream: FFmpeg's frame threading holds back a frame per
        # extra thread (33 ms each at 30 fps), latency that starts before the capture stamp
        cap = (
            cv2.VideoCapture(self.target)
            if isinstance(self.target, int)
            else cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
        )
        if not cap.isOpened():
            cap.release()
            return None
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not the driver's queue (where honoured)
        return cap

    def connect(self) -> SourceInfo:
        with quiet_opencv():
            cap = self._open()
        if cap is None:
            raise BadInputError(f"{self.target}: cannot open live video (expected {EXPECTED})")
        self._cap = cap
        self.connected = True
        fps = self._fps_override or (cap.get(cv2.CAP_PROP_FPS) or None)
        self.info = SourceInfo(
            name=str(self.target),
            kind="live",
            fps=fps,
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) or None,
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) or None,
        )
        return self.info

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            cap = self._cap
            ok, image = cap.read() if cap is not None else (False, None)
            stamp = time.monotonic_ns()  # the frame exists from here on
            if ok and image is not None:
                self.connected = True
                # after the stamp: converting a colour grabber's output counts as latency
                self._deliver(Frame(index, stamp, to_grey(image), self.info))
                index += 1
                continue
            # video lost: the loop notices the silence and raises `video_lost`; keep reopening
            self.connected = False
            if cap is not None:
                cap.release()
                self._cap = None
            if self._stop.wait(self.reconnect_s):
                return
            self._cap = self._open()
            if self._cap is not None:
                self.reconnects += 1

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
