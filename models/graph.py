"""Export-time rewrite of the segmenter's ONNX graph into an equivalent one that onnxruntime's
CPU provider runs in its blocked channel layout (NCHWc) from end to end.

onnxruntime runs convolutions fastest in a blocked layout (channels in groups of 8 with AVX2, 16
with AVX-512). It converts only convolutions whose output channels fill whole blocks, and it has
no blocked Concat: each U-Net skip connection (Concat on the channel axis) and the two 8-channel
convolutions at full resolution were run in plain NCHW, with reorders in and out of the blocked
layout around them. Those reorders, the concatenations and the plain convolutions were 40 % of a
frame's inference (`python runs/s5/ortprof.py`-style per-node profile, 2026-11-30).

The rewrite changes no weight and no result:

* A Concat on channels feeding a depthwise convolution and then a 1x1 convolution becomes two
  depthwise convolutions (one per part: a depthwise filter sees one channel) whose 1x1
  convolutions are added: W @ [a; b] = W_a @ a + W_b @ b. onnxruntime fuses the Add into the
  second convolution.
* A convolution whose output channels do not fill whole blocks gets zero filters up to a multiple
  of `BLOCK` (zero weights, zero bias: the extra channels are 0 after ReLU), and the layers that
  read it get zero weights for those channels.

`python -m models.graph IN.onnx -o OUT.onnx [--version V]` rewrites an exported model and checks
on random inputs that both graphs give the same logits (to float rounding) and the same classes
before writing. `models.train` applies it to every model it exports.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

BLOCK = 16  # AVX-512's NCHWc block; a multiple of 16 is also whole blocks of AVX2's 8
CHANNELWISE = {"Relu", "Resize"}  # ops that act on each channel alone: zero channels stay zero
REWRITE_NAME = "blocked-layout"


class GraphRewriteError(ValueError):
    """The graph has a shape this rewrite does not know how to keep equivalent."""


VERSION = re.compile(r"\d+\.\d+\.\d+")  # a model's version: MAJOR.MINOR.PATCH in digits


def version_type(text: str) -> str:
    """argparse type of a model's --version (VERSION; also its ONNX model_version)."""
    if not VERSION.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MAJOR.MINOR.PATCH in digits")
    return text


def onnx_model_version(version: str) -> int:
    """The ONNX file's integer model_version for a MAJOR.MINOR.PATCH version: its digits
    ("0.5.0" -> 50), as the shipped files carry it."""
    if not VERSION.fullmatch(version):
        raise ValueError(f"model version {version!r}: expected MAJOR.MINOR.PATCH in digits")
    return int(version.replace(".", ""))


