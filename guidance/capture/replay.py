"""Recorded loops (../shared/spec/recorded-loops.md): DICOM, MP4/AVI/MKV, PNG folders."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from guidance.capture.base import ReplaySource, SourceInfo, quiet_opencv, to_grey
from guidance.errors import BadInputError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv")
EXPECTED = "a DICOM file, an MP4/AVI/MKV video or a folder of 000000.png frames"
LUMA_TOLERANCE = 3  # grey levels the luma fast path may differ from the BGR decode's grey
# a longer gap between a video's frame timestamps is taken for a broken timestamp, not a pause
MAX_TIMESTAMP_GAP_NS = 10_000_000_000


def sidecar_metadata(path: Path) -> dict:
    """Acquisition metadata from `NAME.labels.json` next to a loop (fps, pixel spacing,
    posterior side, view): a recorder writes them beside the video when the video cannot carry
    them. Events and masks are ground truth and never read here."""
    base = path if path.is_dir() else path.with_suffix("")
    labels = base.parent / (base.name + ".labels.json")
    if not labels.is_file():
        return {}
    try:
        data = json.loads(labels.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{labels}: unreadable labels sidecar ({exc})") from None
    keep = ("fps", "pixel_spacing_mm", "posterior_side", "view")
    return {k: data[k] for k in keep if data.get(k) is not None}


def open_video_file(path: Path) -> cv2.VideoCapture:
    """FFmpeg on a video file, its decoder given OpenCV's thread budget (cv2.setNumThreads).

    Left to itself FFmpeg starts a decoding thread per CPU it can see, whatever OpenCV was
    told: an evaluation worker meant to use one core then runs three more threads, and two
    such workers on two cores take turns with each other's decoders. (At most 16, as FFmpeg's
    own automatic choice: more decoding threads than that only add frames of delay.)"""
    threads = max(1, min(cv2.getNumThreads(), 16))
    return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])


class VideoFileSource(ReplaySource):
    """MP4/AVI/MKV through OpenCV's FFmpeg backend.

    Paced replay follows the video's own frame timestamps (a recorder that writes variable
    timing, pulsed fluoroscopy's uneven gaps), as each frame is decoded, unless an fps is given
    (`--fps`, or the labels sidecar: a recording that needs one does not carry its timing).
    Timestamps that go backwards, repeat or jump by more than MAX_TIMESTAMP_GAP_NS are broken:
    from there on the loop keeps its frame rate."""

    def connect(self) -> SourceInfo:
        path = Path(self.path)
        if not path.is_file():
            raise BadInputError(f"{path}: no such file (expected {EXPECTED})")
        with quiet_opencv():
            cap = open_video_file(path)
            ok, first = cap.read() if cap.isOpened() else (False, None)
        if not ok or first is None:
            cap.release()
            raise BadInputError(f"{path}: not a video OpenCV can decode (expected {EXPECTED})")
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        side = sidecar_metadata(path)
        fps = self._fps_override or side.get("fps") or (cap.get(cv2.CAP_PROP_FPS) or None)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        self._cap, self._luma_to_grey = cap, None
        # its own frame times, when pacing and nothing overrides them (recorded as decoded)
        self._timestamps = self.pace and not (self._fps_override or side.get("fps"))
        self._first_ms: float | None = None
        self.frame_offsets_ns = [] if self._timestamps else None
        luma = self._open_luma(path, to_grey(first))
        if luma is not None:  # the same grey for less: FFmpeg's luma plane, no BGR in between
            cap.release()
            self._cap, self._luma_to_grey = luma
        self.info = SourceInfo(
            name=str(path),
            kind="replay",
            fps=fps,
            width=first.shape[1],
            height=first.shape[0],
            pixel_spacing_mm=side.get("pixel_spacing_mm"),
            posterior_side=side.get("posterior_side"),
            view=side.get("view"),
            frame_count=count if count and count > 0 else None,
            extra={
                "decode": "luma" if self._luma_to_grey is not None else "bgr",
                "timing": "video timestamps" if self._timestamps else "fps",
            },
        )
        return self.info

    @staticmethod
    def _open_luma(path: Path, grey: np.ndarray) -> tuple[cv2.VideoCapture, np.ndarray] | None:
        """The video opened without colour conversion, and the lookup table that takes its
        luma plane to the grey of the BGR decode, when the first frame shows that one exists.

        Decoding to BGR and back to grey costs about 40 % more than the decode itself on a
        1024² frame. Grey video's luma is that grey up to the video's range (16-235 or 0-255)
        and rounding: the table is the linear fit over the first frame's pixels, used only when
        it lands within LUMA_TOLERANCE grey levels of every pixel. Otherwise (another pixel
        format, a colour matrix that differs, a flat first frame) the BGR decode stays."""
        with quiet_opencv():
            cap = open_video_file(path)
            cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)
            ok, luma = cap.read() if cap.isOpened() else (False, None)
        if not ok or luma is None or luma.dtype != np.uint8 or luma.shape != grey.shape or grey.dtype != np.uint8:
            cap.release()
            return None
        # least squares g = slope * y + offset over the pixels, from their joint histogram (the
        # pixels take at most 256 x 256 value pairs: np.polyfit on a megapixel took ~0.1 s)
        pairs = np.bincount((luma.astype(np.int32) << 8 | grey).ravel(), minlength=65536).astype(np.float64)
        pairs = pairs.reshape(256, 256)  # [luma, grey]
        levels = np.arange(256, dtype=np.float64)
        n, per_luma, per_grey = pairs.sum(), pairs.sum(axis=1), pairs.sum(axis=0)
        used = np.flatnonzero(per_luma)
        if used[-1] - used[0] < 32:  # too little range to fit a line through
            cap.release()
            return None
        mean_y, mean_g = per_luma @ levels / n, per_grey @ levels / n
        var_y = per_luma @ (levels - mean_y) ** 2
        cov = (levels - mean_y) @ pairs @ (levels - mean_g)
        slope = cov / var_y
        offset = mean_g - slope * mean_y
        table = np.clip(np.round(slope * np.arange(256) + offset), 0, 255).astype(np.uint8)
        if np.abs(table[luma].astype(np.int16) - grey).max() > LUMA_TOLERANCE:
            cap.release()
            return None
        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        return cap, table

    def _decode(self) -> Iterator[np.ndarray | Exception]:
        table = self._luma_to_grey
        while True:
            if table is None:
                ok, image = self._cap.read()
            else:
                with quiet_opencv():  # OpenCV warns on every such read that it takes the luma plane
                    ok, image = self._cap.read()
            if not ok:
                return  # FFmpeg skips undecodable packets itself; a read failure is the end
            if self._timestamps:
                self._record_time(self._cap.get(cv2.CAP_PROP_POS_MSEC))
            # the spec: colour video is converted to grey (the luma plane already is)
            yield to_grey(image) if table is None else cv2.LUT(image, table)

    def _record_time(self, stamp_ms: float) -> None:
        """The decoded frame's time from the first frame's, while the video's timestamps hold."""
        offsets = self.frame_offsets_ns
        if self._first_ms is None:
            self._first_ms = stamp_ms
            offsets.append(0)
            return
        last = offsets[-1]
        offset = int(round((stamp_ms - self._first_ms) * 1e6))
        if last < offset <= last + MAX_TIMESTAMP_GAP_NS:
            offsets.append(offset)
            return
        # broken (backwards, repeated, a jump): this frame and the rest one frame period apart
        self._timestamps = False
        self.info.extra["timing"] = f"video timestamps to frame {len(offsets) - 1}, then fps"
        offsets.append(last + (int(1e9 / self.info.fps) if self.info.fps else 0))

    def _release(self) -> None:
        cap = getattr(self, "_cap", None)
        if cap is not None:
            cap.release()


