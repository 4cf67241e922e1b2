"""Frame -> model input, and model output -> frame coordinates.

Shared by the runtime and by training (training imports this; never the other way), so the
model sees in the room exactly what it saw when it learnt.

Geometry: the frame is letterboxed (aspect kept, centred, padded) into the model's square
input. `LetterboxGeometry` maps between the two pixel frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("background", "vertebral_body", "cement", "needle")
BACKGROUND, VERTEBRAL_BODY, CEMENT, NEEDLE = range(4)

# Intensity normalisation the shipped model was trained with (also written into its metadata).
DEFAULT_NORMALIZATION = {"scheme": "percentile", "low": 1.0, "high": 99.5, "mean": 0.5, "std": 0.25}


@dataclass(frozen=True)
class LetterboxGeometry:
    """model_from_frame: x_model = x_frame * scale + pad_x (same for y)."""

    frame_height: int
    frame_width: int
    size: int
    scale: float
    pad_x: int
    pad_y: int

    @classmethod
    def fit(cls, frame_height: int, frame_width: int, size: int) -> LetterboxGeometry:
        scale = size / max(frame_height, frame_width)
        inner_h = max(1, round(frame_height * scale))
        inner_w = max(1, round(frame_width * scale))
        return cls(frame_height, frame_width, size, scale, (size - inner_w) // 2, (size - inner_h) // 2)

    @property
    def inner_shape(self) -> tuple[int, int]:
        return max(1, round(self.frame_height * self.scale)), max(1, round(self.frame_width * self.scale))

    def crop(self, model_plane: np.ndarray) -> np.ndarray:
        """The part of a model-resolution plane (..., size, size) that covers the frame."""
        h, w = self.inner_shape
        return model_plane[..., self.pad_y : self.pad_y + h, self.pad_x : self.pad_x + w]

    def frame_from_model_xy(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.pad_x + 0.5) / self.scale - 0.5, (y - self.pad_y + 0.5) / self.scale - 0.5

    def frame_pixels_per_model_pixel(self) -> float:
        return 1.0 / self.scale


def to_float_grey(frame: np.ndarray) -> np.ndarray:
    """Any 8-16 bit grey or BGR frame -> float32 grey, intensity range kept."""
    if frame.ndim == 3:
        if frame.shape[2] == 1:
            frame = frame[..., 0]
        else:
            frame = cv2.cvtColor(frame[..., :3], cv2.COLOR_BGR2GRAY)
    if frame.ndim != 2:
        raise ValueError(f"expected a 2-D grey or 3-channel frame, got shape {frame.shape}")
    return frame.astype(np.float32, copy=False)


def letterbox(frame: np.ndarray, geometry: LetterboxGeometry, pad_value: float = 0.0) -> np.ndarray:
    """Resize (area-averaging when shrinking) and pad into the square model plane."""
    h, w = geometry.inner_shape
    interp = cv2.INTER_AREA if geometry.scale < 1.0 else cv2.INTER_LINEAR
    inner = cv2.resize(frame, (w, h), interpolation=interp)
    out = np.full((geometry.size, geometry.size), pad_value, dtype=np.float32)
    out[geometry.pad_y : geometry.pad_y + h, geometry.pad_x : geometry.pad_x + w] = inner
    return out


def letterbox_labels(labels: np.ndarray, geometry: LetterboxGeometry) -> np.ndarray:
    """Class map -> model plane (nearest neighbour; padding is background)."""
    h, w = geometry.inner_shape
    inner = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
    out = np.zeros((geometry.size, geometry.size), dtype=labels.dtype)
    out[geometry.pad_y : geometry.pad_y + h, geometry.pad_x : geometry.pad_x + w] = inner
    return out


def normalize(plane: np.ndarray, valid: np.ndarray | None, normalization: dict) -> np.ndarray:
    """Percentile window over the valid pixels -> [0, 1] -> standardised. Polarity is kept:
    the model is trained on both bone-bright and bone-dark images."""
    if normalization.get("scheme") != "percentile":
        raise ValueError(f"unknown normalisation scheme {normalization.get('scheme')!r}")
    values = plane[valid] if valid is not None else plane.ravel()
    if values.size == 0:
        values = plane.ravel()
    lo, hi = np.percentile(values, [normalization["low"], normalization["high"]])
    span = float(hi - lo) if hi > lo else 1.0
    unit = np.clip((plane - lo) / span, 0.0, 1.0)
    return ((unit - normalization["mean"]) / normalization["std"]).astype(np.float32)


def preprocess(
    frame: np.ndarray, size: int, normalization: dict = DEFAULT_NORMALIZATION
) -> tuple[np.ndarray, LetterboxGeometry]:
    """Frame (H, W[, C]) of any integer depth -> model input (1, 1, size, size) float32."""
    grey = to_float_grey(frame)
    geometry = LetterboxGeometry.fit(grey.shape[0], grey.shape[1], size)
    plane = letterbox(grey, geometry)
    valid = np.zeros(plane.shape, dtype=bool)
    h, w = geometry.inner_shape
    valid[geometry.pad_y : geometry.pad_y + h, geometry.pad_x : geometry.pad_x + w] = True
    x = normalize(plane, valid, normalization)
    x[~valid] = (0.0 - normalization["mean"]) / normalization["std"]
    return x[None, None], geometry
