"""Capture: one device interface (connect/start/read/stop), PLUS-style, with live, replay and
simulated implementations chosen by configuration. Capture knows nothing of the model.

Every frame carries its index, a monotonic capture time (ns) and the source's metadata.
"""

from guidance.capture.base import Frame, Source, SourceInfo
from guidance.capture.factory import open_source

__all__ = ["Frame", "Source", "SourceInfo", "open_source"]
