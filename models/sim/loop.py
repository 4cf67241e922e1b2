"""A whole simulated cine loop: frames, label masks and leak onsets (by the spec's definition),
and writers for every format in ../shared/spec/recorded-loops.md."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models.sim.imaging import Imaging
from models.sim.scene import BODY, LoopScene

LEAK_KINDS = ("posterior", "venous")
FORMATS = ("mp4", "avi", "dcm", "png")


@dataclass
class LoopConfig:
    height: int = 512
    width: int = 512
    fps: float = 15.0
    frames: int = 60
    view: str = "lateral"
    leaks: frozenset[str] = frozenset()
    spacing_mm: float | None = None  # None: drawn so the vertebra fills a plausible share
    bit_depth: int = 8
    jpeg: bool = False
    imaging: dict = field(default_factory=dict)  # Imaging attributes to force (bone_dark, fov, text ...)

    def validate(self) -> None:
        if not (64 <= self.height <= 4096 and 64 <= self.width <= 4096):
            raise ValueError(f"frame size {self.width}x{self.height} must be within 64..4096 px")
        if not (1.0 <= self.fps <= 120.0):
            raise ValueError(f"fps {self.fps} must be within 1..120")
        if self.frames < 2:
            raise ValueError(f"frames {self.frames} must be at least 2")
        if self.view not in ("lateral", "ap"):
            raise ValueError(f"view {self.view!r} must be 'lateral' or 'ap'")
        unknown = set(self.leaks) - set(LEAK_KINDS)
        if unknown:
            raise ValueError(f"unknown leak kind(s) {sorted(unknown)}; expected {list(LEAK_KINDS)}")
        if not (8 <= self.bit_depth <= 16):
            raise ValueError(f"bit depth {self.bit_depth} must be within 8..16")


@dataclass
class FrameWarp:
    """Scene grid -> output frame i: the breathing shift, then the image intensifier's
    distortion and field of view. Labels go through it; so can any other scene mask (the
    treated body, the region behind its wall) to be compared with them pixel for pixel."""

    scene: LoopScene
    imaging: Imaging
    width: int
    height: int
    maps: tuple[np.ndarray, np.ndarray] | None
    fov: np.ndarray | None

    def shift(self, i: int) -> np.ndarray:
        bx, by = self.scene.breathing_shift_px(i)
        margin_x = (self.scene.grid.width - self.width) / 2.0
        margin_y = (self.scene.grid.height - self.height) / 2.0
        return np.float32([[1, 0, -(margin_x + bx)], [0, 1, -(margin_y + by)]])

    def labels(self, mask: np.ndarray, i: int) -> np.ndarray:
        """A uint8 scene-grid mask (labels or 0/1) as frame i shows it."""
        size = (self.width, self.height)
        moved = cv2.warpAffine(mask, self.shift(i), size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
        return self.imaging.warp_labels(moved, self.maps, self.fov)


@dataclass
class SimulatedLoop:
    frames: np.ndarray  # [n, h, w] uint8 or uint16
    labels: np.ndarray  # [n, h, w] uint8: 0 background, 1 body, 2 cement, 3 needle
    fps: float
    spacing_mm: float
    view: str
    posterior_side: str | None
    events: list[dict]
    extravertebral_mm2: dict[str, np.ndarray]  # per kind, per frame (scene grid, the onsets' source)
    warp: FrameWarp | None = field(default=None, repr=False)  # how scene masks became `labels`

    def labels_json(self, name: str, with_masks: bool = True) -> dict:
        doc = {
            "schema": "cine-labels/1",
            "fps": self.fps,
            "pixel_spacing_mm": round(self.spacing_mm, 5),
            "view": self.view,
            "events": self.events,
        }
        if self.posterior_side is not None:
            doc["posterior_side"] = self.posterior_side
        if with_masks:
            doc["masks"] = f"{name}.masks.npz"
        return doc


def simulate(rng: np.random.Generator, config: LoopConfig) -> SimulatedLoop:
    config.validate()
    h, w = config.height, config.width
    # the vertebral body (~30-45 mm) should span roughly 15-45 % of the shorter side
    spacing = config.spacing_mm or float(rng.uniform(120.0, 260.0) / min(h, w))
    scene = LoopScene.sample(
        rng,
        h,
        w,
        spacing,
        config.view,
        config.frames,
        config.fps,
        set(config.leaks),
        margin_px=max(8, int(4.0 / spacing)),
    )
    imaging = Imaging.sample(rng, h, w, bit_depth=config.bit_depth, jpeg=config.jpeg)
    for key, value in config.imaging.items():  # forced conditions, e.g. for robustness subsets
        setattr(imaging, key, value)
    warp = FrameWarp(scene, imaging, w, h, imaging.distortion_maps(), imaging.fov_mask())
    frames = np.empty((config.frames, h, w), np.uint8 if config.bit_depth <= 8 else np.uint16)
    labels = np.empty((config.frames, h, w), np.uint8)
    extra = {k: np.zeros(config.frames) for k in LEAK_KINDS}
    for i in range(config.frames):
        integral, lab = scene.frame(i)
        for kind, area in scene.leak_areas_mm2(i, lab).items():  # the spec's onset definition
            extra[kind][i] = area
        shift = warp.shift(i)
        ideal = cv2.warpAffine(integral, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        labels[i] = warp.labels(lab, i)
        frames[i] = imaging.form(ideal, rng, warp.maps, warp.fov, bone=labels[i] == BODY)
    events = []
    for kind in LEAK_KINDS:
        hits = np.flatnonzero(extra[kind] >= 1.0)
        if hits.size:
            events.append({"kind": kind, "onset_frame": int(hits[0])})
    events.sort(key=lambda e: e["onset_frame"])
    side = None if scene.view == "ap" else "right" if scene.posterior_sign > 0 else "left"
    return SimulatedLoop(frames, labels, config.fps, spacing, scene.view, side, events, extra, warp)


# ---------------------------------------------------------------------------- writers
def write_loop(loop: SimulatedLoop, out_dir: Path, name: str, fmt: str = "mp4", with_masks: bool = True) -> Path:
    """Write NAME.<fmt> (or NAME/ of PNGs), NAME.labels.json and NAME.masks.npz."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt in ("mp4", "avi", "mkv"):
        path = out_dir / f"{name}.{fmt}"
        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if fmt == "mp4" else "MJPG"))
        writer = cv2.VideoWriter(str(path), fourcc, loop.fps, (loop.frames.shape[2], loop.frames.shape[1]), True)
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path}")
        for frame in loop.frames:
            f8 = frame if frame.dtype == np.uint8 else (frame >> 8).astype(np.uint8)
            writer.write(cv2.cvtColor(f8, cv2.COLOR_GRAY2BGR))
        writer.release()
    elif fmt == "png":
        path = out_dir / name
        path.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(loop.frames):
            cv2.imwrite(str(path / f"{i:06d}.png"), frame)
    elif fmt == "dcm":
        path = out_dir / f"{name}.dcm"
        write_dicom(loop, path)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    doc = loop.labels_json(name, with_masks)
    (out_dir / f"{name}.labels.json").write_text(json.dumps(doc, indent=2) + "\n")
    if with_masks:
        np.savez_compressed(out_dir / f"{name}.masks.npz", labels=loop.labels)
    return path


def write_dicom(loop: SimulatedLoop, path: Path, monochrome1: bool = False) -> None:
    """Multi-frame XA-like secondary capture, MONOCHROME2 (or 1), uncompressed."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    ds.PatientName = "SIMULATED^PHANTOM"
    ds.PatientID = "SIM"
    frames = loop.frames
    bits = 8 if frames.dtype == np.uint8 else 16
    if monochrome1:
        frames = (np.iinfo(frames.dtype).max - frames).astype(frames.dtype)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.FrameTime = f"{1000.0 / loop.fps:.3f}"
    ds.CineRate = int(round(loop.fps))
    ds.PixelSpacing = [f"{loop.spacing_mm:.5f}", f"{loop.spacing_mm:.5f}"]
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def frame_count_for(seconds: float, fps: float) -> int:
    return max(2, int(math.ceil(seconds * fps)))
