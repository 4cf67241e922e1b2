"""`NAME.labels.json` (schema `cine-labels/1`) and its masks: load and validate, per the spec.

Every violation raises `LabelsError` naming the file and the field, so `guidance evaluate`
ends with one clear line and exit code 2 instead of scoring against a broken ground truth.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guidance.errors import BadInputError

SCHEMA = "cine-labels/1"
EVENT_KINDS = ("posterior", "venous")
VIEWS = ("lateral", "ap")
POSTERIOR_SIDES = ("left", "right")
MASK_KEY = "labels"
MASK_MAX_CLASS = 3  # 0 background, 1 vertebral body, 2 cement, 3 needle or cannula


class LabelsError(BadInputError):
    """A labels file (or its masks) that breaks recorded-loops.md."""

    def __init__(self, path: Path | str, field: str, why: str) -> None:
        self.path = str(path)
        self.field = field
        self.why = why
        super().__init__(f"labels {self.path}: field '{field}': {why}")


@dataclass(frozen=True)
class Event:
    kind: str  # "posterior" | "venous"
    onset_frame: int


@dataclass(frozen=True)
class Labels:
    path: str
    fps: float | None
    pixel_spacing_mm: float | None
    view: str
    posterior_side: str | None
    events: tuple[Event, ...]
    masks_path: str | None
    masks_shape: tuple[int, int, int] | None  # from the .npy header, checked without decompressing

    def to_dict(self) -> dict:
        return {
            "fps": self.fps,
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "view": self.view,
            "posterior_side": self.posterior_side,
            "events": [{"kind": e.kind, "onset_frame": e.onset_frame} for e in self.events],
            "masks": Path(self.masks_path).name if self.masks_path else None,
        }


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_labels(path: Path | str) -> Labels:
    """Parse and validate one labels file; masks are checked by header (key, dtype, rank) here
    and by value when they are loaded (`load_masks`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LabelsError(path, "(file)", f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise LabelsError(path, "(file)", "is not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelsError(path, "(file)", f"is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise LabelsError(path, "(file)", "must hold a JSON object")

    if doc.get("schema") != SCHEMA:
        raise LabelsError(path, "schema", f"must be {SCHEMA!r}, got {doc.get('schema')!r}")

    fps = doc.get("fps")
    if fps is not None and (not _is_number(fps) or fps <= 0):
        raise LabelsError(path, "fps", f"must be a positive number, got {fps!r}")

    spacing = doc.get("pixel_spacing_mm")
    if spacing is not None and (not _is_number(spacing) or spacing <= 0):
        raise LabelsError(path, "pixel_spacing_mm", f"must be a positive number, got {spacing!r}")

    view = doc.get("view")
    if view not in VIEWS:
        raise LabelsError(path, "view", f"must be one of {', '.join(VIEWS)}; got {view!r}")

    side = doc.get("posterior_side")
    if side is not None:
        if side not in POSTERIOR_SIDES:
            raise LabelsError(path, "posterior_side", f"must be left or right (or absent); got {side!r}")
        if view != "lateral":
            raise LabelsError(path, "posterior_side", "is for the lateral view only (view is ap)")

    if "events" not in doc:
        raise LabelsError(path, "events", "is required ([] for a clean injection)")
    raw_events = doc["events"]
    if not isinstance(raw_events, list):
        raise LabelsError(path, "events", f"must be a list, got {type(raw_events).__name__}")
    events: list[Event] = []
    for i, item in enumerate(raw_events):
        where = f"events[{i}]"
        if not isinstance(item, dict):
            raise LabelsError(path, where, "must be an object with kind and onset_frame")
        kind = item.get("kind")
        if kind not in EVENT_KINDS:
            raise LabelsError(path, f"{where}.kind", f"must be posterior or venous; got {kind!r}")
        onset = item.get("onset_frame")
        if not isinstance(onset, int) or isinstance(onset, bool) or onset < 0:
            raise LabelsError(path, f"{where}.onset_frame", f"must be an integer >= 0; got {onset!r}")
        events.append(Event(kind, onset))

    masks_path: str | None = None
    masks_shape: tuple[int, int, int] | None = None
    masks = doc.get("masks")
    if masks is not None:
        if not isinstance(masks, str) or not masks:
            raise LabelsError(path, "masks", f"must be a file name, got {masks!r}")
        mpath = Path(masks) if Path(masks).is_absolute() else path.parent / masks
        masks_shape = _check_masks_header(path, mpath)
        masks_path = str(mpath)

    return Labels(
        path=str(path),
        fps=float(fps) if fps is not None else None,
        pixel_spacing_mm=float(spacing) if spacing is not None else None,
        view=view,
        posterior_side=side,
        events=tuple(events),
        masks_path=masks_path,
        masks_shape=masks_shape,
    )


def _check_masks_header(labels_path: Path, masks_path: Path) -> tuple[int, int, int]:
    """Key, dtype and rank of the masks array from its .npy header (no decompression)."""
    if not masks_path.is_file():
        raise LabelsError(labels_path, "masks", f"file {masks_path} does not exist")
    try:
        with zipfile.ZipFile(masks_path) as zf:
            names = zf.namelist()
            if f"{MASK_KEY}.npy" not in names:
                keys = ", ".join(n.removesuffix(".npy") for n in names) or "none"
                raise LabelsError(labels_path, "masks", f"{masks_path.name} has no key '{MASK_KEY}' (keys: {keys})")
            with zf.open(f"{MASK_KEY}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _fortran, dtype = read_header(fh)
    except LabelsError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise LabelsError(labels_path, "masks", f"{masks_path.name} is not a valid .npz ({exc})") from None
    if dtype != np.uint8:
        raise LabelsError(labels_path, "masks", f"'{MASK_KEY}' must be uint8, got {dtype}")
    if len(shape) != 3 or min(shape) < 1:
        raise LabelsError(
            labels_path, "masks", f"'{MASK_KEY}' must have shape [frames, height, width], got {list(shape)}"
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def load_masks(labels: Labels) -> np.ndarray:
    """The validated masks array [frames, h, w] uint8 with values 0..3."""
    if labels.masks_path is None:
        raise ValueError("these labels have no masks")
    try:
        with np.load(labels.masks_path, allow_pickle=False) as npz:
            masks = npz[MASK_KEY]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise LabelsError(labels.path, "masks", f"cannot be read ({exc})") from None
    if masks.dtype != np.uint8 or masks.ndim != 3:
        raise LabelsError(labels.path, "masks", f"must be uint8 [frames, h, w], got {masks.dtype} {masks.shape}")
    top = int(masks.max()) if masks.size else 0
    if top > MASK_MAX_CLASS:
        frame = int(np.argmax((masks > MASK_MAX_CLASS).reshape(masks.shape[0], -1).any(axis=1)))
        raise LabelsError(labels.path, "masks", f"values must be 0..{MASK_MAX_CLASS}; frame {frame} has {top}")
    return masks


class MaskStream:
    """Masks read frame by frame, in order, straight from the .npz member: one frame in
    memory instead of the whole [frames, h, w] array (a 30 s 1024x1024 loop is 470 MB),
    so many workers can score long loops side by side. Values are checked per frame."""

    def __init__(self, labels: Labels) -> None:
        if labels.masks_path is None or labels.masks_shape is None:
            raise ValueError("these labels have no masks")
        self.labels = labels
        self.shape = labels.masks_shape
        self._zip = zipfile.ZipFile(labels.masks_path)
        self._fh = self._zip.open(f"{MASK_KEY}.npy")
        version = np.lib.format.read_magic(self._fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _shape, fortran, _dtype = read_header(self._fh)
        if fortran:
            self.close()
            raise LabelsError(labels.path, "masks", "Fortran-ordered arrays are not supported")
        self._next = 0
        self._frame_bytes = self.shape[1] * self.shape[2]

    def __len__(self) -> int:
        return self.shape[0]

    def frame(self, index: int) -> np.ndarray:
        """Mask of frame `index`; indices must not go backwards (frames arrive in order)."""
        if not 0 <= index < self.shape[0]:
            raise IndexError(index)
        if index < self._next:
            raise ValueError(f"mask frame {index} requested after frame {self._next - 1}")
        try:
            while self._next < index:  # frames the pipeline skipped
                self._read()
            mask = self._read()
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise LabelsError(self.labels.path, "masks", f"cannot be read ({exc})") from None
        top = int(mask.max())
        if top > MASK_MAX_CLASS:
            raise LabelsError(self.labels.path, "masks", f"values must be 0..{MASK_MAX_CLASS}; frame {index} has {top}")
        return mask

    def _read(self) -> np.ndarray:
        data = self._fh.read(self._frame_bytes)
        if len(data) != self._frame_bytes:
            raise EOFError(f"truncated at frame {self._next}")
        self._next += 1
        return np.frombuffer(data, np.uint8).reshape(self.shape[1], self.shape[2])

    def close(self) -> None:
        self._fh.close()
        self._zip.close()
