"""Capture: one device interface (connect/start/read/stop), PLUS-style, with live, replay and
simulated implementations chosen by configuration. Capture knows nothing of the model.

Every frame carries its index, a monotonic capture time (ns) and the source's metadata.
"""

import os

# FFmpeg's own log lines (decoder warnings, refused connections) would bypass our one clear
# error line; the operator gets technical alerts instead. Overridable from the environment.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

from guidance.capture.base import Frame, Source, SourceInfo  # noqa: E402
from guidance.capture.factory import open_source  # noqa: E402

__all__ = ["Frame", "Source", "SourceInfo", "open_source"]
