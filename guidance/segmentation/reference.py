"""The reference frame a two-channel model reads beside each frame: the first frame of the
current scene, preprocessed like the frame.

Registered onto each frame before use (phase correlation: breathing and small motion shift
the spine between the first frame and later ones, and a misregistered reference reads as new
density along every bone edge). Taken from the first frame after start, and taken again when
the frame size changes or when the scene no longer resembles it even registered (the C-arm was
moved or rotated): then the frame itself becomes the reference. Cement growing in a still
scene changes a small share of the image and keeps the correlation high; a new view does not.
After a video loss nothing is forgotten: if the view is the same when the video comes back,
its pre-cement reference is still the right one, and if it is not, the correlation says so.
A flat frame (X-ray off) never replaces a reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SCENE_PLANE = 64  # side of the downsampled planes compared for a scene change
# Simulated loops spanning 0.7-10 s (tests/test_service_reference.py): a frame against its own
# loop's registered first frame correlates 0.92 or more through the injection; another loop's
# scene, registered as well as it goes, 0.75 at most (0.46 at the 95th percentile).


def _scene_vector(x: np.ndarray) -> np.ndarray:
    """A model input (…, S, S) -> its SCENE_PLANE² downsample, zero-mean, unit-norm (all zero
    when flat: a blank frame resembles nothing)."""
    plane = np.ascontiguousarray(x.reshape(x.shape[-2:]), dtype=np.float32)
    v = cv2.resize(plane, (SCENE_PLANE, SCENE_PLANE), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    v -= v.mean()
    norm = float(np.sqrt(v @ v))
    return v / norm if norm > 1e-9 else np.zeros_like(v)


REGISTER_PLANE = 128  # side of the planes whose phase correlation gives the reference's shift
_windows: dict[int, np.ndarray] = {}  # Hanning windows by side (made once)

FILL_DOWN = 4  # the fill is made at 1/4 of the registration plane (32 px): smooth, cheap
_OPEN = np.ones((5, 5), np.uint8)  # a flat region narrower than this (a dark needle) stays
_GROW = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))  # and the dim rim beside it goes


def _flat_floor(plane: np.ndarray) -> np.ndarray:
    """uint8 mask of the plane's flat floor: the pixels at its minimum, in regions wider than a
    needle (outside a circular field of view, letterbox padding)."""
    floor = float(plane.min())
    return cv2.morphologyEx((plane <= floor + 1e-3).view(np.uint8), cv2.MORPH_OPEN, _OPEN)


def _without_flat_floor(plane: np.ndarray) -> np.ndarray:
    """The plane with its flat floor (outside a circular field of view, letterbox padding) and
    the rim beside it filled smoothly from the pixels around them.

    Both are fixed in the image while the anatomy moves, and their sharp border outweighs the
    anatomy in phase correlation: unfilled, 29 % of held-out frames with a circular field
    registered more than 1 px off (stuck near zero shift); filled, 2 %."""
    flat = _flat_floor(plane)
    if not flat.any():
        return plane
    flat = cv2.dilate(flat, _GROW).astype(bool)
    keep = (~flat).astype(np.float32)
    # normalised convolution, coarse (the fill only has to be smooth): (plane * keep) and keep
    # taken down by FILL_DOWN, box-blurred twice (near-Gaussian), divided, brought back up
    h, w = plane.shape
    small = (max(1, w // FILL_DOWN), max(1, h // FILL_DOWN))
    both = cv2.resize(cv2.merge([plane * keep, keep]), small, interpolation=cv2.INTER_AREA)
    both = cv2.blur(cv2.blur(both, (3, 3)), (3, 3))
    total = float(keep.sum())
    mean = float((plane * keep).sum()) / total if total else 0.0  # where the blur reaches nothing
    fill = np.where(both[..., 1] > 1e-3, both[..., 0] / np.maximum(both[..., 1], 1e-3), mean)
    fill = cv2.resize(fill.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return np.where(flat, fill, plane).astype(np.float32)


@dataclass(frozen=True)
class RegistrationReference:
    """What registration needs of a reference, made once per reference (not once per frame)."""

    plane: np.ndarray  # (S, S) float32
    small: np.ndarray  # its REGISTER_PLANE² downsample, flat floor filled
    fixed: np.ndarray  # bool (S, S): its flat floor (field of view, padding), fixed in the image
    shape: tuple[int, ...]  # the reference's own shape, (1, 1, S, S) or (S, S)

    @classmethod
    def of(cls, reference: np.ndarray) -> RegistrationReference:
        plane = np.ascontiguousarray(reference.reshape(reference.shape[-2:]), dtype=np.float32)
        side = min(REGISTER_PLANE, *plane.shape)  # never upsample
        small = _without_flat_floor(cv2.resize(plane, (side, side), interpolation=cv2.INTER_AREA))
        return cls(plane, small, _flat_floor(plane).astype(bool), reference.shape)


def register(reference: np.ndarray | RegistrationReference, x: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The reference (…, S, S) moved onto the frame x (same shape): the translation that phase
    correlation finds between their REGISTER_PLANE² downsamples, applied at full size.

    Breathing and small patient or table motion shift the spine by several pixels between the
    first frame and later ones; a two-channel model reads that misregistration as new density
    along every bone edge. Returns the moved reference and the shift (dx, dy) in model px.
    Pass a `RegistrationReference` when registering the same reference onto many frames."""
    ref = reference if isinstance(reference, RegistrationReference) else RegistrationReference.of(reference)
    x2d = np.ascontiguousarray(x.reshape(x.shape[-2:]), dtype=np.float32)
    h, w = ref.plane.shape
    side = ref.small.shape[0]
    window = _windows.get(side)
    if window is None:
        window = _windows[side] = cv2.createHanningWindow((side, side), cv2.CV_32F)
    small_x = _without_flat_floor(cv2.resize(x2d, (side, side), interpolation=cv2.INTER_AREA))
    if float(np.ptp(ref.small)) < 1e-6 or float(np.ptp(small_x)) < 1e-6:
        dx = dy = 0.0  # a blank plane has no position: phase correlation would return noise
    else:
        # a copy: OpenCV 5.0's phaseCorrelate writes into its inputs (the cached plane would drift)
        (dx, dy), _response = cv2.phaseCorrelate(ref.small.copy(), small_x, window)
        dx, dy = dx * w / side, dy * h / side
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(ref.plane, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if ref.fixed.any():
        # The field of view and the padding stay where they are while the anatomy moves: keep
        # the reference's own there; where the move brought them inside the frame's field the
        # reference knows nothing, and the frame stands in (else the model reads the shifted
        # border as new density: false cement along the edge of the field)
        brought_in = cv2.warpAffine(ref.fixed.view(np.uint8), shift, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        brought_in = brought_in.view(bool) & ~ref.fixed
        moved[brought_in] = x2d[brought_in]
        moved[ref.fixed] = ref.plane[ref.fixed]
    return moved.reshape(ref.shape), (float(dx), float(dy))


def scene_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two model inputs, compared at SCENE_PLANE px; 0.0 when either is flat."""
    return float(_scene_vector(a) @ _scene_vector(b))


class ReferenceFrame:
    """Holds the reference; `for_frame` returns the one to use with a frame: registered onto
    it (`register`), or the frame itself when there is none yet or the scene changed."""

    def __init__(self, min_correlation: float = 0.85) -> None:
        self.min_correlation = min_correlation
        self.plane: np.ndarray | None = None  # preprocessed reference (1, 1, S, S)
        self.frame: int | None = None  # its frame index
        self.frame_shape: tuple[int, int] | None = None
        self._registration: RegistrationReference | None = None  # made on first use
        self.correlation = 1.0  # the last frame's with the registered reference
        self.shift = (0.0, 0.0)  # the last registration's (dx, dy), model px
        self.measured = False  # whether the last frame's shift was measured (not a flat frame)
        self.taken = 0  # how many references were taken this run
        self.last_reason = ""

    @property
    def scene_shift(self) -> tuple[int, float, float] | None:
        """(reference frame, dx, dy): how far the last frame's scene has moved since the
        reference (breathing), in model px; None when it was not measured (a flat frame)."""
        if not self.measured or self.frame is None:
            return None
        return (self.frame, *self.shift)

    def for_frame(self, x: np.ndarray, frame_shape: tuple[int, int], index: int) -> np.ndarray:
        if self.plane is None:
            reason = "first frame"
        elif frame_shape != self.frame_shape or x.shape != self.plane.shape:
            reason = f"frame size {self.frame_shape} -> {frame_shape}"
        else:
            vector = _scene_vector(x)
            if not vector.any():
                # a flat frame (X-ray off, blanked video) says nothing about the scene: keep the
                # reference, so fluoroscopy resumed on the same view still has its pre-cement one
                self.correlation, self.shift, self.measured = 1.0, (0.0, 0.0), False
                return self.plane
            if self._registration is None:
                self._registration = RegistrationReference.of(self.plane)
            moved, self.shift = register(self._registration, x)
            self.measured = True
            self.correlation = float(vector @ _scene_vector(moved))
            if self.correlation >= self.min_correlation:
                return moved
            reason = f"scene changed (correlation {self.correlation:.2f})"
        self.plane, self.frame, self.frame_shape = x, index, frame_shape
        self._registration = None
        self.correlation, self.shift, self.measured = 1.0, (0.0, 0.0), True
        self.taken += 1
        self.last_reason = reason
        return self.plane

    def rehearse(self, x: np.ndarray) -> np.ndarray:
        """What `for_frame` computes for x with the reference held now, changing nothing: the
        loop's keep-warm pass (the frame is judged for real when it comes)."""
        if self._registration is None or x.shape != self.plane.shape:
            return x
        moved, _ = register(self._registration, x)
        _ = _scene_vector(x) @ _scene_vector(moved)  # for_frame's scene check, run for its warmth
        return moved
