"""Read and write single images for the calibration commands (PNG/TIFF/JPEG/BMP, DICOM)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from guidance.errors import BadInputError

_WRITABLE = {".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".pgm"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One grey or colour image, 8-16 bit, from a picture file or a single-frame DICOM."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file")
    if p.is_dir():
        raise BadInputError(f"{p}: is a folder, expected an image file")
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if img is None:
        img = _read_dicom(p)
    if img is None:
        raise BadInputError(f"{p}: not an image (expected PNG, TIFF, JPEG, BMP or single-frame DICOM)")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.dtype not in (np.uint8, np.uint16):
        raise BadInputError(f"{p}: {img.dtype} pixels are not supported (expected 8-16 bit integers)")
    return img


def _read_dicom(p: Path) -> np.ndarray | None:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - a runtime dependency
        return None
    try:
        ds = pydicom.dcmread(str(p))
        arr = ds.pixel_array
    except (
        InvalidDicomError,
        AttributeError,
        ValueError,
        KeyError,
        OSError,
        RuntimeError,
        TypeError,
    ):
        return None
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise BadInputError(f"{p}: a multi-frame DICOM; expected a single phantom image")
    arr = np.asarray(arr)
    if arr.dtype.kind == "i":  # signed storage: shift into unsigned without losing order
        arr = (arr.astype(np.int32) - int(arr.min())).clip(0, 65535).astype(np.uint16)
    return arr


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    p = Path(path)
    if p.suffix.lower() not in _WRITABLE:
        raise BadInputError(f"{p}: cannot write {p.suffix or 'files without extension'}; use .png or .tif")
    if not p.parent.is_dir() and str(p.parent):
        raise BadInputError(f"{p}: the folder {p.parent} does not exist")
    if image.dtype == np.uint16 and p.suffix.lower() in {".jpg", ".jpeg", ".bmp"}:
        raise BadInputError(f"{p}: {p.suffix} cannot hold 16-bit pixels; use .png or .tif")
    try:
        ok = cv2.imwrite(str(p), image)
    except cv2.error as exc:
        raise BadInputError(f"{p}: cannot write the image ({exc.msg.strip()})") from None
    if not ok:
        raise BadInputError(f"{p}: cannot write the image")
