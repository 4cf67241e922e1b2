"""The service's settings (guidance.settings), as evaluation runs them: the same model,
calibration and tracker settings as `guidance run` (TOML, GUIDANCE_* environment, flags),
with what offline evaluation must change: no socket, no alert log, unpaced lossless replay,
and inference threads per worker."""

from __future__ import annotations

import argparse
from pathlib import Path

from guidance.settings import Settings, load_settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("service settings (as for guidance run)")
    g.add_argument("--config", metavar="TOML", help="settings file (flags and GUIDANCE_* env win)")
    g.add_argument("--model", help="ONNX model (default: the shipped models/segmenter.onnx)")
    g.add_argument("--sha256sums", help="checksum list (default: SHA256SUMS next to the model)")
    g.add_argument("--provider", choices=("cpu", "cuda", "auto"), help="execution provider")
    g.add_argument("--calibration", metavar="FILE", help="calibration file (see calibration/)")


def build(args: argparse.Namespace) -> Settings:
    settings = load_settings(
        args.config,
        overrides={
            "segmentation": {"model": args.model, "sha256sums": args.sha256sums, "provider": args.provider},
            "calibration": {"file": args.calibration},
        },
    )
    seg = settings.segmentation
    # absolute paths: worker processes and Dask workers may not share this working directory
    absolute = {k: str(Path(v).resolve()) for k, v in (("model", seg.model), ("sha256sums", seg.sha256sums)) if v}
    if absolute:
        settings = settings.replace(segmentation=absolute)
    if settings.calibration.file:
        settings = settings.replace(calibration={"file": str(Path(settings.calibration.file).resolve())})
    return for_evaluation(settings, threads=args.threads_per_worker)


def for_evaluation(settings: Settings, threads: int = 1) -> Settings:
    """No socket bound (loops run side by side), nothing appended to a live alert log,
    replay as fast as possible and lossless, `threads` inference threads per loop."""
    return settings.replace(
        alerts={"address": None, "log": None},
        capture={"pace": False, "source": "", "kind": "auto"},
        segmentation={"threads": threads},
        # no latency_overrun: an unpaced replay has no live latency budget, and a timing-driven
        # alert would make the results depend on the machine's load (latency is still reported)
        loop={"max_frames": None, "latency_budget_ms": 0.0},
    )


def describe(settings: Settings) -> dict:
    """What the summary records about the system under test."""
    from dataclasses import asdict
    from pathlib import Path

    from guidance.segmentation.model import sha256_of

    model = Path(settings.model_path)
    return {
        "model": str(model),
        "model_sha256": sha256_of(model) if model.is_file() else None,
        "provider": settings.segmentation.provider,
        "threads": settings.segmentation.threads,
        "calibration": settings.calibration.file,
        "tracker": asdict(settings.tracker),
        "latency_budget_ms": settings.loop.latency_budget_ms,
    }
