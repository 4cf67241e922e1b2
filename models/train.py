"""Train the segmentation model on simulated loops and export it as ONNX with its metadata.

    python -m models.train --out models/segmenter.onnx            # the shipped model
    python -m models.train --train-loops 8 --val-loops 2 --steps 5 --out /tmp/m.onnx   # smoke

PyTorch is a training-only extra (`pip install -e ".[train]"`); the runtime never imports
this module. Train and validation frames come from disjoint seed ranges (recorded in the
model's metadata). Runs on the CPU; a GPU is used when present, but the shipped recipe
does not depend on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guidance.segmentation.model import REFERENCE_FIRST_FRAME, write_sha256sums
from guidance.segmentation.preprocess import CLASS_NAMES, DEFAULT_NORMALIZATION
from guidance.segmentation.reference import register
from models import dataset
from models.graph import (
    BLOCK,
    REWRITE_NAME,
    blocked_layout_graph,
    compare_models,
    conv_macs,
    onnx_model_version,
    version_type,
)

# a freshly trained model is a candidate: it gets a release version when it is shipped
# (models.operating_point --version, models.graph --version) unless --version names one
CANDIDATE_VERSION = "0.0.0"
OPSET = 17
TRAIN_SEED_BASE = 1_000_000
VAL_SEED_BASE = 9_000_000


# ----------------------------------------------------------------------------- network
class SeparableConv(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1 + BN + ReLU: most of a conv's reach at a fraction of its cost."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride, padding=dilation, dilation=dilation, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# how the decoder brings coarse features up to the next scale: bilinear (0.5.0), or nearest,
# which onnxruntime runs in a fraction of the time (the shipped graph with its four Resize
# nodes made nearest: 7.9 -> 7.0 ms a frame on one thread, weights unchanged). Session 14
# fine-tuned 0.5.0 with nearest (2,500 steps from run20's weights, same data, -2.0 cement
# logit): the same validation and held-out Dice, but in the six service sets of models/CARD.md
# posterior 107 of 120 raised with 13 false alerts and venous 111 of 114 with 10, against
# 0.5.0's 110 / 8 and 112 / 3: blockier edges make more specks outside the body. Not shipped.
UPSAMPLING = ("bilinear", "nearest")


class LeakUNet(nn.Module):
    """A small U-Net: full-resolution stem for thin needles and veins, separable convs below."""

    def __init__(
        self,
        classes: int = len(CLASS_NAMES),
        width: int = 16,
        channels: int = 1,
        full_width: int = 8,
        deep_widths: tuple[int, int, int] | None = None,
        upsample: str = "bilinear",
    ):
        super().__init__()
        if upsample not in UPSAMPLING:
            raise ValueError(f"upsample {upsample!r}: expected one of {', '.join(UPSAMPLING)}")
        self.upsample = upsample
        w, f = width, full_width
        # channels at 1/4, 1/8 and 1/16 of the plane (default 2w, 4w, 6w): capacity there costs
        # little arithmetic, since those planes are small
        d2, d3, d4 = deep_widths or (2 * w, 4 * w, 6 * w)
        self.channels = channels  # 2: the frame and the run's reference frame (REFERENCE_FIRST_FRAME)
        self.full = ConvBNReLU(channels, f)  # 256
        self.stem = nn.Sequential(ConvBNReLU(channels, w, stride=2), SeparableConv(w, w))  # 128
        self.down2 = nn.Sequential(SeparableConv(w, d2, 2), SeparableConv(d2, d2))  # 64
        self.down3 = nn.Sequential(SeparableConv(d2, d3, 2), SeparableConv(d3, d3))  # 32
        self.down4 = nn.Sequential(  # 16, dilated for context over the whole vertebra
            SeparableConv(d3, d4, 2),
            SeparableConv(d4, d4, dilation=2),
            SeparableConv(d4, d4, dilation=4),
        )
        self.up3 = SeparableConv(d4 + d3, d3)
        self.up2 = SeparableConv(d3 + d2, d2)
        self.up1 = nn.Sequential(SeparableConv(d2 + w, w), SeparableConv(w, w))
        self.up0 = SeparableConv(w + f, f)
        self.head = nn.Conv2d(f, classes, 1)

    def _up(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.upsample == "nearest":
            return F.interpolate(x, size=like.shape[-2:], mode="nearest")
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f0 = self.full(image)
        f1 = self.stem(image)
        f2 = self.down2(f1)
        f3 = self.down3(f2)
        f4 = self.down4(f3)
        x = self.up3(torch.cat([self._up(f4, f3), f3], 1))
        x = self.up2(torch.cat([self._up(x, f2), f2], 1))
        x = self.up1(torch.cat([self._up(x, f1), f1], 1))
        x = self.up0(torch.cat([self._up(x, f0), f0], 1))
        return self.head(x)


def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of one forward pass (convolutions; the rest is negligible)."""
    macs = 0

    def hook(module: nn.Conv2d, _inp, out):
        nonlocal macs
        k = module.kernel_size[0] * module.kernel_size[1]
        macs += out.numel() * k * module.in_channels // module.groups

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, getattr(model, "channels", 1), size, size))
    for h in handles:
        h.remove()
    return macs


