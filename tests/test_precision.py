"""FP16 and INT8 graphs as TensorRT's strongly typed builder wants them, and the precision report."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engine_builder.build import PrecisionBuildSettings, build_precision_graphs
from engine_builder.plugin_rewrite import plugin_bound_node_names
from engine_builder.precision import PrecisionFloor, PrecisionFloorError, retrieval_agreement
from kernels.plugin_specs import PLUGINS

VARIANT = "osnet_x0_25"


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    settings = PrecisionBuildSettings(calibration_images=16, evaluation_images=16, calib_method="minmax")
    return build_precision_graphs(VARIANT, tmp_path_factory.mktemp("precision"), settings=settings)


def test_fp16_graph_is_fp16_inside_with_uint8_in_and_fp32_out(graphs):
    model = onnx.load(graphs.plugin_free["fp16"])
    assert {t.type.tensor_type.elem_type for t in model.graph.input} == {onnx.TensorProto.UINT8}
    assert {t.type.tensor_type.elem_type for t in model.graph.output} == {onnx.TensorProto.FLOAT}
    float_weights = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(i.dims) == 4]
    assert float_weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in float_weights)
    rewritten = onnx.load(graphs.with_plugins["fp16"])
    types = {info.name: info.type.tensor_type.elem_type for info in rewritten.graph.value_info}
    assert {types[n.input[0]] for n in rewritten.graph.node if n.op_type in PLUGINS} == {onnx.TensorProto.FLOAT16}


def test_int8_qdq_follows_tensorrts_rules(graphs):
    model = onnx.load(graphs.plugin_free["int8"])
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    weight_dqs = 0
    for node in qdq:
        scale, zero_point = initializers[node.input[1]], initializers[node.input[2]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        assert zero_point.dtype == np.int8 and not zero_point.any(), "symmetric INT8, zero point 0"
        assert scale.dtype == np.float32 and (scale > 0).all(), "constant positive FP32 scales"
        source = producers.get(node.input[0])
        weight = node.op_type == "DequantizeLinear" and source is not None and source.op_type == "QuantizeLinear" and source.input[0] in initializers
        if weight:  # Conv [out, in, kh, kw] and the head's Gemm [out, in] (transB): per output channel
            weight_dqs += 1
            assert axis == 0 and scale.shape == (initializers[source.input[0]].shape[0],), "per output channel"
        elif not (node.op_type == "QuantizeLinear" and node.input[0] in initializers):
            assert scale.ndim == 0, "activations per tensor"
    assert weight_dqs > 0
    # Depthwise LiteConvs and gate MLPs stay in float for the FP16 plugins.
    quantized_convs = {n.name for n in model.graph.node if n.op_type == "Conv" and producers.get(n.input[1], n).op_type == "DequantizeLinear"}
    assert quantized_convs and not quantized_convs & plugin_bound_node_names(onnx.load(graphs.fp32))


def test_int8_plugins_take_fp16_never_straight_from_a_dequantize(graphs):
    model = onnx.load(graphs.with_plugins["int8"])
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in (n for n in model.graph.node if n.op_type in PLUGINS):
        for index in PLUGINS[node.op_type].activation_inputs:
            assert producers[node.input[index]].op_type in {"Cast", *PLUGINS}


def test_precision_report_is_written_and_passes(graphs):
    report = json.loads((graphs.report_dir / "precision_report.json").read_text())
    rows = {r["precision"]: r for r in report["results"]}
    assert set(rows) == {"fp16", "int8", "int8 (FP16 plugins, as the engine runs)"}
    assert rows["fp16"]["mean_cosine"] >= 0.999 and all(r["passed"] for r in rows.values())
    assert "| fp16 | 16 |" in (graphs.report_dir / "precision_report.md").read_text()


def test_build_fails_clearly_below_the_floor(tmp_path):
    impossible = PrecisionFloor(min_mean_cosine=1.01, min_cosine=0.0, min_top1_agreement=0.0)
    settings = PrecisionBuildSettings(precisions=("fp16",), evaluation_images=4, floors={"fp16": impossible})
    with pytest.raises(PrecisionFloorError, match=r"fp16: mean cosine .* \(floor 1.01\)"):
        build_precision_graphs(VARIANT, tmp_path, settings=settings)
    assert (tmp_path / "precision_report.md").read_text().count("FAIL") == 1


def test_retrieval_agreement_on_a_hand_made_case():
    reference = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    assert retrieval_agreement(reference, reference, 1) == 1.0
    swapped = reference[[0, 2, 1, 3]].copy()  # rows 1 and 2 trade places
    # Under `swapped`, image 0's nearest is image 2 (was 1), image 1's is 3 (was 0), 2's is 0 (was 3), 3's is 1 (was 2).
    assert retrieval_agreement(reference, swapped, 1) == 0.0
