"""The segmentation model as one object (MONAI-Deploy-like): it knows its file, its checksum,
its metadata (input size, normalisation, classes) and how to run itself.

A model file is trusted only when `SHA256SUMS` next to it (sha256sum format) lists it with the
same hash: a missing, corrupt or unlisted file is refused before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from guidance.errors import ModelError
from guidance.segmentation.preprocess import LetterboxGeometry, preprocess
from guidance.segmentation.reference import register

METADATA_KEY = "guidance"
# A two-channel model's second channel (metadata input.reference): the first frame of the
# scene, preprocessed like the frame, so new density (cement) stands out from old (bone).
REFERENCE_FIRST_FRAME = "first_frame"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sha256sums(path: Path) -> dict[str, str]:
    """`<hex>  name` or `<hex> *name` lines -> {name: hex}."""
    sums: dict[str, str] = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def write_sha256sums(onnx_path: Path, digest: str) -> Path:
    """List (or re-list) a model file in the SHA256SUMS beside it, in the format read above
    (for the tools that ship a model: models.train, models.operating_point)."""
    sums = onnx_path.parent / "SHA256SUMS"
    lines = [
        ln for ln in (sums.read_text().splitlines() if sums.exists() else []) if not ln.endswith(f"  {onnx_path.name}")
    ]
    lines.append(f"{digest}  {onnx_path.name}")
    sums.write_text("\n".join(sorted(lines)) + "\n")
    return sums


def verify_model_file(onnx_path: Path, sha256sums_path: Path) -> str:
    """The file's sha256 when SHA256SUMS vouches for it; ModelError naming the file otherwise."""
    if not onnx_path.is_file():
        raise ModelError(f"{onnx_path}: model file missing")
    if not sha256sums_path.is_file():
        raise ModelError(f"{onnx_path}: checksum list {sha256sums_path} missing; refusing an unverified model")
    sums = read_sha256sums(sha256sums_path)
    expected = sums.get(onnx_path.name)
    actual = sha256_of(onnx_path)
    if expected is None:
        raise ModelError(f"{onnx_path}: not listed in {sha256sums_path} (sha256 {actual})")
    if expected != actual:
        raise ModelError(
            f"{onnx_path}: sha256 mismatch, expected {expected}, actual {actual} (corrupt or replaced model file)"
        )
    return actual


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    input_name: str
    size: int
    channels: int
    normalization: dict
    classes: tuple[str, ...]
    output_name: str
    output_kind: str  # "logits" (argmax over classes) or "labels"
    raw: dict


