"""Overlay frames: masks coloured over the grey frame, flags and alerts written on it.
Used for the overlay video (cv2.VideoWriter, mp4v) and the report thumbnails."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from guidance.evaluation.scoring import labels_at_mask_resolution

# BGR, per class id: vertebral body green, cement yellow, needle cyan
CLASS_COLOURS = np.array([[0, 0, 0], [80, 200, 60], [0, 220, 255], [255, 200, 0]], dtype=np.float32)
ALPHA = 0.40
_COLOUR_LUT = np.zeros((1, 256, 3), np.uint8)
_COLOUR_LUT[0, :4] = CLASS_COLOURS.astype(np.uint8)
RED = (40, 40, 255)
BLUE = (255, 120, 40)
WHITE = (255, 255, 255)


def display_grey(image: np.ndarray) -> np.ndarray:
    """Any grey frame (8/16-bit or float) -> uint8 for display (1..99.5 percentile window)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY) if image.shape[2] >= 3 else image[..., 0]
    if image.dtype == np.uint8:
        return image
    lo, hi = np.percentile(image[:: max(1, image.shape[0] // 128), :: max(1, image.shape[1] // 128)], [1, 99.5])
    span = float(hi - lo) if hi > lo else 1.0
    if image.dtype == np.uint16:
        # in OpenCV, saturating: the subtraction stops at 0 and the scaling at 255 (the clip)
        return cv2.convertScaleAbs(cv2.subtract(image, float(lo)), alpha=255.0 / span)
    img = image.astype(np.float32, copy=False)
    return np.clip((img - lo) * (255.0 / span), 0, 255).astype(np.uint8)


def fit_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    # even sizes: mp4 encoders want them
    return max(2, int(round(height * scale)) // 2 * 2), max(2, int(round(width * scale)) // 2 * 2)


def render(
    image: np.ndarray,
    labels: np.ndarray | None,
    size: tuple[int, int],
    flags: dict,
    lines: list[tuple[str, tuple[int, int, int]]],
) -> np.ndarray:
    """BGR uint8 of `size` (h, w): frame, coloured classes, a flag bar and text lines."""
    h, w = size
    if image.shape[:2] != (h, w):
        # scaled down first: windowing a 16-bit 1024 px frame at full size cost 6-11 ms a
        # frame, more than the model; its display window is the same within a grey level
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    grey = display_grey(image)
    out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    if labels is not None:
        small = labels.astype(np.uint8, copy=False)
        lab = labels_at_mask_resolution(small, h, w)
        # colour by table lookup and blend in C: this runs on every frame of every loop. The
        # lookup is done on the class map before it is scaled up (the same pixels: a lookup
        # commutes with nearest-neighbour scaling), a quarter of the work at 256 -> 512
        colour = _nearest(cv2.LUT(cv2.merge([small, small, small]), _COLOUR_LUT), h, w)
        blended = cv2.addWeighted(out, 1.0 - ALPHA, colour, ALPHA, 0.0)
        cv2.copyTo(blended, lab, out)  # only where a class is (mask: lab != 0)
    scale = max(0.35, h / 900)
    thick = 1 if h < 700 else 2
    bar = max(12, int(22 * scale / 0.6))
    if flags.get("posterior"):
        cv2.rectangle(out, (0, 0), (w // 2 - 1, bar), RED, -1)
        cv2.putText(out, "POSTERIOR", (4, bar - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, WHITE, thick)
    if flags.get("venous"):
        cv2.rectangle(out, (w // 2, 0), (w - 1, bar), BLUE, -1)
        cv2.putText(out, "VENOUS", (w // 2 + 4, bar - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, WHITE, thick)
    y = bar + int(18 * scale / 0.5)
    if lines:  # one dark box behind all lines, one putText per line (text is costly)
        step = int(20 * scale / 0.5)
        cv2.rectangle(out, (0, bar + 2), (int(w * 0.6), y + step * (len(lines) - 1) + 6), (0, 0, 0), -1)
    for text, colour in lines:
        cv2.putText(out, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick)
        y += int(20 * scale / 0.5)
    return out


def _nearest(plane: np.ndarray, h: int, w: int) -> np.ndarray:
    if plane.shape[:2] == (h, w):
        return plane
    return cv2.resize(plane, (w, h), interpolation=cv2.INTER_NEAREST)


def skipped_frame(size: tuple[int, int], index: int) -> np.ndarray:
    """A dark frame that keeps the video in step with the loop where the pipeline skipped one."""
    h, w = size
    out = np.full((h, w, 3), 40, np.uint8)
    scale = max(0.35, h / 900)
    cv2.putText(
        out, f"frame {index}: skipped by the pipeline", (4, h // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 200, 255), 1
    )
    return out


class OverlayVideo:
    """mp4v writer; opened on the first frame (its size is known only then)."""

    def __init__(self, path: Path, fps: float, max_side: int) -> None:
        self.path = path
        self.fps = fps
        self.max_side = max_side
        self.writer: cv2.VideoWriter | None = None
        self.frames = 0

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        return fit_size(height, width, self.max_side)

    def write(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            h, w = bgr.shape[:2]
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h), True)
            if not self.writer.isOpened():
                raise OSError(f"cannot open an mp4v video writer for {self.path}")
        self.writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None


def png_base64(bgr: np.ndarray, max_side: int = 192) -> str:
    import base64

    h, w = bgr.shape[:2]
    th, tw = fit_size(h, w, max_side)
    small = cv2.resize(bgr, (tw, th), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", small)
    if not ok:
        raise ValueError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")
