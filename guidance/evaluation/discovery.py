"""Which loops live under the given paths (recorded-loops.md): NAME.dcm, NAME.mp4/.avi/.mkv,
or a folder NAME/ of 000000.png, 000001.png, ...; each paired with NAME.labels.json beside it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from guidance.errors import BadInputError

VIDEO_SUFFIXES = (".dcm", ".mp4", ".avi", ".mkv")
LABELS_SUFFIX = ".labels.json"
FIRST_FRAME = "000000.png"


@dataclass(frozen=True)
class LoopRef:
    loop_id: str  # unique within a run: path relative to its search root, '/'-separated
    name: str  # NAME of the spec
    source: str  # the video file or the PNG folder
    form: str  # "dicom" | "video" | "png"
    labels: str | None  # NAME.labels.json when present

    @property
    def slug(self) -> str:
        """A file-name-safe form of the id for output files (the CLI makes it unique)."""
        stem = self.loop_id
        if self.form in ("dicom", "video"):
            stem = re.sub(r"\.(dcm|mp4|avi|mkv)(#\d+)?$", r"\2", stem, flags=re.IGNORECASE)
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "loop"


def _form(path: Path) -> str | None:
    if path.is_dir():
        return "png" if (path / FIRST_FRAME).is_file() else None
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        return "dicom"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def _ref(path: Path, root: Path, form: str) -> LoopRef:
    name = path.name if form == "png" else path.stem
    labels = path.parent / f"{name}{LABELS_SUFFIX}"
    rel = path.relative_to(root).as_posix() if path != root else path.name
    return LoopRef(
        loop_id=rel,
        name=name,
        source=str(path),
        form=form,
        labels=str(labels) if labels.is_file() else None,
    )


def discover(paths: list[str | Path]) -> tuple[list[LoopRef], list[str]]:
    """Loops under `paths` (files or folders, searched recursively, sorted, deduplicated),
    and labels files that have no loop beside them (reported, since a missing video in an
    archive is a finding in itself)."""
    loops: dict[str, LoopRef] = {}
    orphans: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise BadInputError(f"{raw}: no such file or folder (expected a loop or a folder of loops)")
        form = _form(path)
        if form is not None:
            ref = _ref(path.resolve(), path.resolve().parent, form)
            loops.setdefault(str(Path(ref.source).resolve()), ref)
            continue
        if path.is_file():
            raise BadInputError(f"{raw}: not a loop (expected .dcm, .mp4, .avi, .mkv or a folder of 000000.png ...)")
        root = path.resolve()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            dirnames.sort()
            names_here = set()
            for d in list(dirnames):
                if (here / d / FIRST_FRAME).is_file():
                    ref = _ref(here / d, root, "png")
                    loops.setdefault(ref.source, ref)
                    names_here.add(d)
                    dirnames.remove(d)  # a frame folder is a leaf
            for f in sorted(filenames):
                p = here / f
                form = _form(p)
                if form is not None:
                    ref = _ref(p, root, form)
                    loops.setdefault(ref.source, ref)
                    names_here.add(p.stem)
            for f in sorted(filenames):
                if f.endswith(LABELS_SUFFIX) and f.removesuffix(LABELS_SUFFIX) not in names_here:
                    orphans.append(str(here / f))
    refs = sorted(loops.values(), key=lambda r: (r.loop_id, r.source))
    # ids must be unique across roots too (two roots may both hold "a.mp4")
    seen: dict[str, int] = {}
    unique = []
    for r in refs:
        n = seen.get(r.loop_id, 0)
        seen[r.loop_id] = n + 1
        unique.append(r if n == 0 else LoopRef(f"{r.loop_id}#{n + 1}", r.name, r.source, r.form, r.labels))
    return unique, sorted(set(orphans))


def estimate_frames(ref: LoopRef) -> int | None:
    """Frame count from headers only (for the progress bar's total); None when unknown."""
    try:
        if ref.form == "png":
            return sum(1 for p in Path(ref.source).iterdir() if re.fullmatch(r"\d+\.png", p.name))
        if ref.form == "dicom":
            import pydicom

            ds = pydicom.dcmread(ref.source, stop_before_pixels=True)
            return int(getattr(ds, "NumberOfFrames", 1) or 1)
        if ref.form == "video":
            import cv2

            cap = cv2.VideoCapture(ref.source, cv2.CAP_FFMPEG)
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
            cap.release()
            return n if n > 0 else None
    except Exception:  # an unreadable loop fails later, with its reason; here it is unknown
        return None
    return None
