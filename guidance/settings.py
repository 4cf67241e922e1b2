"""Settings: defaults < TOML file < environment (`GUIDANCE_<SECTION>_<KEY>`) < command-line
flags. Sections are named after the parts they configure:

    [capture]       source, kind, pace, fps, reconnect_s, video_timeout_s
    [calibration]   file, angulation, pixel_spacing_mm, full_resolution
    [segmentation]  model, sha256sums, provider, threads, warmup_runs, reference_min_correlation
    [tracker]       posterior_side, view, raise_frames, clear_frames, area_threshold_mm2, ...
    [alerts]        address, heartbeat_ms, sndhwm, linger_ms, log, injector_address
    [loop]          max_frames, latency_budget_ms, overrun_frames, print_every_s, keep_warm

e.g. `GUIDANCE_ALERTS_ADDRESS=tcp://127.0.0.1:6000`, or `address = "none"` for no socket.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from guidance.errors import BadInputError


def _models_dir() -> Path:
    """The `models` package's folder (shipped model, demo loops) without importing it."""
    spec = importlib.util.find_spec("models")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "models"


def default_model() -> str:
    return str(_models_dir() / "segmenter.onnx")


def default_source() -> str:
    return str(_models_dir() / "demo" / "posterior_leak.mp4")


@dataclass
class CaptureSettings:
    source: str = ""  # empty: the bundled demo loop
    kind: str = "auto"  # auto | live | replay | simulated
    pace: bool = True  # replay at the loop's fps (False: as fast as possible, lossless)
    fps: float | None = None  # override the source's frame rate
    reconnect_s: float = 0.5  # live: pause between reopen attempts
    video_timeout_s: float = 1.0  # no frame for this long -> video_lost


@dataclass
class CalibrationSettings:
    file: str | None = None  # calibration file (calibration package); None: none
    angulation: str | None = None  # which of the file's angulations (needed when it holds several)
    pixel_spacing_mm: float | None = None  # overrides the source's spacing
    # correct frames at full size even when the model reads fewer pixels (default: frames
    # more than twice the model's input are corrected at a whole fraction of their size)
    full_resolution: bool = False


@dataclass
class SegmentationSettings:
    model: str = ""  # empty: models/segmenter.onnx
    sha256sums: str | None = None  # default: SHA256SUMS next to the model
    provider: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # onnxruntime intra-op threads; 0 = one per core
    warmup_runs: int = 3
    # two-channel models: below this correlation with the reference frame the scene is taken
    # to have changed (C-arm moved) and the frame becomes the new reference
    reference_min_correlation: float = 0.85


@dataclass
class TrackerSettings:
    posterior_side: str = "auto"  # auto (source metadata, else the needle's entry) | left | right
    # auto (source metadata, else lateral) | lateral | ap: posterior spread is judged in lateral only
    view: str = "auto"
    raise_frames: int = 2
    clear_frames: int = 15
    area_threshold_mm2: float = 1.0
    area_threshold_px: float = 4.0
    hull_tolerance_mm: float = 0.5
    needle_margin_mm: float = 2.0


@dataclass
class AlertSettings:
    address: str | None = "tcp://127.0.0.1:5556"  # None: build and log, bind nothing
    heartbeat_ms: int = 500
    sndhwm: int = 1000
    linger_ms: int = 500
    log: str | None = None  # JSONL alert log, flushed per message
    injector_address: str | None = "tcp://127.0.0.1:5558"  # bridge telemetry -> status.injector


@dataclass
class LoopSettings:
    max_frames: int | None = None
    latency_budget_ms: float | None = 50.0  # c2p over this for overrun_frames -> alert; None: off
    overrun_frames: int = 5
    print_every_s: float = 1.0
    # live and paced sources: run the last frame through calibration and segmentation again
    # (nothing published, no state changed) just before the next one is due, so that frame
    # finds the caches warm (GuidanceLoop._rehearse); most of a frame's CPU time more per frame
    keep_warm: bool = True


@dataclass
class Settings:
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    segmentation: SegmentationSettings = field(default_factory=SegmentationSettings)
    tracker: TrackerSettings = field(default_factory=TrackerSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)

    def replace(self, **sections: dict[str, Any]) -> Settings:
        """A copy with some fields changed: replace(alerts={"address": None})."""
        out = dataclasses.replace(self)
        for name, values in sections.items():
            setattr(out, name, dataclasses.replace(getattr(self, name), **values))
        return out

    @property
    def model_path(self) -> str:
        return self.segmentation.model or default_model()

    @property
    def source_spec(self) -> str:
        return self.capture.source or default_source()


_NONE = {"", "none", "null"}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """TOML/env/flag value -> the field's type (strings from the environment included)."""
    text = str(hint)
    optional = "None" in text
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE and optional):
        if not optional:
            raise BadInputError(f"{where}: a value is required")
        return None
    try:
        if "bool" in text:
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in text and "float" not in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in text:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{where}: {value!r} is not a valid {text.replace('typing.', '')}") from None


def _apply(settings: Settings, section: str, key: str, value: Any, where: str) -> None:
    part = getattr(settings, section, None)
    if part is None or not dataclasses.is_dataclass(part):
        raise BadInputError(
            f"{where}: unknown section [{section}] (expected one of {', '.join(f.name for f in fields(Settings))})"
        )
    hints = get_type_hints(type(part))
    if key not in hints:
        raise BadInputError(f"{where}: unknown setting {key!r} in [{section}] (expected one of {', '.join(hints)})")
    setattr(part, key, _coerce(value, hints[key], where))


def load_settings(
    config: str | Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Settings:
    """Defaults, then the TOML file, then GUIDANCE_* environment, then `overrides` (flags)."""
    settings = Settings()
    if config:
        path = Path(config)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise BadInputError(f"{path}: settings file not found (expected TOML)") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(f"{path}: not a readable TOML settings file ({exc})") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise BadInputError(f"{path}: {section!r} must be a [section]")
            for key, value in values.items():
                _apply(settings, section, key, value, f"{path} [{section}] {key}")
    env = os.environ if env is None else env
    sections = {f.name for f in fields(Settings)}
    for name, value in env.items():
        if not name.startswith("GUIDANCE_"):
            continue
        rest = name[len("GUIDANCE_") :].lower()
        section, _, key = rest.partition("_")
        if section in sections and key:
            _apply(settings, section, key, value, f"environment {name}")
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                _apply(settings, section, key, value, f"--{key.replace('_', '-')}")
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if s.tracker.posterior_side not in ("auto", "left", "right"):
        raise BadInputError(f"posterior_side {s.tracker.posterior_side!r}: expected auto, left or right")
    if s.tracker.view not in ("auto", "lateral", "ap"):
        raise BadInputError(f"view {s.tracker.view!r}: expected auto, lateral or ap")
    if s.segmentation.provider not in ("cpu", "cuda", "auto"):
        raise BadInputError(f"provider {s.segmentation.provider!r}: expected cpu, cuda or auto")
    if not 0 < s.alerts.heartbeat_ms <= 1000:
        raise BadInputError(f"heartbeat_ms {s.alerts.heartbeat_ms}: expected 1..1000 (>= 1 Hz)")
    if s.tracker.raise_frames < 1 or s.tracker.clear_frames < 1:
        raise BadInputError("raise_frames and clear_frames must be >= 1")