def parse_metadata(onnx_path: Path, props: dict[str, str]) -> ModelInfo:
    text = props.get(METADATA_KEY)
    if text is None:
        raise ModelError(
            f"{onnx_path}: no '{METADATA_KEY}' metadata (input size, "
            "normalisation, classes); not a cement-guidance model"
        )
    try:
        meta = json.loads(text)
        inp, out = meta["input"], meta.get("output", {})
        info = ModelInfo(
            name=str(meta["name"]),
            version=str(meta["version"]),
            input_name=str(inp["name"]),
            size=int(inp["size"]),
            channels=int(inp.get("channels", 1)),
            normalization=dict(meta["normalization"]),
            classes=tuple(meta["classes"]),
            output_name=str(out.get("name", "logits")),
            output_kind=str(out.get("kind", "logits")),
            raw=meta,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{onnx_path}: malformed '{METADATA_KEY}' metadata ({exc!r})") from None
    if inp.get("layout", "NCHW") != "NCHW" or info.channels not in (1, 2):
        raise ModelError(
            f"{onnx_path}: expects {info.channels}-channel {inp.get('layout')} input; "
            "this service feeds NCHW with 1 channel (the frame) or 2 (the frame and its reference)"
        )
    if info.channels == 2 and inp.get("reference") != REFERENCE_FIRST_FRAME:
        raise ModelError(
            f"{onnx_path}: second input channel {inp.get('reference')!r} unknown "
            f"(this service gives {REFERENCE_FIRST_FRAME!r})"
        )
    if meta.get("resize", "letterbox") != "letterbox":
        raise ModelError(f"{onnx_path}: resize {meta.get('resize')!r} unsupported (letterbox only)")
    for needed in ("vertebral_body", "cement", "needle"):
        if needed not in info.classes:
            raise ModelError(f"{onnx_path}: class list {list(info.classes)} lacks {needed!r}")
    return info


_CLASS_PLANES: dict[tuple[int, int, int], np.ndarray] = {}


def argmax_classes(logits: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 -> uint8 (H, W), identical to np.argmax(axis=0) (the first maximum
    wins) but with OpenCV's vectorised compare/select per class plane: ~10x faster than
    numpy's strided reduction, which matters in a loop whose overhead is budgeted."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    best = logits[0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for c in range(1, logits.shape[0]):
        key = (c, *best.shape)
        if key not in _CLASS_PLANES:
            _CLASS_PLANES[key] = np.full(best.shape, c, np.uint8)
        better = cv2.compare(logits[c], best, cv2.CMP_GT)  # 255 where strictly greater
        # labels = c where better else labels, as xor/and/xor (no branches, no bool indexing)
        cv2.bitwise_xor(labels, cv2.bitwise_and(cv2.bitwise_xor(labels, _CLASS_PLANES[key]), better), dst=labels)
        cv2.max(best, logits[c], dst=best)
    return labels


class RehearsalCut(Exception):
    """A rehearsal's inference ended early by Model.cut_rehearsal() (a frame came)."""


class Model:
    """Model(onnx_path, sha256sums_path) -> verified, loaded, ready after warm_up()."""

    def __init__(
        self,
        onnx_path: str | Path,
        sha256sums_path: str | Path | None = None,
        provider: str = "cpu",
        threads: int = 0,
        spinning: bool = False,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        sums = Path(sha256sums_path) if sha256sums_path else self.path.parent / "SHA256SUMS"
        self.sha256 = verify_model_file(self.path, sums)
        available = ort.get_available_providers()
        if provider == "auto":
            provider = "cuda" if PROVIDERS["cuda"] in available else "cpu"
        if provider not in PROVIDERS:
            raise ModelError(f"provider {provider!r}: expected cpu, cuda or auto")
        if PROVIDERS[provider] not in available:
            raise ModelError(
                f"{self.path}: provider {provider} requested but onnxruntime offers "
                f"only {', '.join(available)} (install onnxruntime-gpu for cuda)"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # no busy-waiting between runs: on 2 shared cores a spinning pool starves capture
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types  # noqa: BLE001
            raise ModelError(f"{self.path}: onnxruntime cannot load it ({exc})") from None
        self.provider = self.session.get_providers()[0]
        props = self.session.get_modelmeta().custom_metadata_map
        self.info = parse_metadata(self.path, props)
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if self.info.input_name not in inputs or self.info.output_name not in outputs:
            raise ModelError(
                f"{self.path}: graph I/O {sorted(inputs)} -> {sorted(outputs)} does not "
                f"match its metadata ({self.info.input_name} -> {self.info.output_name})"
            )
        self.cement_class = self.info.classes.index("cement")
        self.warm = False
        # the keep-warm pass's runs, which another thread may end early (cut_rehearsal)
        self._rehearsal = ort.RunOptions()

    @property
    def size(self) -> int:
        return self.info.size

    def describe(self) -> str:
        return f"{self.info.name} {self.info.version} ({self.path.name}, sha256 {self.sha256[:12]}, {self.provider})"

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, LetterboxGeometry]:
        return preprocess(image, self.info.size, self.info.normalization)

    def window_units(self, x: np.ndarray, geometry: LetterboxGeometry) -> np.ndarray:
        """The preprocessed frame (feed's first channel) back in grey window units (0 at the
        window's low end, 1 at its high end), cropped to the frame area: the density the
        tracker's checks read."""
        norm = self.info.normalization
        return geometry.crop(x[0, 0]) * np.float32(norm["std"]) + np.float32(norm["mean"])

    @property
    def takes_reference(self) -> bool:
        """True when the model reads a reference frame beside the frame (two channels)."""
        return self.info.channels == 2

    def feed(self, x: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        """The graph's input: the preprocessed frame (1, 1, S, S), and for a reference-taking
        model the preprocessed reference stacked as the second channel. Given no reference,
        such a model is given the frame itself: it then judges the frame alone, as on a
        scene's first frame."""
        if not self.takes_reference:
            return x
        return np.concatenate([x, x if reference is None else reference], axis=1)

    def infer(self, x: np.ndarray, reference: np.ndarray | None = None, rehearsal: bool = False) -> np.ndarray:
        """Preprocessed frame [and reference] (feed) -> class map (S, S) uint8 at model resolution.
        `rehearsal`: a keep-warm run, which cut_rehearsal() ends early (RehearsalCut)."""
        feed = {self.info.input_name: self.feed(x, reference)}
        if not rehearsal:
            out = self.session.run([self.info.output_name], feed)[0]
        else:
            try:
                out = self.session.run([self.info.output_name], feed, self._rehearsal)[0]
            except Exception:  # onnxruntime's own Fail  # noqa: BLE001
                if self._rehearsal.terminate:
                    raise RehearsalCut from None
                raise
        if self.info.output_kind == "labels":
            return np.asarray(out).reshape(self.info.size, self.info.size).astype(np.uint8)
        return argmax_classes(out[0])

    def arm_rehearsal(self) -> None:
        """Before a keep-warm pass: its inference runs to the end unless cut."""
        self._rehearsal.terminate = False

    def cut_rehearsal(self) -> None:
        """End the keep-warm inference now running (from any thread; onnxruntime stops at
        its next node, within a millisecond): the frame that came goes first."""
        self._rehearsal.terminate = True

    def segment(
        self, image: np.ndarray, reference_image: np.ndarray | None = None
    ) -> tuple[np.ndarray, LetterboxGeometry]:
        """Grey frame [and the scene's first frame] -> (class map at model resolution,
        letterbox-cropped to the frame area, geometry). The reference is registered onto the
        frame, as the service's segment operator gives it."""
        x, geometry = self.preprocess(image)
        reference = None
        if reference_image is not None and self.takes_reference:
            reference = register(self.preprocess(reference_image)[0], x)[0]
        return geometry.crop(self.infer(x, reference)), geometry

    def warm_up(self, runs: int = 3) -> float:
        """Run on blank and noise inputs so the first real frame pays no allocation/JIT cost.
        Returns the last run's time in ms."""
        rng = np.random.default_rng(0)
        elapsed = 0.0
        for i in range(max(1, runs)):
            x = (
                rng.normal(0, 1, (1, 1, self.size, self.size)).astype(np.float32)
                if i
                else np.zeros((1, 1, self.size, self.size), np.float32)
            )
            t0 = time.perf_counter()
            self.infer(x, x)
            elapsed = (time.perf_counter() - t0) * 1e3
        self.warm = True
        return elapsed