# ----------------------------------------------------------------------------- training
def crop_windows(labels: torch.Tensor, batch: int, crop: int, gen: torch.Generator) -> list[tuple[int, slice, slice]]:
    """(frame index, rows, columns) of `batch` random crops (the network is fully convolutional;
    crops make CPU training affordable), most of them centred near a random foreground pixel so
    cement and needle are well seen."""
    n, size, _ = labels.shape
    idx = torch.randint(0, n, (batch,), generator=gen)
    windows = []
    for i in idx.tolist():
        lab = labels[i]
        if crop >= size:
            y0 = x0 = 0
        else:
            fg = torch.nonzero(lab >= 2) if torch.rand(1, generator=gen) < 0.7 else torch.empty(0, 2)
            if len(fg):
                cy, cx = fg[torch.randint(0, len(fg), (1,), generator=gen)][0].tolist()
                cy += int(torch.randint(-crop // 3, crop // 3 + 1, (1,), generator=gen))
                cx += int(torch.randint(-crop // 3, crop // 3 + 1, (1,), generator=gen))
            else:
                cy, cx = torch.randint(0, size, (2,), generator=gen).tolist()
            y0 = min(max(cy - crop // 2, 0), size - crop)
            x0 = min(max(cx - crop // 2, 0), size - crop)
        windows.append((i, slice(y0, y0 + crop), slice(x0, x0 + crop)))
    return windows


def reference_index(i: int, gen: torch.Generator, first_frame_share: float = 0.8) -> int:
    """The reference frame (REFERENCE_FIRST_FRAME) for training frame i: mostly its loop's first frame, as in the
    room when guidance starts before the injection; otherwise any earlier frame of the loop or
    the frame itself, as when guidance starts mid-injection (the model must not count on an
    empty reference)."""
    first = i - i % dataset.FRAMES_PER_LOOP
    if torch.rand(1, generator=gen) < first_frame_share:
        return first
    return int(torch.randint(first, i + 1, (1,), generator=gen))


def _moved(rows: slice, cols: slice, size: int, shift: int, gen: torch.Generator) -> tuple[slice, slice]:
    """The same window of a size x size plane moved by up to `shift` pixels each way (kept
    inside the plane): motion that registration leaves between reference and frame. With
    shift 0 the window as it is, and no random draw (the shipped recipe's batches)."""
    if shift == 0:
        return rows, cols
    dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
    dy = min(max(dy, -rows.start), size - rows.stop)
    dx = min(max(dx, -cols.start), size - cols.stop)
    return slice(rows.start + dy, rows.stop + dy), slice(cols.start + dx, cols.stop + dx)


def registered_reference(images: torch.Tensor, i: int, reference: int) -> torch.Tensor:
    """Frame `reference`'s whole plane registered onto frame i's, as the service registers the
    first frame onto each frame (guidance.segmentation.reference.register)."""
    if reference == i:
        return images[i]
    moved, _ = register(images[reference].numpy().astype(np.float32), images[i].numpy().astype(np.float32))
    return torch.from_numpy(moved).to(images.dtype)


def sample_crops(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    crop: int,
    gen: torch.Generator,
    channels: int = 1,
    reference_shift: int = 0,
    register_references: bool = False,
    shares: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random crops (crop_windows) of images [n, S, S] and their labels; with two
    channels the same crop of each frame's reference (reference_index) is the second: as it
    is, or (`register_references`) registered onto the frame first, as the service feeds it."""
    windows = crop_windows(labels, batch, crop, gen)
    if channels == 2:
        size = images.shape[-1]
        xs = []
        for i, r, c in windows:
            ref = reference_index(i, gen)
            plane = registered_reference(images, i, ref) if register_references else images[ref]
            xs.append(torch.stack([images[i, r, c], plane[_moved(r, c, size, reference_shift, gen)]]))
    else:
        xs = [images[i, r, c][None] for i, r, c in windows]
    if shares is not None:  # soft targets: [batch, classes, crop, crop], shares in 0..1
        soft = torch.stack([shares[i, :, rows, cols] for i, rows, cols in windows])
        return torch.stack(xs).float(), soft.float() / 255.0
    ys = [labels[i, rows, cols] for i, rows, cols in windows]
    return torch.stack(xs).float(), torch.stack(ys)


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheap batch augmentations on top of the simulator's own randomisation."""
    if torch.rand(1, generator=gen) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand(1, generator=gen) < 0.3:
        x, y = x.flip(-2), y.flip(-2)
    b = x.shape[0]
    gain = 1 + 0.25 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    offset = 0.4 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    noise = 0.15 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x * gain + offset + noise, y


def _as_shares(target: torch.Tensor, classes: int) -> torch.Tensor:
    """Class ids [B, H, W] -> one-hot [B, C, H, W]; shares [B, C, H, W] as they are."""
    if target.dim() == 4:
        return target
    return F.one_hot(target.long(), classes).permute(0, 3, 1, 2).float()


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy against class ids or soft shares (--targets soft); on
    one-hot shares it is F.cross_entropy(weight=weights) exactly (weighted mean)."""
    if target.dim() == 3:
        return F.cross_entropy(logits, target.long(), weight=weights)
    weighted = target * weights[None, :, None, None]
    return -(weighted * logits.log_softmax(1)).sum() / weighted.sum()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(1)[:, 1:]
    onehot = _as_shares(target, logits.shape[1])[:, 1:]
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (denom + 1)).mean()


def dice_per_class(pred: np.ndarray, target: np.ndarray, classes: int = len(CLASS_NAMES)) -> dict[str, float]:
    """Dice over all given pixels, per foreground class (nan when a class is absent from both)."""
    out = {}
    for c in range(1, classes):
        p, t = pred == c, target == c
        denom = int(p.sum()) + int(t.sum())
        out[CLASS_NAMES[c]] = float(2 * np.logical_and(p, t).sum() / denom) if denom else float("nan")
    return out


def model_inputs(frames: dataset.FrameSet, which: slice, channels: int) -> np.ndarray:
    """[n, channels, S, S] float32 of frames[which], and for two channels each one's loop's
    first frame registered onto it, as the service feeds them."""
    images = frames.images[which].astype(np.float32)
    if channels == 1:
        return images[:, None]
    refs = frames.first_frames(which).astype(np.float32)
    return np.stack([images, np.stack([register(r, x)[0] for r, x in zip(refs, images, strict=True)])], 1)


def evaluate_torch(model: nn.Module, frames: dataset.FrameSet, device: str, batch: int = 32) -> dict[str, float]:
    model.eval()
    preds = []
    channels = getattr(model, "channels", 1)
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            x = torch.from_numpy(model_inputs(frames, slice(i, i + batch), channels)).to(device)
            preds.append(model(x).argmax(1).cpu().numpy().astype(np.uint8))
    model.train()
    return dice_per_class(np.concatenate(preds), frames.labels)


def export_onnx(model: nn.Module, path: Path, size: int, meta: dict) -> str:
    """ONNX with a fixed opset and the model's metadata inside; returns its sha256."""
    import onnx

    model = model.cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(1, getattr(model, "channels", 1), size, size),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamo=False,
        dynamic_axes=None,
    )
    # the same function as a graph onnxruntime runs in its blocked layout throughout (models.graph)
    exported = onnx.load(str(path))
    proto = blocked_layout_graph(exported)
    meta = {**meta, "graph": {"rewrite": REWRITE_NAME, "block": BLOCK, "macs_as_run": conv_macs(proto)}}
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "guidance", json.dumps(meta, sort_keys=True)
    proto.producer_name = "cement-guidance models.train"
    proto.model_version = onnx_model_version(meta["version"])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "exported.onnx"
        onnx.save(exported, str(plain))
        worst, flips = compare_models(plain, path)
    if worst > 1e-4 or flips:
        why = f"logits by {worst:.1e}, {flips} px"
        raise RuntimeError(f"{path}: the blocked-layout graph differs from the export ({why})")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _widths(text: str) -> tuple[int, int, int]:
    """'64,128,192' -> (64, 128, 192): three channel counts, each a positive multiple of 16
    (onnxruntime's blocked layout, models.graph)."""
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 3 or any(w < 16 or w % 16 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: expected three multiples of 16, e.g. 64,128,192")
    return widths  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("models/segmenter.onnx"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--width", type=int, default=16)
    p.add_argument(
        "--full-width",
        type=int,
        default=8,
        help="channels of the full-resolution path (the exported graph pads it to 16 anyway: models.graph)",
    )
    p.add_argument(
        "--deep-widths",
        type=_widths,
        default=None,
        metavar="D4,D8,D16",
        help="channels at 1/4, 1/8 and 1/16 of the plane, multiples of 16 (default: 2, 4 and 6 times --width)",
    )
    p.add_argument("--channels", type=int, choices=(1, 2), default=2, help="2: the frame and the run's reference frame")
    p.add_argument(
        "--upsample",
        choices=UPSAMPLING,
        default="bilinear",
        help="the decoder's upsampling (nearest: cheaper to run; weights of either load into the other)",
    )
    p.add_argument("--train-loops", type=int, default=700)
    p.add_argument("--val-loops", type=int, default=60)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=160, help="training crop size (multiple of 16)")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes rendering the training frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--spread-frames",
        action="store_true",
        help="each training loop's 10 frames span 0.7-10 s of breathing (default: 15 fps, 0.7 s)",
    )
    p.add_argument("--reference-shift", type=int, default=0, help="move each reference crop up to this many pixels")
    p.add_argument(
        "--big-frames",
        type=float,
        default=0.0,
        help="share of loops rendered at 512-1024 px, the held-out sizes (default 0: all 320-768 px)",
    )
    p.add_argument(
        "--targets",
        choices=("hard", "soft"),
        default="hard",
        help="hard: each model pixel's majority class; soft: each class's share of the pixel",
    )
    p.add_argument(
        "--register-references",
        action="store_true",
        help="register each reference onto its frame before cropping, as the service does",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="export an exponential moving average of the weights with this decay (e.g. 0.999; 0: the last weights)",
    )
    p.add_argument("--data-cache", type=Path, default=None, help="keep rendered frames here, reuse them next time")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--log", type=Path, default=None, help="write the training log (JSON lines) here")
    p.add_argument("--init", type=Path, default=None, help="start from these weights (a .pt written by a run)")
    p.add_argument(
        "--version",
        type=version_type,
        default=CANDIDATE_VERSION,
        help=f"version in the exported model's metadata (default {CANDIDATE_VERSION}: a candidate, not yet shipped)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.big_frames <= 1.0:
        p.error("--big-frames must be a share within 0..1")
    if not 0.0 <= args.ema < 1.0:
        p.error("--ema must be a decay within [0, 1)")
    if args.steps < 1 or args.train_loops < 1 or args.val_loops < 1 or args.size % 16 or args.crop % 16:
        p.error("--steps, --train-loops and --val-loops must be >= 1 and --size a multiple of 16")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    t0 = time.monotonic()
    train_seeds = range(TRAIN_SEED_BASE + args.seed * 100_000, TRAIN_SEED_BASE + args.seed * 100_000 + args.train_loops)
    val_seeds = range(VAL_SEED_BASE, VAL_SEED_BASE + args.val_loops)
    print(f"rendering {args.train_loops} training loops and {args.val_loops} validation loops ...", flush=True)
    train = dataset.build_cached(
        train_seeds,
        args.size,
        args.workers,
        args.data_cache,
        spread=args.spread_frames,
        big_share=args.big_frames,
        shares=args.targets == "soft",
    )
    val = dataset.build_cached(
        val_seeds,
        args.size,
        args.workers,
        args.data_cache,
        progress=False,
        spread=args.spread_frames,
        big_share=args.big_frames,
    )
    t_data = time.monotonic() - t0
    print(f"  {len(train)} training frames, {len(val)} validation frames in {t_data:.0f} s", flush=True)

    architecture = {
        "width": args.width,
        "channels": args.channels,
        "full_width": args.full_width,
        "deep_widths": args.deep_widths,
        "upsample": args.upsample,
    }
    model = LeakUNet(**architecture)
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    model = model.to(device).to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(LeakUNet(**architecture), args.size)
    print(f"model: {params} parameters, {macs / 1e6:.1f} M MACs per frame", flush=True)

    # class balance: rare classes (cement, needle) weigh more
    freq = np.bincount(train.labels.ravel(), minlength=len(CLASS_NAMES)).astype(np.float64)
    weights = torch.tensor((freq.sum() / np.maximum(freq, 1)) ** 0.35, dtype=torch.float32)
    weights = (weights / weights.mean()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.from_numpy(train.images)
    labels = torch.from_numpy(train.labels)
    shares = torch.from_numpy(train.shares) if args.targets == "soft" else None
    log = args.log.open("w") if args.log else None
    # the weights' moving average (BatchNorm statistics averaged alike) smooths the last
    # steps' noise out of the exported model
    ema = (
        torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True
        )
        if args.ema
        else None
    )
    t_train = time.monotonic()
    model.train()
    for step in range(1, args.steps + 1):
        crops = sample_crops(
            images,
            labels,
            args.batch,
            args.crop,
            gen,
            args.channels,
            args.reference_shift,
            args.register_references,
            shares,
        )
        x, y = augment(*crops, gen)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        logits = model(x)
        loss = cross_entropy_loss(logits, y, weights) + dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        if step % 100 == 0 or step == args.steps:
            elapsed = time.monotonic() - t_train
            line = {
                "step": step,
                "loss": round(float(loss.detach()), 4),
                "lr": sched.get_last_lr()[0],
                "s": round(elapsed, 1),
            }
            if step % 500 == 0 or step == args.steps:
                line["val_dice"] = evaluate_torch(model, val, device)
                if ema is not None:
                    line["val_dice_ema"] = evaluate_torch(ema.module, val, device)
            print(json.dumps(line), flush=True)
            if log:
                log.write(json.dumps(line) + "\n")
                log.flush()
    train_s = time.monotonic() - t_train
    last_val_dice = evaluate_torch(model, val, device)
    val_dice = last_val_dice
    if ema is not None:
        model = ema.module  # what is exported
        val_dice = evaluate_torch(model, val, device)
    meta = {
        "name": "segmenter",
        "version": args.version,
        "input": {
            "name": "image",
            "size": args.size,
            "channels": args.channels,
            "layout": "NCHW",
            "dtype": "float32",
            **({"reference": REFERENCE_FIRST_FRAME} if args.channels == 2 else {}),
        },
        "resize": "letterbox",
        "normalization": DEFAULT_NORMALIZATION,
        "classes": list(CLASS_NAMES),
        "output": {"name": "logits", "kind": "logits"},
        "opset": OPSET,
        "parameters": params,
        "macs": macs,
        "training": {
            "train_seeds": [train_seeds.start, train_seeds.stop],
            "val_seeds": [val_seeds.start, val_seeds.stop],
            "frames_per_loop": dataset.FRAMES_PER_LOOP,
            "labels": dataset.SOFT_LABEL_RULE if args.targets == "soft" else dataset.LABEL_RULE,
            "steps": args.steps,
            "channels": args.channels,
            "spread_frames": args.spread_frames,
            "reference_shift": args.reference_shift,
            "register_references": args.register_references,
            "big_frames": args.big_frames,
            "width": args.width,
            "full_width": args.full_width,
            **({"deep_widths": list(args.deep_widths)} if args.deep_widths else {}),
            "upsample": args.upsample,
            "batch": args.batch,
            "crop": args.crop,
            "lr": args.lr,
            "seed": args.seed,
            "device": device,
            "threads": args.threads,
            "data_seconds": round(t_data),
            "train_seconds": round(train_s),
            "val_dice_model_resolution": {k: round(v, 4) for k, v in val_dice.items()},
            **(
                {"ema": args.ema, "val_dice_last_weights": {k: round(v, 4) for k, v in last_val_dice.items()}}
                if ema is not None
                else {}
            ),
            "data": "simulated only (models.sim)",
        },
    }
    if args.init:
        meta["training"]["init"] = args.init.name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out.with_suffix(".pt"))  # to resume or fine-tune from
    digest = export_onnx(model, args.out, args.size, meta)
    sums = write_sha256sums(args.out, digest)
    total = time.monotonic() - t0
    print(f"exported {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 {digest[:16]}..., listed in {sums})")
    print(f"validation Dice at model resolution: {json.dumps(val_dice)}")
    print(f"total {total / 60:.1f} min (data {t_data / 60:.1f}, training {train_s / 60:.1f})")
    if log:
        log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
