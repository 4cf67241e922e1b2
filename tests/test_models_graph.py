"""models.graph: the blocked-layout rewrite gives the same function as the exported graph, with
no channel Concat left and every inner convolution's output in whole blocks; the shipped model
is such a graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_python

torch = pytest.importorskip("torch")

from models.graph import (  # noqa: E402
    BLOCK,
    REWRITE_NAME,
    blocked_layout_graph,
    channel_counts,
    compare_models,
    onnx_model_version,
)
from models.train import LeakUNet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def channel_concats(model: onnx.ModelProto) -> list[str]:
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Concat" and any(a.name == "axis" and a.i == 1 for a in n.attribute)
    ]


def export(net: torch.nn.Module, path: Path, size: int) -> onnx.ModelProto:
    net.eval()
    torch.onnx.export(
        net,
        (torch.zeros(1, net.channels, size, size),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    return onnx.load(str(path))


@pytest.mark.parametrize(
    ("width", "deep_widths", "upsample"),
    [
        (16, None, "bilinear"),
        (8, None, "bilinear"),
        (12, None, "bilinear"),
        (16, (48, 96, 144), "bilinear"),
        (8, (32, 48, 64), "bilinear"),
        (16, (64, 128, 192), "nearest"),
    ],
)
def test_rewrite_keeps_the_function_and_leaves_whole_blocks(tmp_path, width, deep_widths, upsample):
    torch.manual_seed(width)
    net = LeakUNet(width=width, channels=2, deep_widths=deep_widths, upsample=upsample)
    with torch.no_grad():  # batch-norm statistics away from the identity, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    exported = export(net, tmp_path / "plain.onnx", 64)
    assert len(channel_concats(exported)) == 4  # the U-Net's skip connections
    rewritten = blocked_layout_graph(exported)
    onnx.save(rewritten, str(tmp_path / "blocked.onnx"))
    worst, flips = compare_models(tmp_path / "plain.onnx", tmp_path / "blocked.onnx", runs=4)
    assert worst < 1e-4 and flips == 0
    assert channel_concats(rewritten) == []
    widths = channel_counts(rewritten)
    inner = [n for n in rewritten.graph.node if n.op_type == "Conv" and n.output[0] != "logits"]
    assert all(widths[n.output[0]] % BLOCK == 0 for n in inner), {n.name: widths[n.output[0]] for n in inner}
    assert widths["logits"] == 4  # the output is what it was


def test_cli_rewrites_and_stamps_the_version(tmp_path):
    from models.train import export_onnx

    net = LeakUNet(width=8, channels=2)
    src = tmp_path / "m.onnx"
    export_onnx(net, src, 64, {"name": "segmenter", "version": "9.9.0"})
    # export_onnx already rewrites: so does the CLI, again, and keeps the function
    out = tmp_path / "again.onnx"
    res = run_python("-m", "models.graph", src, "-o", out, "--version", "9.9.1")
    assert res.returncode == 0, res.stderr
    assert "classes identical" in res.stdout
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["guidance"])
    assert meta["version"] == "9.9.1" and meta["graph"]["rewrite"] == REWRITE_NAME
    assert meta["history"] == ["9.9.0 -> 9.9.1: graph rewritten for the blocked layout, same weights"]
    first = json.loads({p.key: p.value for p in onnx.load(str(src)).metadata_props}["guidance"])
    assert first["graph"]["macs_as_run"] > 0


def test_a_version_that_is_not_major_minor_patch_is_refused_before_anything_is_written(tmp_path):
    for version in ("1.2", "v1.2.3", "1.2.3-rc1"):
        res = run_python("-m", "models.graph", tmp_path / "in.onnx", "-o", tmp_path / "o.onnx", "--version", version)
        assert res.returncode == 2 and "MAJOR.MINOR.PATCH" in res.stderr and version in res.stderr
    assert not (tmp_path / "o.onnx").exists()
    assert onnx_model_version("0.5.0") == 50 and onnx_model_version("1.2.3") == 123


def test_cli_refuses_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    res = run_python("-m", "models.graph", bad, "-o", tmp_path / "o.onnx", timeout=60)
    assert res.returncode == 2 and "bad.onnx" in res.stderr and "not an ONNX model" in res.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_shipped_model_is_the_blocked_layout_graph():
    shipped = onnx.load(str(REPO / "models" / "segmenter.onnx"))
    meta = json.loads({p.key: p.value for p in shipped.metadata_props}["guidance"])
    assert meta["graph"]["rewrite"] == REWRITE_NAME and meta["graph"]["block"] == BLOCK
    assert channel_concats(shipped) == []
    # zero channels (where a layer is not a whole number of blocks) cost multiply-accumulates
    # of their own, in exchange for the layout; 0.5.0's layers are all whole blocks
    assert meta["macs"] <= meta["graph"]["macs_as_run"] < 1.5 * meta["macs"]


def test_rewrite_splits_a_depthwise_bias_and_keeps_a_hand_made_graph(tmp_path):
    """A Concat -> depthwise (with bias) -> 1x1 -> ReLU graph written by hand, one part straight
    from the input (8 channels, not padded) and one from a 12-channel convolution (padded)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "c.w", "c.b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["a"]),
        helper.make_node("Concat", ["a", "x"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "dw.w", "dw.b"], ["dw"], group=20, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["dw", "pw.w", "pw.b"], ["pw"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["pw"], ["r"]),
        helper.make_node("Conv", ["r", "head.w"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [w("c.w", 12, 8, 3, 3), w("c.b", 12), w("dw.w", 20, 1, 3, 3), w("dw.b", 20), w("pw.w", 10, 20, 1, 1)]
    inits += [w("pw.b", 10), w("head.w", 3, 10, 1, 1)]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "hand.onnx"))
    rewritten = blocked_layout_graph(model)
    onnx.save(rewritten, str(tmp_path / "blocked.onnx"))
    worst, flips = compare_models(tmp_path / "hand.onnx", tmp_path / "blocked.onnx")
    assert worst < 1e-4 and flips == 0
    assert channel_concats(rewritten) == []
    widths = channel_counts(rewritten)
    assert widths["c"] == 16 and widths["pw"] == 16 and widths["y"] == 3
