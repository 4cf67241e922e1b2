"""The calibration file: versioned JSON, several angulations per file, validated field by field.

Layout (docs/calibration.md; JSON Schema in calibration/schemas/calibration.schema.json):

    {"schema": "cement-guidance-calibration/1",
     "angulations": {"lateral": {...one calibration...}, "ap": {...}}}

The loader checks every field by hand (the runtime does not depend on jsonschema) and then
checks that the numbers can be trusted: residuals within limits, enough beads, a plausible
spacing, and the two stored polynomials inverse to each other over the field (which catches a
corrupted or hand-edited coefficient). The limits live in code, never in the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from calibration.fit import (
    MAX_RESIDUAL_PX,
    MAX_RMS_PX,
    MAX_ROUNDTRIP_PX,
    SCHEMA,
    SPACING_RANGE_MM,
    min_beads,
)
from calibration.transforms import Polynomial2D, n_terms
from guidance.errors import CalibrationError

ANGULATION_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


class _Bad(Exception):
    pass


def _num(obj: dict, key: str, where: str, positive: bool = False, minimum: float | None = None) -> float:
    if key not in obj:
        raise _Bad(f"{where}.{key} is missing")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _Bad(f"{where}.{key} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise _Bad(f"{where}.{key} must be positive, got {v!r}")
    if minimum is not None and v < minimum:
        raise _Bad(f"{where}.{key} must be >= {minimum}, got {v!r}")
    return float(v)


def _int(obj: dict, key: str, where: str, minimum: int = 0) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _Bad(f"{where}.{key} must be an integer >= {minimum}, got {v!r}")
    return v


def _obj(obj: dict, key: str, where: str, nullable: bool = False) -> dict | None:
    if key not in obj:
        raise _Bad(f"{where}.{key} is missing")
    v = obj[key]
    if v is None and nullable:
        return None
    if not isinstance(v, dict):
        raise _Bad(f"{where}.{key} must be an object, got {type(v).__name__}")
    return v


def _pair(obj: dict, key: str, where: str) -> tuple[float, float]:
    v = obj.get(key)
    ok = (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    )
    if not ok:
        raise _Bad(f"{where}.{key} must be a list of two finite numbers, got {v!r}")
    return float(v[0]), float(v[1])


def _circle(obj: dict | None, where: str) -> tuple[float, float, float] | None:
    if obj is None:
        return None
    cx, cy = _pair(obj, "center_xy", where)
    return cx, cy, _num(obj, "radius_px", where, positive=True)


def _poly(obj: dict, key: str, where: str) -> Polynomial2D:
    p = _obj(obj, key, where)
    assert p is not None
    w = f"{where}.{key}"
    if p.get("kind") != "polynomial2d":
        raise _Bad(f"{w}.kind must be 'polynomial2d', got {p.get('kind')!r}")
    order = _int(p, "order", w, 1)
    if order > 9:
        raise _Bad(f"{w}.order must be <= 9, got {order}")
    _pair(p, "center_xy", w)
    _num(p, "scale", w, positive=True)
    for c in ("coef_x", "coef_y"):
        v = p.get(c)
        if not isinstance(v, list) or len(v) != n_terms(order):
            raise _Bad(f"{w}.{c} must be a list of {n_terms(order)} numbers for order {order}")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v):
            raise _Bad(f"{w}.{c} must hold finite numbers only")
    return Polynomial2D.from_json(p)


def validate_entry(name: str, e: Any) -> dict[str, Any]:
    """Check one angulation's fields and trust limits; return the parsed values."""
    where = f"angulations.{name}"
    if not isinstance(e, dict):
        raise _Bad(f"{where} must be an object")
    size = e.get("image_size")
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)
    ):
        raise _Bad(f"{where}.image_size must be [width, height] in pixels, got {size!r}")
    spacing = _num(e, "pixel_spacing_mm", where, positive=True)
    lo, hi = SPACING_RANGE_MM
    if not lo <= spacing <= hi:
        raise _Bad(f"{where}.pixel_spacing_mm {spacing:g} is outside the plausible {lo:g}-{hi:g} mm")
    for key in ("created_utc", "software"):
        if not isinstance(e.get(key), str):
            raise _Bad(f"{where}.{key} must be a string")
    phantom = _obj(e, "phantom", where)
    assert phantom is not None
    _num(phantom, "pitch_mm", f"{where}.phantom", positive=True)
    used = _int(phantom, "beads_used", f"{where}.phantom", 0)
    fov = _circle(_obj(e, "fov", where, nullable=True), f"{where}.fov")
    fov_d = _circle(_obj(e, "fov_distorted", where, nullable=True), f"{where}.fov_distorted")
    _num(e, "fit_radius_px", where, positive=True)
    calibrated = _num(e, "calibrated_radius_px", where, positive=True)
    fwd = _poly(e, "ideal_from_distorted", where)
    inv = _poly(e, "distorted_from_ideal", where)
    res = _obj(e, "residuals", where)
    assert res is not None
    rms = _num(res, "rms_px", f"{where}.residuals", minimum=0.0)
    worst = _num(res, "max_px", f"{where}.residuals", minimum=0.0)
    _num(res, "roundtrip_max_px", f"{where}.residuals", minimum=0.0)
    # trust
    if rms > MAX_RMS_PX or worst > MAX_RESIDUAL_PX:
        raise CalibrationError(
            f"{where}: residual RMS {rms:.3g} px / max {worst:.3g} px exceeds the limits "
            f"{MAX_RMS_PX} / {MAX_RESIDUAL_PX} px; recalibrate"
        )
    need = min_beads(fwd.order)
    if used < need:
        raise CalibrationError(f"{where}: fitted on {used} beads, an order-{fwd.order} fit needs {need}")
    w, h = size
    if fov is not None and not (0 <= fov[0] < w and 0 <= fov[1] < h):
        raise _Bad(f"{where}.fov.center_xy lies outside the {w}x{h} image")
    ref = fwd.center_xy
    reach = calibrated
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    rings = [ref] + [
        (ref[0] + f * reach * math.cos(a), ref[1] + f * reach * math.sin(a)) for f in (0.33, 0.66, 0.95) for a in t
    ]
    pts = np.array(rings)
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 1] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] <= h - 1)]
    back = inv(fwd(pts))
    err = float(np.max(np.hypot(*(back - pts).T)))
    if not err <= MAX_ROUNDTRIP_PX:
        raise CalibrationError(
            f"{where}: ideal_from_distorted and distorted_from_ideal disagree by {err:.3g} px "
            "(corrupted or edited coefficients)"
        )
    # the corrected frame must be a mild warp of the raw one: no folding, scale near 1
    det = np.linalg.det(fwd.jacobian(pts))
    if not (np.all(det > 0.5) and np.all(det < 2.0)):
        raise CalibrationError(f"{where}: the distortion map folds or scales implausibly inside the field")
    return {
        "image_size": (w, h),
        "pixel_spacing_mm": spacing,
        "fov": fov,
        "fov_distorted": fov_d,
        "ideal_from_distorted": fwd,
        "distorted_from_ideal": inv,
        "rms_px": rms,
        "max_px": worst,
    }


