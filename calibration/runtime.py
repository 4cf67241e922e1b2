"""What the service uses at run time: one angulation's calibration with precomputed maps.

    cal = load_calibration("calib.json", angulation="lateral")
    corrected = cal.undistort(frame)          # raw frame -> ideal (corrected) frame
    area_mm2 = n_pixels * cal.pixel_spacing_mm ** 2
    valid = cal.fov_mask(corrected.shape)     # field of view, in the corrected frame

Geometry after `undistort` is the ideal frame: `fov_center_xy`, `fov_radius_px` and
`fov_mask` describe the field in corrected pixels. `distorted_from_ideal` maps corrected
pixel positions back to the raw frame (e.g. to report evidence in raw-frame pixels).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from calibration.intensity import circle_mask
from calibration.store import read_document, validate_entry
from calibration.transforms import Polynomial2D, Similarity2D
from guidance.errors import CalibrationError

log = logging.getLogger(__name__)

_OFF_FRAME = -16.0  # map value for "no source pixel" (outside the field of view)


@dataclass(repr=False)
class Calibration:
    angulation: str
    image_size: tuple[int, int]  # (width, height) of the frames it applies to
    pixel_spacing_mm: float  # mm per corrected pixel at the phantom plane
    ideal_from_distorted: Polynomial2D
    distorted_from_ideal: Polynomial2D
    fov_center_xy: tuple[float, float] | None  # corrected frame
    fov_radius_px: float | None  # corrected frame; None: no circular field (flat panel)
    fov_distorted: tuple[float, float, float] | None  # raw frame (cx, cy, r)
    residual_rms_px: float
    residual_max_px: float
    source: str = ""
    entry: dict[str, Any] = field(default_factory=dict, repr=False)
    _maps: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _mask_cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        fov = "none" if self.fov_radius_px is None else f"r={self.fov_radius_px:.1f} px"
        return (
            f"Calibration({self.source or '?'}[{self.angulation}]: {self.image_size[0]}x"
            f"{self.image_size[1]}, {self.pixel_spacing_mm:.5f} mm/px, residual RMS "
            f"{self.residual_rms_px:.3f} px, FOV {fov})"
        )

    __str__ = __repr__

    @property
    def mm_from_ideal(self) -> Similarity2D:
        """Corrected pixels -> millimetres in the phantom plane (origin at pixel (0, 0))."""
        return Similarity2D(self.pixel_spacing_mm, 0.0, (0.0, 0.0))

    def _build_maps(self) -> tuple[np.ndarray, np.ndarray]:
        w, h = self.image_size
        mx, my = self.distorted_from_ideal.evaluate_grid(np.arange(w), np.arange(h))
        if self.fov_center_xy is not None and self.fov_radius_px is not None:
            # outside the field the polynomial extrapolates: send those pixels well off the
            # frame (not to -1: a source 1 px outside takes OpenCV's slow partial-border path,
            # one entirely outside is a fast constant fill)
            outside = ~circle_mask((h, w), *self.fov_center_xy, self.fov_radius_px)
            mx[outside] = _OFF_FRAME
            my[outside] = _OFF_FRAME
        # Float32 maps, not cv2.convertMaps fixed-point ones: with OpenCV >= 4.11 / 5 the SIMD
        # remap path is the float one, and fixed-point maps measured ~2x slower
        # (bench/undistort.py prints both side by side).
        return np.ascontiguousarray(mx), np.ascontiguousarray(my)

    def prepare(self) -> None:
        """Precompute the remap tables (done once; `undistort` calls it on first use)."""
        if self._maps is None:
            self._maps = self._build_maps()

    def check_size(self, width: int, height: int) -> None:
        """CalibrationError unless frames of width x height are what this calibration is for."""
        if (int(width), int(height)) != tuple(self.image_size):
            raise CalibrationError(
                f"frame is {width}x{height} but calibration {self.angulation!r} was made for "
                f"{self.image_size[0]}x{self.image_size[1]} frames"
            )

    def check_frame(self, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        self.check_size(w, h)

    def undistort(self, frame: np.ndarray) -> np.ndarray:
        """Raw frame (H, W[, C], uint8/uint16/float32) -> corrected frame, same shape and type."""
        self.check_frame(frame)
        self.prepare()
        assert self._maps is not None
        return cv2.remap(
            frame,
            self._maps[0],
            self._maps[1],
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )

    def fov_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """Bool (H, W) mask of the field of view in the corrected frame, scaled to `shape` when
        that differs from the calibrated size; all True when there is no circular field."""
        h, w = int(shape[0]), int(shape[1])
        cached = self._mask_cache.get((h, w))
        if cached is not None:
            return cached.copy()  # callers may combine masks in place; the cache stays intact
        if self.fov_center_xy is None or self.fov_radius_px is None:
            mask = np.ones((h, w), dtype=bool)
        else:
            cw, ch = self.image_size
            sx, sy = w / cw, h / ch
            cx, cy = (
                (self.fov_center_xy[0] + 0.5) * sx - 0.5,
                (self.fov_center_xy[1] + 0.5) * sy - 0.5,
            )
            yy, xx = np.ogrid[:h, :w]
            r = self.fov_radius_px
            mask = ((xx - cx) / (r * sx)) ** 2 + ((yy - cy) / (r * sy)) ** 2 <= 1.0
        mask.setflags(write=False)
        self._mask_cache[(h, w)] = mask
        return mask.copy()


def angulation_names(path: str | os.PathLike) -> list[str]:
    return list(read_document(path)["angulations"])


def load_calibration(path: str | os.PathLike, angulation: str | None = None) -> Calibration:
    """Load, validate and trust-check one angulation; raise CalibrationError otherwise.

    `angulation` may be omitted when the file holds exactly one.
    """
    doc = read_document(path)
    angs: dict[str, Any] = doc["angulations"]
    if angulation is None:
        if len(angs) != 1:
            raise CalibrationError(f"{path}: holds several angulations ({', '.join(angs)}); choose one")
        angulation = next(iter(angs))
    elif angulation not in angs:
        raise CalibrationError(f"{path}: no calibration for angulation {angulation!r} (has: {', '.join(angs)})")
    entry = angs[angulation]
    v = validate_entry(angulation, entry)
    fov = v["fov"]
    cal = Calibration(
        angulation=angulation,
        image_size=v["image_size"],
        pixel_spacing_mm=v["pixel_spacing_mm"],
        ideal_from_distorted=v["ideal_from_distorted"],
        distorted_from_ideal=v["distorted_from_ideal"],
        fov_center_xy=None if fov is None else (fov[0], fov[1]),
        fov_radius_px=None if fov is None else fov[2],
        fov_distorted=v["fov_distorted"],
        residual_rms_px=v["rms_px"],
        residual_max_px=v["max_px"],
        source=str(path),
        entry=entry,
    )
    cal.prepare()
    log.info(
        "calibration %s[%s]: %.4f mm/px, residual RMS %.3f px, FOV %s",
        path,
        angulation,
        cal.pixel_spacing_mm,
        cal.residual_rms_px,
        "none" if fov is None else f"r={fov[2]:.1f} px",
    )
    return cal
