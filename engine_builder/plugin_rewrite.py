"""Rewrite an exported OSNet graph so TensorRT runs the fused kernels: plugin nodes in place of
every depthwise LiteConv (Conv 3x3 depthwise with folded BN, then Relu) and every aggregation
gate (4 x [GlobalAveragePool, fc1, Relu, fc2, Sigmoid, Mul], then 3 Adds).

Works on the FP32, FP16 and Q/DQ INT8 graphs alike: it runs after precision conversion, so the
plugin nodes take whatever activation type the graph carries there, and FP32 weights.
Node layout (TensorRT's ONNX parser resolves unknown ops through the plugin registry): op_type is
the plugin name, attributes `plugin_namespace`, `plugin_version` and `aot`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from kernels.plugin_specs import AGGREGATION_GATE, DEPTHWISE_LITECONV, DEPTHWISE_LITECONV_SUMS, PLUGINS, PluginSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewriteCounts:
    depthwise: int
    depthwise_with_sums: int
    gates: int


@dataclass
class _GateMatch:
    root: gs.Node  # the last Add, whose output is the gate's output
    streams: list[gs.Variable]
    fc_convs: list[gs.Node]
    fc1_weight: np.ndarray
    fc1_bias: np.ndarray
    fc2_weight: np.ndarray
    fc2_bias: np.ndarray


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant input, seen through the Identity nodes the exporter adds for shared weights."""
    while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _is_depthwise_3x3(conv: gs.Node) -> bool:
    weight = _constant(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if conv.op != "Conv" or weight is None or weight.ndim != 4:
        return False
    channels = weight.shape[0]
    return (
        weight.shape[1:] == (1, 3, 3)
        and conv.attrs.get("group", 1) == channels
        and list(conv.attrs.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
        and list(conv.attrs.get("strides", [1, 1])) == [1, 1]
        and list(conv.attrs.get("dilations", [1, 1])) == [1, 1]
    )


def _depthwise_liteconvs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(conv, relu) pairs where a depthwise 3x3 feeds only a Relu."""
    pairs = []
    for conv in graph.nodes:
        if conv.op == "Conv" and _is_depthwise_3x3(conv):
            consumers = conv.outputs[0].outputs
            if len(consumers) == 1 and consumers[0].op == "Relu":
                pairs.append((conv, consumers[0]))
    return pairs


def _gated_stream(mul: gs.Node) -> tuple[gs.Variable, gs.Node, gs.Node] | None:
    """For `x * sigmoid(fc2(relu(fc1(GAP(x)))))`: (x, fc1, fc2); None for any other Mul."""
    if mul.op != "Mul" or len(mul.inputs) != 2:
        return None
    for stream, gate in (mul.inputs, mul.inputs[::-1]):
        sigmoid = _producer(gate, "Sigmoid")
        fc2 = sigmoid and _producer(sigmoid.inputs[0], "Conv")
        relu = fc2 and _producer(fc2.inputs[0], "Relu")
        fc1 = relu and _producer(relu.inputs[0], "Conv")
        pool = fc1 and _producer(fc1.inputs[0], "GlobalAveragePool")
        if pool is not None and pool.inputs[0] is stream and len(fc1.inputs) == 3 and len(fc2.inputs) == 3:
            return stream, fc1, fc2
    return None


def _add_tree(add: gs.Node) -> tuple[list[gs.Tensor], list[gs.Node]]:
    """The leaves of a tree of Adds whose inner results feed nothing else, and its inner Adds."""
    leaves, inner_adds = [], []
    for tensor in add.inputs:
        inner = _producer(tensor, "Add")
        if inner is not None and len(tensor.outputs) == 1:
            inner_leaves, deeper = _add_tree(inner)
            leaves += inner_leaves
            inner_adds += [inner, *deeper]
        else:
            leaves.append(tensor)
    return leaves, inner_adds


def _aggregation_gates(graph: gs.Graph) -> list[_GateMatch]:
    matches, consumed = [], set()
    for add in reversed(graph.nodes):  # roots first, so inner Adds are claimed by their root
        if add.op != "Add" or id(add) in consumed:
            continue
        leaves, inner_adds = _add_tree(add)
        gated = [mul and _gated_stream(mul) for mul in (_producer(leaf, "Mul") for leaf in leaves)]
        if len(gated) != 4 or not all(gated):
            continue
        weights = [[_constant(t) for t in (*fc1.inputs[1:], *fc2.inputs[1:])] for _, fc1, fc2 in gated]
        if any(w is None for w in weights[0]) or not all(
            all(np.array_equal(a, b) for a, b in zip(weights[0], other)) for other in weights[1:]
        ):
            continue  # not one shared gate: leave it to TensorRT
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = weights[0]
        hidden, channels = fc1_weight.shape[:2]
        matches.append(
            _GateMatch(
                root=add,
                streams=[stream for stream, _, _ in gated],
                fc_convs=[conv for _, fc1, fc2 in gated for conv in (fc1, fc2)],
                fc1_weight=fc1_weight.reshape(hidden, channels).astype(np.float32),
                fc1_bias=fc1_bias.astype(np.float32),
                fc2_weight=fc2_weight.reshape(channels, hidden).astype(np.float32),
                fc2_bias=fc2_bias.astype(np.float32),
            )
        )
        consumed.update(id(inner) for inner in inner_adds)
    return matches


def _plugin_node(spec: PluginSpec, name: str, inputs: list[gs.Tensor], outputs: list[gs.Variable], aot: bool) -> gs.Node:
    if len(inputs) != len(spec.inputs) or len(outputs) != len(spec.outputs):
        raise ValueError(f"{spec.name} takes {len(spec.inputs)} inputs and {len(spec.outputs)} outputs")
    attrs = {"plugin_namespace": spec.namespace, "plugin_version": spec.version, "aot": int(aot)}
    return gs.Node(op=spec.name, name=name, attrs=attrs, inputs=inputs, outputs=outputs)


def plugin_bound_node_names(model: onnx.ModelProto) -> set[str]:
    """The convolutions the rewrite will replace: INT8 quantization must leave them in float."""
    graph = gs.import_onnx(model)
    names = {conv.name for conv, _ in _depthwise_liteconvs(graph)}
    return names | {conv.name for gate in _aggregation_gates(graph) for conv in gate.fc_convs}


def _run_plugins_in_fp16(graph: gs.Graph) -> None:
    """In an FP32 (Q/DQ) graph, make the plugins carry FP16: cast into the first plugin of a chain
    and out of the last, never between two plugins. TensorRT is expected to fold these casts into
    the neighbouring convolution and quantize layers."""
    plugin_nodes = [node for node in graph.nodes if node.op in PLUGINS]
    cast_inputs: dict[str, gs.Variable] = {}
    for node in plugin_nodes:
        spec = PLUGINS[node.op]
        for index in spec.activation_inputs:
            tensor = node.inputs[index]
            if tensor.dtype == np.float16:
                continue
            if tensor.name not in cast_inputs:
                half = gs.Variable(f"{tensor.name}_fp16", dtype=np.float16, shape=tensor.shape)
                graph.nodes.append(gs.Node("Cast", f"{tensor.name}_to_fp16", {"to": onnx.TensorProto.FLOAT16}, [tensor], [half]))
                cast_inputs[tensor.name] = half
            node.inputs[index] = cast_inputs[tensor.name]
        for index, output in enumerate(spec.outputs):
            tensor = node.outputs[index]
            if output.kind != "activation" or tensor.dtype == np.float16:
                continue
            half = gs.Variable(f"{tensor.name}_fp16", dtype=np.float16, shape=tensor.shape)
            for consumer in list(tensor.outputs):
                if consumer.op in PLUGINS:
                    consumer.inputs[consumer.inputs.index(tensor)] = half
            node.outputs[index] = half
            graph.nodes.append(gs.Node("Cast", f"{tensor.name}_to_fp32", {"to": onnx.TensorProto.FLOAT}, [half], [tensor]))


def rewrite_to_plugins(
    model: onnx.ModelProto, aot: bool = True, fp16_plugins: bool = False
) -> tuple[onnx.ModelProto, RewriteCounts]:
    """Return the graph with plugin nodes, and how many of each were written.

    `fp16_plugins`: plugins run in FP16 even where the graph around them is FP32 (the INT8 graph).
    """
    # Types on every tensor let the rewritten graph say which activation type each plugin carries.
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    gates = _aggregation_gates(graph)
    gate_streams = {id(stream) for gate in gates for stream in gate.streams}
    sums_of: dict[int, gs.Variable] = {}
    plain = with_sums = 0

    for conv, relu in _depthwise_liteconvs(graph):
        weight = _constant(conv.inputs[1])
        channels = weight.shape[0]
        bias = _constant(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(channels)
        y = relu.outputs[0]
        outputs = [y]
        spec = DEPTHWISE_LITECONV
        if id(y) in gate_streams:
            spec = DEPTHWISE_LITECONV_SUMS
            sums = gs.Variable(f"{y.name}_channel_sums", dtype=np.float32)
            sums_of[id(y)] = sums
            outputs.append(sums)
        inputs = [
            conv.inputs[0],
            gs.Constant(f"{conv.name}_folded_weight", weight.reshape(channels, 9).astype(np.float32)),
            gs.Constant(f"{conv.name}_folded_bias", bias.reshape(channels).astype(np.float32)),
        ]
        relu.outputs.clear()
        conv.outputs.clear()
        graph.nodes.append(_plugin_node(spec, f"{conv.name}_{spec.name}", inputs, outputs, aot))
        plain += spec is DEPTHWISE_LITECONV
        with_sums += spec is DEPTHWISE_LITECONV_SUMS

    rewritten_gates = 0
    for gate in gates:
        if not all(id(stream) in sums_of for stream in gate.streams):
            logger.warning("gate %s: a stream is not produced by a depthwise LiteConv; left to TensorRT", gate.root.name)
            continue
        prefix = gate.root.name
        inputs = [
            *gate.streams,
            *(sums_of[id(stream)] for stream in gate.streams),
            gs.Constant(f"{prefix}_fc1_weight", gate.fc1_weight),
            gs.Constant(f"{prefix}_fc1_bias", gate.fc1_bias),
            gs.Constant(f"{prefix}_fc2_weight", gate.fc2_weight),
            gs.Constant(f"{prefix}_fc2_bias", gate.fc2_bias),
        ]
        output = gate.root.outputs[0]
        gate.root.outputs.clear()
        graph.nodes.append(_plugin_node(AGGREGATION_GATE, f"{prefix}_{AGGREGATION_GATE.name}", inputs, [output], aot))
        rewritten_gates += 1

    if fp16_plugins:
        _run_plugins_in_fp16(graph)
    graph.cleanup().toposort()
    counts = RewriteCounts(depthwise=plain + with_sums, depthwise_with_sums=with_sums, gates=rewritten_gates)
    logger.info("plugin rewrite: %s", counts)
    rewritten = gs.export_onnx(graph)
    rewritten.ir_version = model.ir_version
    return rewritten, counts


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type in PLUGINS]