def _round_up(c: int, block: int) -> int:
    return -(-c // block) * block


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_depthwise(node, weights: dict[str, np.ndarray]) -> bool:
    if node.op_type != "Conv" or node.input[1] not in weights:
        return False
    w = weights[node.input[1]]
    return w.shape[1] == 1 and _attrs(node).get("group", 1) == w.shape[0] > 1


def _is_pointwise(node, weights: dict[str, np.ndarray]) -> bool:
    if node.op_type != "Conv" or node.input[1] not in weights:
        return False
    attrs = _attrs(node)
    plain = all(v == 1 for v in attrs.get("strides", [1])) and not any(attrs.get("pads", [0]))
    return weights[node.input[1]].shape[2:] == (1, 1) and attrs.get("group", 1) == 1 and plain


def _sizes_its_own_resize(shape_node, consumers: dict[str, list]) -> bool:
    """True when a Shape's result only reaches, through Slice and Concat, the `sizes` of a
    Resize of the same tensor (the exporter's bilinear upsampling): the channel count it
    carries is then that tensor's own, padded or not."""
    tensor, frontier = shape_node.input[0], [shape_node.output[0]]
    while frontier:
        name = frontier.pop()
        for use in consumers.get(name, []):
            if use.op_type in ("Slice", "Concat"):
                frontier.append(use.output[0])
            elif not (use.op_type == "Resize" and use.input[0] == tensor and list(use.input).index(name) == 3):
                return False
    return True


def channel_counts(model) -> dict[str, int]:
    """Channels (dim 1) of every tensor whose shape onnx's shape inference can fix."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    out: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value"):
            out[vi.name] = dims[1].dim_value
    return out


def blocked_layout_graph(model, block: int = BLOCK):
    """An equivalent ModelProto without channel Concats before depthwise/pointwise pairs and
    with every non-final convolution's output padded to whole blocks (see the module doc)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    # the exporter shares equal tensors through Identity nodes: read them as the weights they are
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in weights}
    weights.update({alias: weights[source] for alias, source in aliases.items()})
    channels = channel_counts(model)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    new_weights: dict[str, np.ndarray] = {}
    nodes: list = []
    padded: dict[str, int] = {}  # tensor -> channel count with its zero channels
    done: set[int] = set()  # ids of nodes already emitted as part of a rewritten group

    def weight(name: str, array: np.ndarray) -> str:
        new_weights[name] = np.ascontiguousarray(array, dtype=np.float32)
        return name

    def width(tensor: str) -> int:
        return padded.get(tensor, channels[tensor])

    for node in graph.node:
        if id(node) in done or (node.op_type == "Identity" and node.output[0] in aliases):
            continue
        only = consumers.get(node.output[0], [])
        if (
            node.op_type == "Concat"
            and _attrs(node).get("axis") == 1
            and len(only) == 1
            and _is_depthwise(only[0], weights)
            and len(consumers.get(only[0].output[0], [])) == 1
            and _is_pointwise(consumers[only[0].output[0]][0], weights)
        ):
            depthwise = only[0]
            pointwise = consumers[depthwise.output[0]][0]
            dw_name, pw_name = depthwise.name or depthwise.output[0], pointwise.name or pointwise.output[0]
            dw, pw = weights[depthwise.input[1]], weights[pointwise.input[1]]
            dw_bias = weights[depthwise.input[2]] if len(depthwise.input) > 2 else None
            bias = weights[pointwise.input[2]] if len(pointwise.input) > 2 else np.zeros(pw.shape[0], np.float32)
            if any(i in padded for i in pointwise.input[1:]) or pointwise.output[0] in outputs:
                raise GraphRewriteError(f"{pointwise.name}: unexpected inputs or a graph output")
            cout = pw.shape[0]
            cout_padded = _round_up(cout, block)
            dw_attrs = {k: v for k, v in _attrs(depthwise).items() if k != "group"}
            partial_sums = []
            start = 0
            for k, part in enumerate(node.input):
                true_c, wide_c = channels[part], width(part)
                dw_part = np.zeros((wide_c, *dw.shape[1:]), np.float32)
                dw_part[:true_c] = dw[start : start + true_c]
                pw_part = np.zeros((cout_padded, wide_c, 1, 1), np.float32)
                pw_part[:cout, :true_c] = pw[:, start : start + true_c]
                start += true_c
                dw_inputs = [part, weight(f"{dw_name}_part{k}.weight", dw_part)]
                if dw_bias is not None:
                    dw_part_bias = np.zeros(wide_c, np.float32)
                    dw_part_bias[:true_c] = dw_bias[start - true_c : start]
                    dw_inputs.append(weight(f"{dw_name}_part{k}.bias", dw_part_bias))
                dw_out = f"{depthwise.output[0]}_part{k}"
                nodes.append(
                    helper.make_node(
                        "Conv",
                        dw_inputs,
                        [dw_out],
                        name=f"{dw_name}_part{k}",
                        group=wide_c,
                        **dw_attrs,
                    )
                )
                pw_inputs = [dw_out, weight(f"{pw_name}_part{k}.weight", pw_part)]
                if k == 0:
                    padded_bias = np.zeros(cout_padded, np.float32)
                    padded_bias[:cout] = bias
                    pw_inputs.append(weight(f"{pw_name}_part{k}.bias", padded_bias))
                partial_sums.append(f"{pointwise.output[0]}_part{k}")
                nodes.append(helper.make_node("Conv", pw_inputs, [partial_sums[-1]], name=f"{pw_name}_part{k}"))
            if start != dw.shape[0]:
                raise GraphRewriteError(f"{node.name}: parts have {start} channels, {depthwise.name} {dw.shape[0]}")
            total = partial_sums[0]
            for k, term in enumerate(partial_sums[1:], 1):
                name = pointwise.output[0] if k == len(partial_sums) - 1 else f"{pointwise.output[0]}_sum{k}"
                nodes.append(helper.make_node("Add", [total, term], [name], name=f"{pw_name}_sum{k}"))
                total = name
            if cout_padded != cout:
                padded[pointwise.output[0]] = cout_padded
            done.update({id(depthwise), id(pointwise)})
            continue
        if node.op_type == "Conv" and node.input[1] in weights:
            w = weights[node.input[1]]
            group = _attrs(node).get("group", 1)
            source = node.input[0]
            final = node.output[0] in outputs
            if group == 1 and (source in padded or (w.shape[0] % block and not final)):
                cout = w.shape[0]
                cout_padded = cout if final else _round_up(cout, block)
                wide = np.zeros((cout_padded, width(source), *w.shape[2:]), np.float32)
                wide[:cout, : w.shape[1]] = w
                inputs = [source, weight(f"{node.name or node.output[0]}.weight_blocked", wide)]
                if len(node.input) > 2:
                    b = np.zeros(cout_padded, np.float32)
                    b[:cout] = weights[node.input[2]]
                    inputs.append(weight(f"{node.name or node.output[0]}.bias_blocked", b))
                nodes.append(helper.make_node("Conv", inputs, list(node.output), name=node.name, **_attrs(node)))
                if cout_padded != cout:
                    padded[node.output[0]] = cout_padded
                continue
            if source in padded:
                if not _is_depthwise(node, weights):
                    raise GraphRewriteError(f"{node.name}: grouped convolution of a padded tensor")
                # depthwise: one filter per channel, zero filters for the zero channels
                wide = np.zeros((width(source), *w.shape[1:]), np.float32)
                wide[: w.shape[0]] = w
                inputs = [source, weight(f"{node.name or node.output[0]}.weight_blocked", wide)]
                if len(node.input) > 2:
                    b = np.zeros(width(source), np.float32)
                    b[: w.shape[0]] = weights[node.input[2]]
                    inputs.append(weight(f"{node.name or node.output[0]}.bias_blocked", b))
                attrs = {**_attrs(node), "group": width(source)}
                nodes.append(helper.make_node("Conv", inputs, list(node.output), name=node.name, **attrs))
                padded[node.output[0]] = width(source)
                continue
        elif node.op_type in CHANNELWISE:
            if node.input[0] in padded:
                if node.output[0] in outputs:
                    raise GraphRewriteError(f"{node.name}: a padded tensor would be a graph output")
                padded[node.output[0]] = padded[node.input[0]]
        elif node.op_type == "Shape" and node.input[0] in padded and _sizes_its_own_resize(node, consumers):
            pass  # the size a Resize is asked for, of the same (padded) tensor: consistent
        elif any(i in padded for i in node.input):
            raise GraphRewriteError(f"{node.name} ({node.op_type}) reads a padded tensor")
        nodes.append(node)

    used = {name for node in nodes for name in node.input}
    initializers = [numpy_helper.from_array(weights[n], n) for n in weights if n in used and n not in new_weights]
    initializers += [numpy_helper.from_array(a, n) for n, a in new_weights.items() if n in used]
    rewritten = copy.deepcopy(model)
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    del rewritten.graph.initializer[:]
    rewritten.graph.initializer.extend(initializers)
    del rewritten.graph.value_info[:]
    onnx.checker.check_model(rewritten)
    return rewritten


