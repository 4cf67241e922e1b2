"""Fluoroscopic cement-injection guidance.

Advisory software: NOT A CERTIFIED MEDICAL DEVICE. It warns; the operator decides.

Data flow: capture -> calibration -> segmentation -> tracker -> alerts (ZeroMQ)
-> injector console, and firmware_bridge -> injector firmware.
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "cement-guidance is advisory software and not a certified medical device; "
    "it does not replace the operator's own image review."
)
