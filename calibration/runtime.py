"""What the service uses at run time: one angulation's calibration with precomputed maps.

    cal = load_calibration("calib.json", angulation="lateral")
    corrected = cal.undistort(frame)          # raw frame -> ideal (corrected) frame
    small = cal.undistort(frame, reduce=2)    # the same correction at half the size
    area_mm2 = n_pixels * cal.pixel_spacing_mm ** 2
    valid = cal.fov_mask(corrected.shape)     # field of view, in the corrected frame

Geometry after `undistort` is the ideal frame: `fov_center_xy`, `fov_radius_px` and
`fov_mask` describe the field in corrected pixels. `distorted_from_ideal` maps corrected
pixel positions back to the raw frame (e.g. to report evidence in raw-frame pixels).

`reduce=k` corrects straight to 1/k of the frame's size: the frame is area-averaged k x k first
and remapped with tables built for the smaller grid (the same geometry: a corrected pixel's
centre maps through the same polynomial). The service uses it when its model reads fewer
pixels than the frame has: a 1024 px frame for a 256 px model is corrected at 512 px, about a
third of the full-size cost, and nothing the model could see is lost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

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
    _maps: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
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

    def reduced_size(self, reduce: int) -> tuple[int, int]:
        """(width, height) of corrected frames at 1/`reduce` of the calibrated size."""
        w, h = self.image_size
        return max(1, round(w / reduce)), max(1, round(h / reduce))

    def _build_maps(self, reduce: int) -> tuple[np.ndarray, np.ndarray]:
        w, h = self.image_size
        rw, rh = self.reduced_size(reduce)
        sx, sy = w / rw, h / rh  # full-size pixels per reduced pixel (k, or nearly)
        # the reduced grid's pixel centres in full-size corrected pixels ...
        xs = (np.arange(rw) + 0.5) * sx - 0.5
        ys = (np.arange(rh) + 0.5) * sy - 0.5
        mx, my = self.distorted_from_ideal.evaluate_grid(xs, ys)
        if self.fov_center_xy is not None and self.fov_radius_px is not None:
            # outside the field the polynomial extrapolates: send those pixels well off the
            # frame (not to -1: a source 1 px outside takes OpenCV's slow partial-border path,
            # one entirely outside is a fast constant fill)
            cx, cy = self.fov_center_xy
            outside = (xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 > self.fov_radius_px**2
            mx[outside] = _OFF_FRAME
            my[outside] = _OFF_FRAME
        if reduce > 1:  # ... and their sources in the area-averaged raw frame's pixels
            inside = mx != _OFF_FRAME
            mx[inside] = (mx[inside] + 0.5) / sx - 0.5
            my[inside] = (my[inside] + 0.5) / sy - 0.5
        # Float32 maps, not cv2.convertMaps fixed-point ones: with OpenCV >= 4.11 / 5 the SIMD
        # remap path is the float one, and fixed-point maps measured ~2x slower
        # (bench/undistort.py prints both side by side).
        return np.ascontiguousarray(mx, np.float32), np.ascontiguousarray(my, np.float32)

    def maps(self, reduce: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The remap tables (x, y) for corrected frames at 1/`reduce` of the size: built once."""
        if reduce < 1:
            raise ValueError(f"reduce must be a whole number >= 1, got {reduce}")
        if reduce not in self._maps:
            self._maps[reduce] = self._build_maps(reduce)
        return self._maps[reduce]

    def prepare(self, reduce: int = 1) -> None:
        """Precompute the remap tables (done once; `undistort` calls it on first use)."""
        self.maps(reduce)

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

    def undistort(self, frame: np.ndarray, reduce: int = 1) -> np.ndarray:
        """Raw frame (H, W[, C], uint8/uint16/float32) -> corrected frame of the same type, the
        same size or, with `reduce` k > 1, 1/k of it (area-averaged k x k, then remapped)."""
        self.check_frame(frame)
        map_x, map_y = self.maps(reduce)
        if reduce > 1:
            frame = cv2.resize(frame, self.reduced_size(reduce), interpolation=cv2.INTER_AREA)
        return cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

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