class PngFolderSource(ReplaySource):
    """A folder of 000000.png, 000001.png, ... (8- or 16-bit grey)."""

    def connect(self) -> SourceInfo:
        path = Path(self.path)
        self._files = sorted(p for p in path.iterdir() if re.fullmatch(r"\d+\.png", p.name))
        if not self._files:
            raise BadInputError(f"{path}: folder holds no 000000.png frames (expected {EXPECTED})")
        with quiet_opencv():
            first = cv2.imread(str(self._files[0]), cv2.IMREAD_UNCHANGED)
        if first is None:
            raise BadInputError(f"{self._files[0]}: not a PNG frame OpenCV can read")
        side = sidecar_metadata(path)
        self.info = SourceInfo(
            name=str(path),
            kind="replay",
            fps=self._fps_override or side.get("fps"),
            width=first.shape[1],
            height=first.shape[0],
            pixel_spacing_mm=side.get("pixel_spacing_mm"),
            posterior_side=side.get("posterior_side"),
            view=side.get("view"),
            frame_count=len(self._files),
        )
        return self.info

    def _decode(self) -> Iterator[np.ndarray | Exception]:
        for file in self._files:
            with quiet_opencv():  # a bad frame becomes a frame_error alert, not a stray line
                image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
            if image is None:
                yield ValueError(f"{file.name}: unreadable PNG frame")
            else:
                yield to_grey(image)


