"""`guidance calibrate` and `guidance undistort`."""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

from guidance.errors import BadInputError, CalibrationError

DEFAULT_ANGULATION = "default"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    cal = subparsers.add_parser(
        "calibrate",
        help="calibrate distortion, pixel spacing and field of view from a bead-grid phantom image (or --check one)",
        description=(
            "Find the beads of a regular bead or hole grid phantom, fit a 5th-order polynomial "
            "distortion model, measure the pixel spacing at the phantom plane and the circular "
            "field of view, and write (or update) a calibration file. "
            "Refuses a fit it cannot trust. With --check, check a stored calibration against a new "
            "image of the phantom instead (constancy: exit 0 within tolerance, 1 out of it)."
        ),
    )
    cal.add_argument("image", help="phantom image (PNG, TIFF, JPEG, BMP or single-frame DICOM)")
    cal.add_argument("--pitch-mm", required=True, help="bead grid pitch in mm (centre to centre)")
    cal.add_argument("-o", "--output", help="calibration JSON to create or update")
    cal.add_argument(
        "--check",
        metavar="CALIBRATION",
        help="constancy check instead of a new fit: does this stored calibration still fit the "
        "image? exit 0 within tolerance, 1 out of it (then recalibrate)",
    )
    cal.add_argument(
        "--angulation",
        default=None,
        help="name of this C-arm position, e.g. lateral, ap, or 90 (adds/replaces it in OUTPUT; "
        f"default {DEFAULT_ANGULATION!r}; with --check, which of the file's angulations)",
    )
    cal.add_argument(
        "--max-rms-px",
        default=None,
        help="--check: residual RMS after the stored correction allowed (default 0.5 px)",
    )
    cal.add_argument(
        "--max-spacing-change",
        default=None,
        metavar="PERCENT",
        help="--check: pixel spacing change against the stored one allowed (default 1 %%)",
    )
    cal.add_argument("--report", metavar="JSON", help="--check: also write the check's result here")
    cal.add_argument("--beads", choices=("auto", "bright", "dark"), default="auto", help="bead polarity")
    cal.add_argument("--order", default="5", help="polynomial order, 1..7 (default 5)")
    cal.add_argument("--no-fov", action="store_true", help="no circular field (flat-panel detector)")
    cal.add_argument(
        "--overlay",
        metavar="PNG",
        help="also write a QA picture: beads used/rejected, residual vectors x50, field of view",
    )
    cal.set_defaults(func=run_calibrate)

    und = subparsers.add_parser(
        "undistort",
        help="apply a calibration's distortion correction to one image",
        description="Correct one raw image with a calibration file (output: same size and type).",
    )
    und.add_argument("image", help="raw image (PNG, TIFF, JPEG, BMP or single-frame DICOM)")
    und.add_argument("--calibration", required=True, help="calibration JSON written by `guidance calibrate`")
    und.add_argument("-o", "--output", required=True, help="corrected image (.png or .tif)")
    und.add_argument("--angulation", default=None, help="which angulation (needed if the file has several)")
    und.set_defaults(func=run_undistort)


def _positive_float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise BadInputError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise BadInputError(f"{what} must be a positive number, got {text!r}")
    return v


