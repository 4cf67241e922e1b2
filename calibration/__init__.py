"""C-arm calibration: geometric distortion, pixel spacing, field of view and intensity.

Runtime API (what the service uses):

    from calibration import load_calibration
    cal = load_calibration("calib.json", angulation="lateral")
    cal.undistort(frame); cal.pixel_spacing_mm; cal.fov_center_xy; cal.fov_radius_px
    cal.fov_mask(shape)

and `calibration.intensity` (polarity, field of view, burned-in text, 8-16 bit -> float).
Importing this package pulls in numpy and OpenCV only.
"""

from calibration.fit import SCHEMA
from calibration.runtime import Calibration, angulation_names, load_calibration

__all__ = ["SCHEMA", "Calibration", "angulation_names", "load_calibration"]
