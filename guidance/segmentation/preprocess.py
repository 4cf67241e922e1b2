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
        single = frame.shape[2] == 1
        frame = frame[..., 0] if single else cv2.cvtColor(frame[..., :3], cv2.COLOR_BGR2GRAY)
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


# Area-majority label downsampling breaks ties (a boundary exactly mid-block) in this order:
# the needle, then bone (a cortical rim half a block thick stays between cement and the world
# outside, as it is at frame resolution), then cement (a vein half a block wide stays), then
# background. Only exact ties: the weights differ by far less than one pixel's share.
TIE_PRIORITY = {NEEDLE: 3e-6, VERTEBRAL_BODY: 2e-6, CEMENT: 1e-6}


def letterbox_shares(labels: np.ndarray, geometry: LetterboxGeometry, classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Class map -> [classes, size, size] float32 on the model plane: the share of each model
    pixel's block of frame pixels that each class covers (padding: all background). Soft
    training targets: a model that learns them places a boundary inside its pixel, and its
    class planes, resized back to the frame, put the boundary there (a perfect model of these
    scores cement Dice 0.99 at frame resolution, of letterbox_labels' hard ones 0.96;
    bench/label_ceiling.py)."""
    h, w = geometry.inner_shape
    out = np.zeros((classes, geometry.size, geometry.size), np.float32)
    out[BACKGROUND] = 1.0
    inner = (slice(geometry.pad_y, geometry.pad_y + h), slice(geometry.pad_x, geometry.pad_x + w))
    for c in range(classes):
        mask = labels == c
        if c and not mask.any():
            continue  # an absent class's share stays 0
        out[(c, *inner)] = cv2.resize(mask.view(np.uint8).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return out


def majority_labels(shares: np.ndarray, dtype: np.dtype = np.uint8) -> np.ndarray:
    """Class shares [classes, size, size] (letterbox_shares) -> the majority class per pixel,
    exact ties by TIE_PRIORITY."""
    shares = shares.copy()
    for c, bonus in TIE_PRIORITY.items():
        shares[c] += bonus * (shares[c] > 0)
    return np.argmax(shares, axis=0).astype(dtype)


def letterbox_labels(labels: np.ndarray, geometry: LetterboxGeometry) -> np.ndarray:
    """Class map -> model plane: each model pixel takes the class covering most of its block of
    frame pixels (letterbox_shares, ties by TIE_PRIORITY); padding is background.

    Not cv2.INTER_NEAREST: that samples each block's top-left pixel, which moves every
    boundary by (f - 1) / 2 frame pixels (1.5 px at 1024 -> 256) against the area-averaged
    image. A perfect model of such labels scores cement Dice 0.93 at frame resolution (this
    rule: 0.96; bench/label_ceiling.py), and flipped training crops disagree about the shift."""
    classes = max(int(labels.max()) + 1 if labels.size else 1, len(CLASS_NAMES))
    return majority_labels(letterbox_shares(labels, geometry, classes), labels.dtype)


def _order_statistics(values: np.ndarray, ranks: list[int]) -> np.ndarray:
    """values sorted ascending, at `ranks` (exact). A strided sample bounds each tail, so only
    the few values beyond the bound are partitioned instead of the whole plane (~5x faster on
    a 256x256 plane); any doubt falls back to one full partition."""
    n = values.size
    if values.dtype in (np.uint8, np.uint16) and n >= 8192:
        # integers of a small range: a histogram's running count finds them in one pass
        cumulative = np.cumsum(np.bincount(values))
        return np.searchsorted(cumulative, np.asarray(ranks) + 1).astype(values.dtype)
    if n < 8192:
        return np.partition(values, ranks)[ranks]
    step = n // 2048
    sample = np.sort(values[::step])
    m = sample.size
    out = np.empty(len(ranks), values.dtype)
    for i, k in enumerate(ranks):
        if k < n // 2:  # low tail: everything <= t, where t surely ranks above k
            j = min(m - 1, (k // step) * 2 + 16)
            t = sample[j]
            sub = values[values <= t]
            if sub.size > k:
                out[i] = np.partition(sub, k)[k]
                continue
        else:  # high tail: everything >= t, where t surely ranks below k
            j = max(0, m - 1 - ((n - 1 - k) // step) * 2 - 16)
            t = sample[j]
            sub = values[values >= t]
            offset = n - sub.size  # values below t
            if offset <= k:
                out[i] = np.partition(sub, k - offset)[k - offset]
                continue
        out[i] = np.partition(values, k)[k]
    return out


def percentile_window(values: np.ndarray, low: float, high: float, divisor: int = 1) -> tuple[float, float]:
    """np.percentile(values, [low, high]) (linear method), bit for bit, without partitioning
    the whole array (tests compare it with numpy's on many planes). With `divisor`, `values`
    are integers standing for the float32 values `values / divisor` (a power of two: exact)."""
    values = np.ravel(values)
    n = values.size
    pos = (n - 1) * (np.asarray([low, high], np.float64) / 100)
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    ranks = sorted({*below.tolist(), *above.tolist()})
    lookup = dict(zip(ranks, _order_statistics(values, ranks), strict=True))
    result = []
    for p_, k0, k1 in zip(pos, below, above, strict=True):
        a, b = lookup[int(k0)], lookup[int(k1)]
        if divisor != 1:
            a, b = np.float32(a) / np.float32(divisor), np.float32(b) / np.float32(divisor)
        gamma = p_ - k0
        diff = b - a  # in the values' dtype, as numpy's _lerp does
        value = b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma
        result.append(np.float64(value))
    return result[0], result[1]


def _standardise(values: np.ndarray, lo: float, hi: float, normalization: dict) -> np.ndarray:
    """[lo, hi] -> [0, 1] (clipped) -> (x - mean) / std, in float64 as always, then float32."""
    span = float(hi - lo) if hi > lo else 1.0
    # the same operations in the same (float64) precision, in place: no temporaries
    t = np.subtract(values, lo)
    np.divide(t, span, out=t)
    np.clip(t, 0.0, 1.0, out=t)
    np.subtract(t, normalization["mean"], out=t)
    np.divide(t, normalization["std"], out=t)
    return t.astype(np.float32)


def normalize(plane: np.ndarray, valid: np.ndarray | None, normalization: dict) -> np.ndarray:
    """Percentile window over the valid pixels -> [0, 1] -> standardised. Polarity is kept:
    the model is trained on both bone-bright and bone-dark images."""
    if normalization.get("scheme") != "percentile":
        raise ValueError(f"unknown normalisation scheme {normalization.get('scheme')!r}")
    values = plane[valid] if valid is not None else plane.ravel()
    if values.size == 0:
        values = plane.ravel()
    lo, hi = percentile_window(values, normalization["low"], normalization["high"])
    return _standardise(plane, lo, hi, normalization)


_POW2_FACTORS = {2: 2, 4: 4, 8: 6, 16: 8}  # downscale factor -> log2 of its block area


def _block_sums(frame: np.ndarray, geometry: LetterboxGeometry) -> tuple[np.ndarray, int] | None:
    """An 8-bit grey frame shrunk by a power-of-two factor (1024 -> 256): the integer sums of
    its blocks, which stand exactly for the float area-average (sum / area, area a power of
    two). None when the frame is not such a case."""
    if frame.dtype != np.uint8 or frame.ndim != 2:
        return None
    h, w = geometry.inner_shape
    f = frame.shape[0] // h
    if frame.shape != (h * f, w * f) or f not in _POW2_FACTORS:
        return None
    # area-averaging area * v gives sum(v) exactly (an integer: no rounding to do). Done as
    # halvings: OpenCV's 2x2 area path is vectorised, its general one is not (0.2 against
    # 0.9 ms at 1024 -> 256 here). Still exact: before each halving every value is a multiple
    # of 4 (the shift put 4 ** halvings into each), so the mean of 4 drops no remainder.
    blocks = np.left_shift(frame, _POW2_FACTORS[f], dtype=np.uint16)
    while blocks.shape[0] > h:
        blocks = cv2.resize(blocks, (blocks.shape[1] // 2, blocks.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return blocks, f * f


def preprocess(
    frame: np.ndarray, size: int, normalization: dict = DEFAULT_NORMALIZATION
) -> tuple[np.ndarray, LetterboxGeometry]:
    """Frame (H, W[, C]) of any integer depth -> model input (1, 1, size, size) float32."""
    if normalization.get("scheme") != "percentile":
        raise ValueError(f"unknown normalisation scheme {normalization.get('scheme')!r}")
    if frame.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D grey or 3-channel frame, got shape {frame.shape}")
    geometry = LetterboxGeometry.fit(frame.shape[0], frame.shape[1], size)
    h, w = geometry.inner_shape
    inner_slice = (slice(geometry.pad_y, geometry.pad_y + h), slice(geometry.pad_x, geometry.pad_x + w))
    # the window is computed over the frame area only and padding gets the value of black
    x = np.full((size, size), (0.0 - normalization["mean"]) / normalization["std"], np.float32)
    blocks = _block_sums(frame, geometry)
    if blocks is not None:
        # fast path, same bits: the plane takes few distinct values (sum / area), so they are
        # standardised once each (a lookup table) instead of once per pixel
        sums, area = blocks
        lo, hi = percentile_window(sums, normalization["low"], normalization["high"], area)
        levels = np.arange(255 * area + 1, dtype=np.float32) / np.float32(area)
        x[inner_slice] = np.take(_standardise(levels, lo, hi, normalization), sums)
        return x[None, None], geometry
    plane = letterbox(to_float_grey(frame), geometry)
    x[inner_slice] = normalize(plane[inner_slice], None, normalization)
    return x[None, None], geometry
