"""The model's operating point: a constant added to one class's logit before the argmax.

A segmenter trained with cross-entropy and Dice need not put its class boundaries where Dice
at the frame's resolution is best: the shipped 0.4.1 draws cement a little generously (on
held-out frames, more false cement beside the needle and at the margins than missed cement).
Moving the cement logit by a constant moves every cement boundary at once; the constant is
chosen on loops of a seed range of its own (`TUNING_SEED_BASE`: neither training, validation
nor the held-out test set of models.evaluate uses it), then measured on the held-out set like
any model.

    python -m models.operating_point --tune                                 # Dice per bias, tuning loops
    python -m models.operating_point --tune --seed-base 7000000 --loops 96 --condition bone_dark --biases 0 -0.5
    python -m models.operating_point --apply -0.5 -o OUT.onnx --version 0.4.2

`--apply` writes the bias into the head convolution's own bias (no new node, no inference
cost), records it in the metadata (`output.logit_bias`, `history`, `version`) and checks that
the new logits are the old ones plus the bias. The runtime needs nothing new: it reads logits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from guidance.segmentation.model import write_sha256sums
from guidance.segmentation.preprocess import CLASS_NAMES
from models.graph import onnx_model_version, version_type

TUNING_SEED_BASE = 7_500_000  # models.evaluate's held-out loops start at 7,000,000
BIASES = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5)


def dice_by_bias(
    model: Path,
    loops: int,
    cls: str = "cement",
    biases=BIASES,
    seed_base: int = TUNING_SEED_BASE,
    condition: str = "as_drawn",
) -> dict[float, float]:
    """Pooled Dice of `cls` at each frame's own resolution (as models.evaluate measures it) on
    `loops` loops of a models.evaluate condition from `seed_base`, for each bias added to that
    class's logit."""
    from models.evaluate import CONDITIONS, held_out_frames, load_session, model_input, planes_at_frame_resolution

    c = CLASS_NAMES.index(cls)
    session, meta = load_session(model, threads=1)
    inter = np.zeros(len(biases))
    total = np.zeros(len(biases))
    seeds = range(seed_base, seed_base + loops)
    for _, frame, truth, reference in held_out_frames(meta, CONDITIONS[condition], seeds, 0):
        x, g = model_input(meta, frame, reference)
        planes = planes_at_frame_resolution(session.run(None, {meta["input"]["name"]: x})[0][0], g)
        others = np.delete(planes, c, axis=0).max(axis=0)
        is_c = truth == c
        for i, b in enumerate(biases):
            pred = planes[c] + b > others  # argmax picks c (ties go to the lower index: rare)
            inter[i] += np.count_nonzero(pred & is_c)
            total[i] += np.count_nonzero(pred) + np.count_nonzero(is_c)
    return {b: float(2 * inter[i] / total[i]) if total[i] else float("nan") for i, b in enumerate(biases)}


def with_logit_bias(model, cls: str, bias: float, version: str | None, note: str):
    """A copy of the ONNX model whose `cls` logit is `bias` higher (the head convolution's
    bias), its metadata saying so."""
    import copy

    from onnx import numpy_helper

    out = copy.deepcopy(model)
    graph = out.graph
    head = next(n for n in graph.node if graph.output[0].name in n.output)
    if head.op_type != "Conv" or len(head.input) < 3:
        raise ValueError("the graph's output is not a convolution with a bias: cannot move a logit")
    init = next(i for i in graph.initializer if i.name == head.input[2])
    values = numpy_helper.to_array(init).copy()
    c = CLASS_NAMES.index(cls)
    values[c] += np.float32(bias)
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    props = {p.key: p for p in out.metadata_props}
    meta = json.loads(props["guidance"].value)
    shift = meta["output"].get("logit_bias", [0.0] * len(CLASS_NAMES))
    shift[c] = round(shift[c] + bias, 6)
    meta["output"]["logit_bias"] = shift
    old = meta.get("version")
    if version:
        meta["version"] = version
        out.model_version = onnx_model_version(version)
    meta.setdefault("history", []).append(f"{old} -> {meta.get('version')}: {cls} logit {bias:+g} ({note})")
    props["guidance"].value = json.dumps(meta, sort_keys=True)
    return out


def check_shift(a_path: Path, b_path: Path, cls: str, bias: float) -> float:
    """Largest difference between b's logits and a's plus the bias (models.graph's comparison)."""
    from models.graph import compare_models

    offset = np.zeros(len(CLASS_NAMES), np.float32)
    offset[CLASS_NAMES.index(cls)] = bias
    return compare_models(a_path, b_path, a_offset=offset)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(__file__).with_name("segmenter.onnx"))
    ap.add_argument("--class", dest="cls", default="cement", choices=CLASS_NAMES[1:])
    ap.add_argument("--tune", action="store_true", help="print Dice per bias on the tuning loops")
    ap.add_argument("--loops", type=int, default=24, help="tuning loops (as drawn, 8 frames each)")
    ap.add_argument("--biases", type=float, nargs="+", default=list(BIASES), help="biases to tune over")
    ap.add_argument(
        "--seed-base",
        type=int,
        default=TUNING_SEED_BASE,
        help="first loop's seed (default: the tuning range; 7000000 measures on the held-out set)",
    )
    ap.add_argument("--condition", default="as_drawn", help="a models.evaluate condition (default as_drawn)")
    ap.add_argument("--apply", type=float, help="write a model with this bias added to the class's logit")
    ap.add_argument("-o", "--out", type=Path)
    ap.add_argument("--version", type=version_type, help="version of the written model (MAJOR.MINOR.PATCH)")
    ap.add_argument("--note", default="Dice-optimal on the tuning loops")
    args = ap.parse_args(argv)
    if args.tune == (args.apply is not None):
        ap.error("give one of --tune or --apply")
    if args.apply is not None and not args.out:
        ap.error("--apply needs -o OUT.onnx")
    if args.loops < 1:
        ap.error("--loops must be at least 1")
    from models.evaluate import CONDITIONS

    if args.condition not in CONDITIONS:
        ap.error(f"--condition {args.condition!r}: expected one of {', '.join(CONDITIONS)}")
    if args.tune:
        seeds = f"{args.seed_base:,}-{args.seed_base + args.loops - 1:,}"
        what = f"{args.loops} loops {args.condition} (seeds {seeds})"
        print(f"{args.model.name}: {args.cls} Dice at frame resolution, {what}")
        results = dice_by_bias(args.model, args.loops, args.cls, tuple(args.biases), args.seed_base, args.condition)
        best = max(results, key=results.get)
        for b, d in results.items():
            print(f"  bias {b:+.2f}: {d:.4f}{'  <- best' if b == best else ''}")
        return 0
    from models.graph import read_onnx, save_checked

    try:
        model = read_onnx(args.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        out = with_logit_bias(model, args.cls, args.apply, args.version, args.note)
    except (ValueError, KeyError) as exc:
        print(f"error: {args.model}: {exc}", file=sys.stderr)
        return 2

    def check(saved: Path) -> tuple[float, str | None]:
        worst = check_shift(args.model, saved, args.cls, args.apply)
        if worst > 1e-4:
            return worst, f"the new logits are not the old ones {args.apply:+g} ({worst:.1e} off)"
        return worst, None

    worst, problem = save_checked(out, args.out, check)  # -o may be --model: replaced only once checked
    if problem is not None:
        print(f"error: {problem}: not written", file=sys.stderr)
        return 1
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    sums = write_sha256sums(args.out, digest)
    print(f"{args.out}: sha256 {digest} (listed in {sums}); {args.cls} logit {args.apply:+g} (checked to {worst:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
