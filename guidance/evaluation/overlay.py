"""Overlay frames: masks coloured over the grey frame, the tracker's wall line and leaks
marked, flags and alerts written on it. Used for the overlay video (cv2.VideoWriter, mp4v)
and the report thumbnails."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from guidance.evaluation.scoring import labels_at_mask_resolution
from guidance.tracking import TrackStatus

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
    status: TrackStatus | None = None,
) -> np.ndarray:
    """BGR uint8 of `size` (h, w): frame, coloured classes, a flag bar and text lines; with the
    tracker's `status` (its masks and wall line are in `labels`' pixels), what it found."""
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
        if status is not None:
            draw_findings(out, status, labels.shape[:2])
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


LEAK_COLOURS = {"posterior": RED, "venous": BLUE}
WALL_COLOUR = (230, 230, 230)


def draw_findings(out: np.ndarray, status: TrackStatus, plane_shape: tuple[int, int]) -> None:
    """What the tracker saw, on the overlay `out` (class-map pixels scaled to its size): the
    posterior wall line it fitted (light grey, along the body), and each leak as it called it,
    its pixels in the kind's colour with a box around them so a speck is found at a glance.
    Everything is done on the masks' boxes: a leak is a few pixels of a large plane."""
    h, w = out.shape[:2]
    ph, pw = plane_shape
    sx, sy = w / pw, h / ph
    body = status.masks.get("body")
    if status.wall is not None and body is not None:
        u8 = np.ascontiguousarray(body).view(np.uint8)
        bx, by, bw, bh = cv2.boundingRect(u8)
        if bw:
            found = cv2.findContours(u8[by : by + bh, bx : bx + bw], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
            vx, vy, x0, y0 = status.wall[:4]
            # the wall's stretch along the body: its outline's extent along the line
            outline = np.concatenate(found).reshape(-1, 2).astype(np.float32) + (bx - x0, by - y0)
            along = outline @ np.float32([vx, vy])
            ends = [((x0 + vx * t + 0.5) * sx, (y0 + vy * t + 0.5) * sy) for t in (along.min(), along.max())]
            cv2.line(out, *[(round(x), round(y)) for x, y in ends], WALL_COLOUR, 1, cv2.LINE_AA)
    pad = max(4, round(3 * sx))
    for kind, colour in LEAK_COLOURS.items():
        mask = status.masks.get(kind)
        if mask is None:
            continue
        x, y, bw, bh = cv2.boundingRect(np.ascontiguousarray(mask).view(np.uint8))
        if not bw:
            continue
        # the overlay pixels whose nearest class-map pixel (as cv2.INTER_NEAREST picks it: the
        # floor of the scaled coordinate) lies in the mask's box
        x0, x1, y0, y1 = math.ceil(x * sx), math.ceil((x + bw) * sx), math.ceil(y * sy), math.ceil((y + bh) * sy)
        cols = np.minimum((np.arange(x0, x1) * (pw / w)).astype(np.intp), pw - 1)
        rows = np.minimum((np.arange(y0, y1) * (ph / h)).astype(np.intp), ph - 1)
        out[y0:y1, x0:x1][mask[np.ix_(rows, cols)]] = colour
        corner, far = (max(0, x0 - pad), max(0, y0 - pad)), (min(w - 1, x1 + pad), min(h - 1, y1 + pad))
        cv2.rectangle(out, corner, far, colour, 1)


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