def read_document(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a whole calibration file; raise CalibrationError naming the problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"{p}: no such calibration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{p}: cannot read the calibration file ({exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{p}: not a calibration file (invalid JSON: {exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or "schema" not in doc:
        raise CalibrationError(f'{p}: not a calibration file (no "schema" field)')
    if doc["schema"] != SCHEMA:
        raise CalibrationError(f"{p}: calibration schema {doc['schema']!r} is not supported (expected {SCHEMA!r})")
    angs = doc.get("angulations")
    if not isinstance(angs, dict) or not angs:
        raise CalibrationError(f"{p}: angulations must be a non-empty object")
    for name, entry in angs.items():
        if not ANGULATION_NAME.match(name):
            raise CalibrationError(f"{p}: angulation name {name!r} must match {ANGULATION_NAME.pattern}")
        try:
            validate_entry(name, entry)
        except _Bad as exc:
            raise CalibrationError(f"{p}: bad field: {exc}") from None
        except CalibrationError as exc:
            raise CalibrationError(f"{p}: {exc}") from None
    return doc


def write_angulation(path: str | os.PathLike, name: str, entry: dict[str, Any]) -> list[str]:
    """Add or replace one angulation in the file at `path` (created if absent), atomically.
    Returns the angulation names now in the file."""
    if not ANGULATION_NAME.match(name):
        raise CalibrationError(f"angulation name {name!r} must match {ANGULATION_NAME.pattern}")
    p = Path(path)
    if p.exists():
        try:
            doc = read_document(p)
        except CalibrationError as exc:
            raise CalibrationError(
                f"refusing to overwrite an existing file that is not a valid calibration: {exc}"
            ) from None
    else:
        doc = {"schema": SCHEMA, "angulations": {}}
    try:
        validate_entry(name, entry)
    except _Bad as exc:  # a bug here, not bad input: still one clear line
        raise CalibrationError(f"internal: the new calibration has a bad field: {exc}") from None
    doc["angulations"][name] = entry
    doc["angulations"] = dict(sorted(doc["angulations"].items()))
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CalibrationError(f"{p}: the folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=p.name, suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return list(doc["angulations"])