class DicomSource(ReplaySource):
    """DICOM single- or multi-frame, MONOCHROME1/2 (or colour, converted to grey), 8-16 bits,
    any transfer syntax pydicom's decoders handle. Frames are decoded one at a time, so a
    long cine costs one frame of memory and a corrupt frame costs only itself."""

    def connect(self) -> SourceInfo:
        import pydicom  # only DICOM loops pay for it
        from pydicom.errors import InvalidDicomError

        path = Path(self.path)
        try:
            ds = pydicom.dcmread(str(path), defer_size="1 KB")  # pixel data read per frame
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise BadInputError(f"{path}: not a readable DICOM file ({exc}); expected {EXPECTED}") from None
        if "PixelData" not in ds:
            raise BadInputError(f"{path}: DICOM without pixel data (expected an image or cine)")
        self._ds = ds
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        fps = self._fps_override
        offsets_ms = None if fps else dicom_frame_offsets_ms(ds, frames)
        if offsets_ms is not None:
            self.frame_offsets_ns = [int(round(t * 1e6)) for t in offsets_ms]
        if fps is None and getattr(ds, "FrameTime", None):
            fps = 1000.0 / float(ds.FrameTime)
        if fps is None and getattr(ds, "CineRate", None):
            fps = float(ds.CineRate)
        if fps is None and getattr(ds, "RecommendedDisplayFrameRate", None):
            fps = float(ds.RecommendedDisplayFrameRate)
        if fps is None and offsets_ms is not None and offsets_ms[-1] > 0:
            fps = (frames - 1) * 1000.0 / offsets_ms[-1]  # the mean rate of the recorded times
        side = sidecar_metadata(path)
        self.info = SourceInfo(
            name=str(path),
            kind="replay",
            fps=fps or side.get("fps"),
            width=int(ds.Columns),
            height=int(ds.Rows),
            pixel_spacing_mm=dicom_pixel_spacing(ds) or side.get("pixel_spacing_mm"),
            posterior_side=side.get("posterior_side"),
            view=dicom_view(ds) or side.get("view"),
            frame_count=frames,
            extra={
                "photometric": str(ds.get("PhotometricInterpretation", "")),
                "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
                "timing": "Frame Time Vector" if offsets_ms is not None else "fps",
            },
        )
        # decode the first frame now, so an undecodable syntax is refused before the loop starts
        first = next(self._decode(limit=1))
        if isinstance(first, Exception):
            raise BadInputError(f"{path}: cannot decode DICOM pixel data ({first})")
        return self.info

    def _decode(self, limit: int | None = None) -> Iterator[np.ndarray | Exception]:
        from pydicom.pixels import iter_pixels

        ds = self._ds
        count = self.info.frame_count or 1
        end = count if limit is None else min(limit, count)
        index = 0
        while index < end:
            # from the file, one frame at a time (a long cine never sits in memory whole), the
            # dataset parsed once per pass rather than once per frame (1.8 -> 0.7 ms a 1024 px
            # 16-bit frame). A decoder failure ends a pass: that frame is reported and the
            # next pass starts after it, so a corrupt frame costs only itself.
            try:
                for image in iter_pixels(str(self.path), indices=range(index, end)):
                    grey = dicom_to_grey(image, ds)
                    index += 1
                    yield grey
            except Exception as exc:  # any decoder failure is one bad frame, not the end  # noqa: BLE001
                yield ValueError(f"DICOM frame {index}: {exc}")
                index += 1


# View Position (0018,5101): which way the beam crossed the patient
_LATERAL_POSITIONS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
_AP_POSITIONS = {"AP", "PA"}


def dicom_frame_offsets_ms(ds, frames: int) -> list[float] | None:
    """Each frame's time from the first (ms), from the Frame Time Vector (0018,1065): the
    increments between frames as acquired, the first 0. None when absent, or when it does not
    fit the frames (wrong length, negative or not a number): then the frame rate paces."""
    vector = ds.get("FrameTimeVector")
    if vector is None or frames < 2:
        return None
    try:
        values = list(vector) if hasattr(vector, "__iter__") and not isinstance(vector, str) else [vector]
        steps = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if len(steps) != frames or not all(math.isfinite(v) and v >= 0 for v in steps):
        return None
    return list(itertools.accumulate(steps[1:], initial=0.0))


def dicom_view(ds) -> str | None:
    """'lateral' or 'ap' from the DICOM View Position, None when it does not say."""
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if position in _LATERAL_POSITIONS:
        return "lateral"
    if position in _AP_POSITIONS:
        return "ap"
    return None


def dicom_pixel_spacing(ds) -> float | None:
    """mm per pixel at the object: Pixel Spacing, else Imager Pixel Spacing corrected by the
    estimated radiographic magnification."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value:
            spacing = float(value[0])
            if keyword == "ImagerPixelSpacing" and ds.get("EstimatedRadiographicMagnificationFactor"):
                spacing /= float(ds.EstimatedRadiographicMagnificationFactor)
            return spacing if spacing > 0 else None
    return None


def dicom_to_grey(image: np.ndarray, ds) -> np.ndarray:
    """Decoded pixels -> unsigned grey, bright = more attenuating as MONOCHROME2 displays it."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if image.ndim == 3:  # colour secondary capture (pydicom returns RGB)
        image = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    bits = int(ds.get("BitsStored", 8 * image.dtype.itemsize))
    if image.dtype.kind == "i":  # signed storage: shift to unsigned, order kept
        image = (image.astype(np.int32) + (1 << (bits - 1))).astype(np.uint16)
    if photometric == "MONOCHROME1":  # minimum is white: invert within the stored range
        image = ((1 << bits) - 1 - image.astype(np.int32)).clip(0, None)
    dtype = np.uint8 if bits <= 8 else np.uint16
    return image.astype(dtype, copy=False)
