"""Shared test fixtures: a small stand-in ONNX segmenter (real onnx graph, real onnxruntime),
and writers for real loops (video, PNG folders, DICOM) that the tests create themselves."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from guidance.capture.simulated import draw_scene
from guidance.segmentation.preprocess import DEFAULT_NORMALIZATION

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ARGS` (a module with -m, or a script such as bench/latency.py) as a user runs
    it, from the repo root, output captured."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_guidance(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m guidance ARGS` as a user runs it, from the repo root, output captured."""
    return run_python("-m", "guidance", *args, timeout=timeout)


# grey level (after the percentile window, 0..1) each class of the stand-in sits at
STAND_IN_CENTRES = (0.0, 0.45, 1.0, 0.73)  # background, vertebral_body, cement, needle


def stand_in_metadata(size: int, reference: bool = False) -> dict:
    return {
        "name": "stand-in",
        "version": "0.0-test",
        "input": {
            "name": "image",
            "size": size,
            "channels": 2 if reference else 1,
            "layout": "NCHW",
            "dtype": "float32",
            **({"reference": "first_frame"} if reference else {}),
        },
        "resize": "letterbox",
        "normalization": dict(DEFAULT_NORMALIZATION),
        "classes": ["background", "vertebral_body", "cement", "needle"],
        "output": {"name": "logits", "kind": "logits"},
        "training": {"note": "not trained: intensity bins standing in for the real model"},
    }


def build_stand_in(
    path: Path, size: int = 64, fragile: bool = False, metadata: dict | None = None, reference: bool = False
) -> Path:
    """A graph that classifies each pixel by its windowed intensity (nearest class centre):
    bright -> cement, mid -> needle/body, dark -> background. `fragile`: fails at run time on a
    uniform frame (a data-dependent Reshape), so tests can see the model fail on one frame.
    `reference`: a two-channel model (frame, reference frame) that calls cement only what got
    much brighter than the reference; what was bright already is capped to the body's level."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    norm = DEFAULT_NORMALIZATION
    to_input = lambda unit: (unit - norm["mean"]) / norm["std"]  # noqa: E731
    inits = [
        numpy_helper.from_array(np.array(norm["std"], np.float32), "std"),
        numpy_helper.from_array(np.array(norm["mean"], np.float32), "mean"),
        numpy_helper.from_array(np.array(STAND_IN_CENTRES, np.float32).reshape(1, 4, 1, 1), "centres"),
        numpy_helper.from_array(np.array(-50.0, np.float32), "sharp"),
    ]
    nodes = []
    x = "image"
    if reference:
        inits += [
            numpy_helper.from_array(np.array([1, 1], np.int64), "split"),
            numpy_helper.from_array(np.array(to_input(0.3) - to_input(0.0), np.float32), "new_step"),
            numpy_helper.from_array(np.array(to_input(STAND_IN_CENTRES[1]), np.float32), "body_level"),
        ]
        nodes += [
            helper.make_node("Split", ["image", "split"], ["frame", "ref"], axis=1),
            helper.make_node("Sub", ["frame", "ref"], ["change"]),
            helper.make_node("Greater", ["change", "new_step"], ["is_new"]),
            helper.make_node("Min", ["frame", "body_level"], ["capped"]),
            helper.make_node("Where", ["is_new", "frame", "capped"], ["seen"]),
        ]
        x = "seen"
    if fragile:
        inits += [
            numpy_helper.from_array(np.array(-1.9, np.float32), "blank_level"),
            numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
            numpy_helper.from_array(np.array([5], np.int64), "five"),
        ]
        nodes += [
            helper.make_node("ReduceMax", ["image"], ["peak"], keepdims=0),
            helper.make_node("Less", ["peak", "blank_level"], ["blank"]),
            helper.make_node("Cast", ["blank"], ["blank_i"], to=TensorProto.INT64),
            helper.make_node("Mul", ["blank_i", "five"], ["index"]),  # 0, or 5 on a blank frame
            helper.make_node("Gather", ["zero", "index"], ["nothing"], axis=0),  # 5: out of bounds
            helper.make_node("Add", ["image", "nothing"], ["checked"]),
        ]
        x = "checked"
    nodes += [
        helper.make_node("Mul", [x, "std"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mean"], ["unit"]),
        helper.make_node("Sub", ["unit", "centres"], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        helper.make_node("Mul", ["sq", "sharp"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stand_in",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 2 if reference else 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = metadata if metadata is not None else stand_in_metadata(size, reference)
    helper.set_model_props(model, {"guidance": json.dumps(meta)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_sums(onnx_path: Path, sums_path: Path | None = None) -> Path:
    sums_path = sums_path or onnx_path.parent / "SHA256SUMS"
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    with sums_path.open("a") as fh:
        fh.write(f"{digest}  {onnx_path.name}\n")
    return sums_path


@pytest.fixture
def stand_in(tmp_path) -> tuple[Path, Path]:
    """(onnx_path, sha256sums_path) of a 64x64 stand-in segmenter."""
    d = tmp_path / "model"
    d.mkdir()
    onnx_path = build_stand_in(d / "segmenter.onnx", 64)
    return onnx_path, write_sums(onnx_path)


@pytest.fixture
def fragile_model(tmp_path) -> tuple[Path, Path]:
    d = tmp_path / "fragile"
    d.mkdir()
    onnx_path = build_stand_in(d / "segmenter.onnx", 64, fragile=True)
    return onnx_path, write_sums(onnx_path)


def scene_frames(count: int, size=(96, 128), leak="posterior", onset=8, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [draw_scene(size, t, leak, onset, rng)[0] for t in range(count)]


def write_video(path: Path, frames: list[np.ndarray], fps: float = 15.0, fourcc: str | None = None) -> Path:
    codec = fourcc or {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "FFV1"}[path.suffix]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (w, h), isColor=True)
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR) if f.ndim == 2 else f)
    writer.release()
    return path


_MP4_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl"}


def _mp4_box_chain(data: bytes, kind: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(offset, size) of each box from the top down to the first `kind` box, or []."""
    offset, end = start, len(data) if end is None else end
    while offset + 8 <= end:
        size, name = struct.unpack(">I4s", data[offset : offset + 8])
        if name == kind:
            return [(offset, size)]
        if name in _MP4_CONTAINERS:
            inner = _mp4_box_chain(data, kind, offset + 8, offset + size)
            if inner:
                return [(offset, size), *inner]
        offset += size
    return []


