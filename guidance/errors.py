"""Errors that end a command with one clear line and an exit code, never a traceback."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # the job ran but its result says "no" (e.g. --fail-under, a failed loop)
EXIT_BAD_INPUT = 2  # unusable input: source, model, calibration, labels, arguments


class GuidanceError(Exception):
    """A user-facing error: `str(err)` is the whole message, naming what and why."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(GuidanceError):
    """A file, device, URL or argument that cannot be used as given."""


class ModelError(GuidanceError):
    """The model file is missing, corrupt, unknown or does not run."""


class CalibrationError(GuidanceError):
    """A calibration that cannot be trusted: wrong version, bad field, poor fit."""
