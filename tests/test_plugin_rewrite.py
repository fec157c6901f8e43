"""The plugin rewrite: every depthwise LiteConv and gate becomes a TensorRT plugin node, and the
rewritten graph, its plugins executed by the NumPy references, equals the original."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine_builder.export import export_onnx
from engine_builder.models import create_osnet
from engine_builder.plugin_rewrite import plugin_bound_node_names, plugin_nodes, rewrite_to_plugins
from kernels.onnxruntime_reference_ops import run_reference
from kernels.plugin_specs import AGGREGATION_GATE, DEPTHWISE_LITECONV, DEPTHWISE_LITECONV_SUMS, PLUGINS


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rewrite")

    def export(variant: str) -> onnx.ModelProto:
        path = directory / f"{variant}.onnx"
        if not path.exists():
            export_onnx(create_osnet(variant), path, verify_batch_sizes=(1,))
        return onnx.load(path)

    return export


def test_osnet_x1_0_has_60_depthwise_and_6_gate_nodes(exported):
    rewritten, counts = rewrite_to_plugins(exported("osnet_x1_0"))
    ops = [node.op_type for node in plugin_nodes(rewritten)]
    assert ops.count(DEPTHWISE_LITECONV.name) + ops.count(DEPTHWISE_LITECONV_SUMS.name) == 60
    assert ops.count(DEPTHWISE_LITECONV_SUMS.name) == 24  # the last LiteConv of each of 4 streams x 6 blocks
    assert ops.count(AGGREGATION_GATE.name) == 6
    assert (counts.depthwise, counts.depthwise_with_sums, counts.gates) == (60, 24, 6)
    remaining = [n.name for n in rewritten.graph.node if n.op_type in ("Sigmoid", "Mul") or (n.op_type == "Conv" and _group(n) > 1)]
    assert remaining == ["/normalize/Mul"]  # the input prologue's scale (export.PixelNormalization), not a gate


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def test_plugin_nodes_are_what_tensorrts_onnx_parser_resolves(exported):
    rewritten, _ = rewrite_to_plugins(exported("osnet_x0_25"), aot=True)
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in rewritten.graph.initializer}
    for node in plugin_nodes(rewritten):
        spec = PLUGINS[node.op_type]
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes == {"plugin_namespace": b"osnet", "plugin_version": b"1", "aot": 1}
        assert node.domain == ""
        assert len(node.input) == len(spec.inputs) and len(node.output) == len(spec.outputs)
        weights = [initializers[name] for name, tensor in zip(node.input, spec.inputs) if tensor.kind == "fp32" and name in initializers]
        assert all(w.dtype == np.float32 for w in weights)
        if spec is not AGGREGATION_GATE:
            channels = weights[1].shape[0]
            assert weights[0].shape == (channels, 9)
        else:
            fc1_weight, fc1_bias, fc2_weight, fc2_bias = weights
            sums_producers = {p.op_type for p in rewritten.graph.node if set(p.output) & set(node.input[4:8])}
            assert sums_producers == {DEPTHWISE_LITECONV_SUMS.name}
            hidden, channels = fc1_weight.shape
            assert fc1_bias.shape == (hidden,) and fc2_weight.shape == (channels, hidden) and fc2_bias.shape == (channels,)
    jit, _ = rewrite_to_plugins(exported("osnet_x0_25"), aot=False)
    assert {onnx.helper.get_attribute_value(a) for n in plugin_nodes(jit) for a in n.attribute if a.name == "aot"} == {0}


@pytest.mark.parametrize(("variant", "batch"), [("osnet_x0_25", 3), ("osnet_ain_x0_25", 2), ("osnet_x1_0", 1)])
def test_rewritten_graph_equals_original(exported, variant, batch):
    original = exported(variant)
    rewritten, counts = rewrite_to_plugins(original)
    assert counts.gates == 6
    images = np.random.default_rng(3).integers(0, 256, (batch, 256, 128, 3), dtype=np.uint8)
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(["FEATURES", "EMBEDDING"], {"INPUT": images})
    actual = run_reference(rewritten, images, ["FEATURES", "EMBEDDING"])
    for want, got in zip(expected, actual):
        assert np.max(np.abs(want - got)) <= 1e-4


def test_quantization_leaves_exactly_the_plugin_bound_convolutions_alone(exported):
    names = plugin_bound_node_names(exported("osnet_x1_0"))
    # 60 depthwise convolutions, and fc1 + fc2 of the gate for each of 4 streams in 6 blocks.
    assert len(names) == 60 + 6 * 4 * 2
    assert all("conv2" in name or "gate" in name for name in names)


def test_fp16_plugins_in_an_fp32_graph_cast_only_at_the_chain_ends(exported):
    rewritten, _ = rewrite_to_plugins(exported("osnet_x0_25"), fp16_plugins=True)
    producers = {output: node for node in rewritten.graph.node for output in node.output}
    types = {info.name: info.type.tensor_type.elem_type for info in rewritten.graph.value_info}
    for node in plugin_nodes(rewritten):
        spec = PLUGINS[node.op_type]
        for index in spec.activation_inputs:
            producer = producers[node.input[index]]
            assert producer.op_type in PLUGINS or producer.op_type == "Cast"
            assert types[node.input[index]] == onnx.TensorProto.FLOAT16
    for cast in (n for n in rewritten.graph.node if n.op_type == "Cast" and n.input[0] in producers and producers[n.input[0]].op_type in PLUGINS):
        consumers = [n for n in rewritten.graph.node if cast.output[0] in n.input]
        assert any(consumer.op_type not in PLUGINS for consumer in consumers), "a cast between two plugins"