def retime_mp4(path: Path, deltas: list[int]) -> Path:
    """Give an MP4 (as OpenCV's writer makes it: one track, media data before the index)
    variable frame timing: its time-to-sample table (stts) rewritten with one duration per
    frame, in the track's timescale, summing to the same total (so the edit list and the
    durations still hold). What a recorder of pulsed fluoroscopy writes."""
    data = bytearray(path.read_bytes())
    assert data.find(b"mdat") < data.find(b"moov"), "index before media data: chunk offsets would move"
    chain = _mp4_box_chain(data, b"stts")
    assert chain, f"{path}: no stts box"
    offset, size = chain[-1]
    (entries,) = struct.unpack(">I", data[offset + 12 : offset + 16])
    runs = [struct.unpack(">II", data[offset + 16 + 8 * i : offset + 24 + 8 * i]) for i in range(entries)]
    assert len(deltas) == sum(n for n, _ in runs) and sum(deltas) == sum(n * d for n, d in runs), runs
    body = struct.pack(">4sII", b"stts", 0, len(deltas)) + b"".join(struct.pack(">II", 1, d) for d in deltas)
    box = struct.pack(">I", 4 + len(body)) + body
    for parent, parent_size in chain[:-1]:  # every enclosing box grows by as much
        data[parent : parent + 4] = struct.pack(">I", parent_size + len(box) - size)
    data[offset : offset + size] = box
    path.write_bytes(bytes(data))
    return path


def write_pngs(folder: Path, frames: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        assert cv2.imwrite(str(folder / f"{i:06d}.png"), f)
    return folder


def write_labels(
    base: Path,
    fps: float,
    pixel_spacing_mm: float | None = None,
    posterior_side: str | None = "right",
) -> Path:
    path = base.parent / (base.name + ".labels.json")
    data = {"schema": "cine-labels/1", "fps": fps, "view": "lateral", "events": []}
    if pixel_spacing_mm:
        data["pixel_spacing_mm"] = pixel_spacing_mm
    if posterior_side:
        data["posterior_side"] = posterior_side
    path.write_text(json.dumps(data))
    return path


def write_dicom(
    path: Path,
    frames: list[np.ndarray],
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    syntax: str = "explicit",
    frame_time_ms: float | None = 66.67,
    spacing: float | None = 0.3,
    frame_time_vector_ms: list[float] | None = None,
) -> Path:
    """A multi-frame (or single-frame when one frame) XA-like DICOM file. bits: stored bits
    (values are scaled from the 8-bit scene); MONOCHROME1 stores inverted values;
    syntax: explicit | rle | jpeg (baseline, 8-bit, encapsulated from OpenCV's encoder)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    stack = np.stack(frames).astype(np.float64) / 255.0
    top = (1 << bits) - 1
    values = np.round(stack * top)
    if photometric == "MONOCHROME1":
        values = top - values
    dtype = np.uint8 if bits <= 8 else np.uint16
    pixels = values.astype(dtype)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "XA"
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if frame_time_ms:
        ds.FrameTime = f"{frame_time_ms:.2f}"
    if frame_time_vector_ms is not None:
        ds.FrameTimeVector = [f"{v:g}" for v in frame_time_vector_ms]
    if spacing:
        ds.PixelSpacing = [spacing, spacing]
    data = pixels if len(frames) > 1 else pixels[0]
    if syntax == "jpeg":
        assert bits == 8
        parts = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in pixels]
        ds.PixelData = encapsulate(parts)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = data.tobytes()
        if syntax == "rle":
            ds.compress(RLELossless, data)
    ds.save_as(str(path), enforce_file_format=True)
    return path


_VALIDATORS: dict = {}


def validate_message(msg: dict) -> None:
    """Validate one protocol message against guidance/alerts/schemas/<type>.json."""
    import jsonschema

    from guidance.alerts.schemas import load_schema

    kind = msg["type"]
    if kind not in _VALIDATORS:
        schema = load_schema(kind)
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _VALIDATORS[kind] = cls(schema)
    _VALIDATORS[kind].validate(msg)