def run_calibrate(args: argparse.Namespace) -> int:
    from calibration.fit import calibrate_image
    from calibration.imageio import read_image
    from calibration.store import write_angulation

    if args.output is None and args.check is None:
        raise BadInputError("give -o OUTPUT (a new calibration) or --check CALIBRATION (a constancy check)")
    if args.output is not None and args.check is not None:
        raise BadInputError(
            "-o OUTPUT (a new calibration) and --check CALIBRATION (a constancy check) exclude each other"
        )
    if args.check is not None:
        for flag, given in (("--order", args.order != "5"), ("--no-fov", args.no_fov), ("--overlay", args.overlay)):
            if given:
                raise BadInputError(f"{flag} belongs to a new fit (-o), not to --check")
        return run_check(args)
    for flag, value in (
        ("--max-rms-px", args.max_rms_px),
        ("--max-spacing-change", args.max_spacing_change),
        ("--report", args.report),
    ):
        if value is not None:
            raise BadInputError(f"{flag} belongs to --check")
    args.angulation = args.angulation or DEFAULT_ANGULATION
    pitch = _positive_float(args.pitch_mm, "--pitch-mm")
    try:
        order = int(args.order)
    except ValueError:
        raise BadInputError(f"--order must be an integer 1..7, got {args.order!r}") from None
    image = read_image(args.image)
    data = Path(args.image).read_bytes()
    source = {
        "path": Path(args.image).name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "dtype": str(image.dtype),
    }
    report = calibrate_image(
        image,
        pitch,
        order=order,
        bead_polarity=args.beads,
        fov=None if args.no_fov else "auto",
        source=source,
    )
    names = write_angulation(args.output, args.angulation, report.entry)
    if args.overlay:
        from calibration.imageio import write_image
        from calibration.qa import overlay

        write_image(args.overlay, overlay(image, report))
    e = report.entry
    ph, res = e["phantom"], e["residuals"]
    fov = e["fov_distorted"]
    print(
        f"{args.output} [{args.angulation}]: "
        f"{e['pixel_spacing_mm']:.5f} mm/px at the phantom plane; "
        f"{ph['beads_used']} beads ({ph['bead_polarity']}, {ph['beads_rejected']} rejected, "
        f"{ph['beads_cut_by_fov']} cut by the field edge); residual RMS {res['rms_px']:.3f} px "
        f"({res['rms_mm']:.3f} mm), max {res['max_px']:.3f} px; field "
        + (
            "none"
            if fov is None
            else f"centre ({fov['center_xy'][0]:.1f}, {fov['center_xy'][1]:.1f}) radius {fov['radius_px']:.1f} px"
        )
        + f"; angulations in file: {', '.join(names)}"
    )
    if fov is not None and e["calibrated_radius_px"] < fov["radius_px"] - 1.0:
        print(
            f"warning: the bead grid reaches only {e['calibrated_radius_px']:.0f} px of the "
            f"{fov['radius_px']:.0f} px field radius; the corrected frame is blank beyond it "
            "(use a phantom that covers the whole field)"
        )
    return 0


def run_check(args: argparse.Namespace) -> int:
    """`guidance calibrate IMAGE --pitch-mm P --check calib.json`: exit 0 within tolerance, 1 out."""
    import json

    from calibration.check import MAX_RMS_PX, MAX_SPACING_CHANGE_PCT, check_image
    from calibration.imageio import read_image
    from calibration.runtime import load_calibration

    pitch = _positive_float(args.pitch_mm, "--pitch-mm")
    max_rms = _positive_float(args.max_rms_px, "--max-rms-px") if args.max_rms_px else MAX_RMS_PX
    max_change = (
        _positive_float(args.max_spacing_change, "--max-spacing-change")
        if args.max_spacing_change
        else MAX_SPACING_CHANGE_PCT
    )
    cal = load_calibration(args.check, args.angulation)
    image = read_image(args.image)
    try:
        report = check_image(image, pitch, cal, args.beads, max_rms, max_change)
    except CalibrationError as exc:
        raise BadInputError(f"{args.image}: {exc}") from None
    if args.report:
        import datetime

        doc = {
            "schema": "cement-guidance-calibration-check/1",
            "checked_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "image": str(args.image),
            "image_sha256": hashlib.sha256(Path(args.image).read_bytes()).hexdigest(),
            "calibration": str(args.check),
            **report.as_dict(),
        }
        Path(args.report).write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"{args.image} against {args.check} [{report.angulation}]: {report.beads_used} beads; residual "
        f"RMS {report.rms_px:.3f} px (max {report.max_px:.3f}) after the stored correction, limit "
        f"{max_rms:g}; pixel spacing {report.spacing_mm:.5f} mm against {report.stored_spacing_mm:.5f} "
        f"({report.spacing_change_pct:+.2f} %, limit {max_change:g} %): " + ("PASS" if report.passed else "FAIL")
    )
    for failure in report.failures:
        print(f"  {failure}")
    return 0 if report.passed else 1


def run_undistort(args: argparse.Namespace) -> int:
    from calibration.imageio import read_image, write_image
    from calibration.runtime import load_calibration

    cal = load_calibration(args.calibration, args.angulation)
    image = read_image(args.image)
    try:
        cal.check_frame(image)
    except CalibrationError as exc:
        raise BadInputError(f"{args.image}: {exc}") from None
    write_image(args.output, cal.undistort(image))
    print(f"{args.output}: corrected with {args.calibration} [{cal.angulation}], {cal.pixel_spacing_mm:.5f} mm/px")
    return 0
