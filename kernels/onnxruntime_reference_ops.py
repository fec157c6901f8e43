"""Run a plugin-rewritten graph on the CPU: ONNX Runtime with the NumPy references as Python ops.

This is how the rewrite is proven right without TensorRT or a GPU: the rewritten graph, its
plugin nodes executed by `kernels/reference.py`, must equal the original graph.
onnxruntime-extensions hosts the Python ops; they live in its domain,
so a copy of the graph is retargeted (`to_reference_graph`) and the TensorRT graph is untouched.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx

from kernels import reference
from kernels.plugin_specs import AGGREGATION_GATE, DEPTHWISE_LITECONV, DEPTHWISE_LITECONV_SUMS, PLUGINS, PluginSpec

CONTRIB_DOMAIN = "ai.onnx.contrib"


def _depthwise(x, weight, bias):
    return reference.depthwise_liteconv(x, weight, bias)


def _depthwise_sums(x, weight, bias):
    return reference.depthwise_liteconv(x, weight, bias, with_sums=True)


def _gate(x1, x2, x3, x4, s1, s2, s3, s4, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    return reference.aggregation_gate(
        [x1, x2, x3, x4], fc1_weight, fc1_bias, fc2_weight, fc2_bias, stream_sums=[s1, s2, s3, s4]
    )


_IMPLEMENTATIONS = {
    DEPTHWISE_LITECONV.name: _depthwise,
    DEPTHWISE_LITECONV_SUMS.name: _depthwise_sums,
    AGGREGATION_GATE.name: _gate,
}


@functools.cache
def register_reference_ops() -> str:
    """Register every plugin as an FP32 Python op once; return the extensions library to load."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    for spec in PLUGINS.values():
        onnx_op(
            op_type=spec.name,
            inputs=[PyCustomOpDef.dt_float] * len(spec.inputs),
            outputs=[PyCustomOpDef.dt_float] * len(spec.outputs),
        )(_IMPLEMENTATIONS[spec.name])
    return get_library_path()


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {init.name: init.data_type for init in model.graph.initializer}
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    return types


def to_reference_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose plugin nodes are the Python reference ops.

    Python ops take no FP16, so an FP16 plugin becomes Cast(FP32) -> op -> Cast(FP16): the FP16
    values are exact in FP32 and the result is rounded to FP16 once, as the kernel rounds it.
    """
    types = _tensor_types(model)
    reference_model = onnx.ModelProto()
    reference_model.CopyFrom(model)
    del reference_model.graph.node[:]
    for original in model.graph.node:
        spec: PluginSpec | None = PLUGINS.get(original.op_type)
        if spec is None:
            reference_model.graph.node.append(original)
            continue
        activation_type = types.get(original.input[0])
        if activation_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            raise ValueError(f"{original.name}: activation {original.input[0]} has no FP32/FP16 type in the graph")
        half = activation_type == onnx.TensorProto.FLOAT16
        inputs, outputs, casts_after = list(original.input), list(original.output), []
        for index, tensor in enumerate(spec.inputs):
            if half and tensor.kind == "activation":
                inputs[index] = f"{original.input[index]}_as_fp32_for_{original.name}"
                reference_model.graph.node.append(
                    onnx.helper.make_node("Cast", [original.input[index]], [inputs[index]], to=onnx.TensorProto.FLOAT)
                )
        for index, tensor in enumerate(spec.outputs):
            if half and tensor.kind == "activation":
                outputs[index] = f"{original.output[index]}_fp32"
                casts_after.append(
                    onnx.helper.make_node(
                        "Cast", [outputs[index]], [original.output[index]], to=onnx.TensorProto.FLOAT16
                    )
                )
        # TensorRT's attributes mean nothing to the Python ops: left off.
        reference_model.graph.node.append(
            onnx.helper.make_node(spec.name, inputs, outputs, name=original.name, domain=CONTRIB_DOMAIN)
        )
        reference_model.graph.node.extend(casts_after)
    if not any(opset.domain == CONTRIB_DOMAIN for opset in reference_model.opset_import):
        reference_model.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return reference_model


def reference_session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session that runs a plugin-rewritten graph with the NumPy references."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(register_reference_ops())
    return ort.InferenceSession(
        to_reference_graph(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_reference(model: onnx.ModelProto, images: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    return reference_session(model).run(outputs, {model.graph.input[0].name: images})
