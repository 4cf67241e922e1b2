"""The reference frame a two-channel model reads beside each frame: the first frame of the
current scene, preprocessed like the frame.

Taken from the first frame after start, and taken again when the frame size changes or when
the scene no longer resembles it (the C-arm was moved or rotated): then the frame itself
becomes the reference. Cement growing in a still scene changes a small share of the image and
keeps the correlation high; a new view does not. After a video loss nothing is forgotten: if
the view is the same when the video comes back, its pre-cement reference is still the right
one, and if it is not, the correlation says so. A flat frame (X-ray off) never replaces a
reference.
"""

from __future__ import annotations

import cv2
import numpy as np

SCENE_PLANE = 64  # side of the downsampled planes compared for a scene change
# Simulated loops (bench-free check in tests/test_reference.py): a frame against its own loop's
# first frame correlates 0.93 or more through the injection; different scenes 0.47 at most.


def _scene_vector(x: np.ndarray) -> np.ndarray:
    """A model input (…, S, S) -> its SCENE_PLANE² downsample, zero-mean, unit-norm (all zero
    when flat: a blank frame resembles nothing)."""
    plane = np.ascontiguousarray(x.reshape(x.shape[-2:]), dtype=np.float32)
    v = cv2.resize(plane, (SCENE_PLANE, SCENE_PLANE), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    v -= v.mean()
    norm = float(np.sqrt(v @ v))
    return v / norm if norm > 1e-9 else np.zeros_like(v)


def scene_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two model inputs, compared at SCENE_PLANE px; 0.0 when either is flat."""
    return float(_scene_vector(a) @ _scene_vector(b))


class ReferenceFrame:
    """Holds the reference; `for_frame` returns the one to use with a frame (taking the frame
    itself when there is none yet or the scene changed)."""

    def __init__(self, min_correlation: float = 0.75) -> None:
        self.min_correlation = min_correlation
        self.plane: np.ndarray | None = None  # preprocessed reference (1, 1, S, S)
        self.frame: int | None = None  # its frame index
        self.frame_shape: tuple[int, int] | None = None
        self._vector = np.zeros(0)
        self.correlation = 1.0  # the last frame's with the reference
        self.taken = 0  # how many references were taken this run
        self.last_reason = ""

    def for_frame(self, x: np.ndarray, frame_shape: tuple[int, int], index: int) -> np.ndarray:
        reason = ""
        if self.plane is None:
            reason = "first frame"
        elif frame_shape != self.frame_shape or x.shape != self.plane.shape:
            reason = f"frame size {self.frame_shape} -> {frame_shape}"
        else:
            vector = _scene_vector(x)
            # a flat frame (X-ray off, blanked video) says nothing about the scene: keep the
            # reference, so fluoroscopy resumed on the same view still has its pre-cement one
            self.correlation = float(vector @ self._vector) if vector.any() else 1.0
            if self.correlation < self.min_correlation:
                reason = f"scene changed (correlation {self.correlation:.2f})"
        if reason:
            self.plane, self.frame, self.frame_shape = x, index, frame_shape
            self._vector = _scene_vector(x)
            self.correlation = 1.0
            self.taken += 1
            self.last_reason = reason
        return self.plane
