"""Source spec -> a connected Source, chosen by configuration (PLUS-style)."""

from __future__ import annotations

from pathlib import Path

from guidance.capture.base import Source
from guidance.capture.live import LiveSource
from guidance.capture.replay import (
    EXPECTED,
    VIDEO_SUFFIXES,
    DicomSource,
    PngFolderSource,
    VideoFileSource,
)
from guidance.capture.simulated import SimulatedSource
from guidance.errors import BadInputError

KINDS = ("auto", "live", "replay", "simulated")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def make_source(
    spec: str,
    kind: str = "auto",
    pace: bool = True,
    fps: float | None = None,
    reconnect_s: float = 0.5,
    inline: bool = False,
) -> Source:
    """Build (not connect) the source a spec names.

    spec: `simulated[:posterior|venous|clean]`, a device index (`0`), `/dev/videoN`, a URL
    (`rtsp://...`), a DICOM file, an MP4/AVI/MKV file or a folder of PNG frames.
    kind: `auto` (from the spec), `live` (e.g. a video file read as if it were a grabber),
    `replay` or `simulated`.
    inline: a recorded loop replayed lossless decodes on the caller's thread (ReplaySource).
    """
    if kind not in KINDS:
        raise BadInputError(f"capture kind {kind!r}: expected one of {', '.join(KINDS)}")
    spec = str(spec)
    if kind == "simulated" or spec.startswith("simulated"):
        leak = spec.partition(":")[2] or "posterior"
        return SimulatedSource(fps=fps or 15.0, leak=None if leak == "clean" else leak, pace=pace)
    if spec.isdigit():
        return LiveSource(int(spec), reconnect_s, fps)
    if "://" in spec or spec.startswith("/dev/video"):
        return LiveSource(spec, reconnect_s, fps)
    path = Path(spec)
    if not path.exists():
        raise BadInputError(f"{spec}: no such file or folder (expected {EXPECTED}, or a live device index or URL)")
    if kind == "live":
        return LiveSource(spec, reconnect_s, fps)
    if path.is_dir():
        return PngFolderSource(spec, pace, fps, inline)
    if _is_dicom(path):
        return DicomSource(spec, pace, fps, inline)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoFileSource(spec, pace, fps, inline)
    raise BadInputError(f"{spec}: unknown file type {path.suffix or '(none)'} (expected {EXPECTED})")


def open_source(
    spec: str,
    kind: str = "auto",
    pace: bool = True,
    fps: float | None = None,
    reconnect_s: float = 0.5,
    inline: bool = False,
) -> Source:
    """make_source() and connect(): BadInputError naming the source when it is unusable."""
    source = make_source(spec, kind, pace, fps, reconnect_s, inline)
    try:
        source.connect()
    except BadInputError:
        raise
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{spec}: cannot be read ({exc}); expected {EXPECTED}") from None
    return source