def conv_macs(model) -> int:
    """Multiply-accumulates of every convolution in the graph as it runs (padding included)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*inferred.graph.value_info, *inferred.graph.output]
    }
    weights = {t.name: t.dims for t in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            macs += int(np.prod(shapes[node.output[0]])) * int(np.prod(w[1:]))
    return macs


def compare_models(
    a_path: Path, b_path: Path, runs: int = 4, seed: int = 0, a_offset: np.ndarray | None = None
) -> tuple[float, int]:
    """(largest |logit difference|, pixels whose class differs although `a`'s two best logits
    are further apart than that difference) between two models, on random standardised inputs
    and on flat ones, with onnxruntime's CPU provider. Equivalent graphs give (~1e-6, 0).
    `a_offset` (one value per class) is added to `a`'s logits first: what `b` should be."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(a_path), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(b_path), providers=["CPUExecutionProvider"])
    spec = a.get_inputs()[0]
    shape = [int(d) for d in spec.shape]
    rng = np.random.default_rng(seed)
    worst, real_flips = 0.0, 0
    for i in range(runs):
        x = rng.normal(0, 1, shape).astype(np.float32) if i % 2 == 0 else np.full(shape, rng.normal(), np.float32)
        la = a.run(None, {spec.name: x})[0]
        if a_offset is not None:
            la = la + np.asarray(a_offset, la.dtype).reshape(1, -1, *([1] * (la.ndim - 2)))
        lb = b.run(None, {spec.name: x})[0]
        diff = float(np.abs(la - lb).max())
        worst = max(worst, diff)
        top2 = np.sort(la, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        real_flips += int(np.count_nonzero((la.argmax(1) != lb.argmax(1)) & (margin > 2 * diff)))
    return worst, real_flips


def read_onnx(path: Path):
    """onnx.load, its failures (onnx raises its own types) as one ValueError naming the file."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not an ONNX model ({exc})") from None


def save_checked(model, out: Path, check: Callable[[Path], tuple[float, str | None]]) -> tuple[float, str | None]:
    """Write `model` to `out` only if `check` finds nothing wrong with it as saved: it is saved
    beside `out` first, so a failed check replaces nothing (`out` may be the input model).
    `check(path)` -> (its measure, a complaint or None); returns the same, `out` written when
    the complaint is None."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    measure, problem = check(tmp)
    if problem is None:
        tmp.replace(out)
    else:
        tmp.unlink()
    return measure, problem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--version", type=version_type, help="new version for the metadata (default: keep)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest logit difference accepted")
    args = ap.parse_args(argv)
    try:
        original = read_onnx(args.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        rewritten = blocked_layout_graph(original)
    except (GraphRewriteError, KeyError) as exc:
        print(f"error: {args.model}: cannot rewrite ({exc})", file=sys.stderr)
        return 2
    props = {p.key: p.value for p in rewritten.metadata_props}
    if "guidance" in props:
        meta = json.loads(props["guidance"])
        meta["graph"] = {"rewrite": REWRITE_NAME, "block": BLOCK, "macs_as_run": conv_macs(rewritten)}
        if args.version:
            meta.setdefault("history", []).append(
                f"{meta.get('version')} -> {args.version}: graph rewritten for the blocked layout, same weights"
            )
            meta["version"] = args.version
        for p in rewritten.metadata_props:
            if p.key == "guidance":
                p.value = json.dumps(meta, sort_keys=True)
    if args.version:
        rewritten.model_version = onnx_model_version(args.version)

    def check(saved: Path) -> tuple[float, str | None]:
        worst, flips = compare_models(args.model, saved)
        return worst, (f"logits by {worst:.2e}, {flips} pixels' class" if worst > args.tolerance or flips else None)

    worst, problem = save_checked(rewritten, args.out, check)
    if problem is not None:
        print(f"error: the rewritten graph differs ({problem}): not written", file=sys.stderr)
        return 1
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"{args.out}: sha256 {digest}; logits within {worst:.1e} of {args.model.name}, classes identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
