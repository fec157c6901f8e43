"""The fused ops as TensorRT plugins: one declaration each, the single source of truth.

The ONNX rewrite (`engine_builder/plugin_rewrite.py`) writes nodes from these declarations and the
TensorRT registration (`kernels/tensorrt_plugins.py`) registers exactly these names, inputs,
outputs and shape/type rules, so the two cannot drift apart. Pure Python: importable anywhere.

Weights and biases are FP32 input tensors (AOT plugins serialize no attributes), activations are
FP32 or FP16, and the per-channel spatial sums the depthwise producer writes for the gate are FP32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

PLUGIN_NAMESPACE = "osnet"
PLUGIN_VERSION = "1"

# Shapes here are sequences of dims (ints, or symbolic expressions that support the same use).
Shape = Sequence
T = TypeVar("T")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    # "activation": FP32 or FP16, the plugin's I/O type T; "fp32": always FP32 (weights, sums).
    kind: str


@dataclass(frozen=True)
class PluginSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # From the input shapes to the output shapes, in output order.
    output_shapes: Callable[[Sequence[Shape]], list[Shape]]
    # Which kernel entry point serves this op (kernels/launch.py names them by dtype).
    kernel: str
    int_attributes: tuple[str, ...] = ()
    namespace: str = PLUGIN_NAMESPACE
    version: str = PLUGIN_VERSION

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}::{self.name}"

    @property
    def activation_inputs(self) -> list[int]:
        return [i for i, spec in enumerate(self.inputs) if spec.kind == "activation"]

    def output_dtypes(self, activation_dtype: T, float32: T = "float32") -> list[T]:
        """Output types follow the activation type; FP32 outputs stay FP32. Works on any type tokens
        (NumPy names, TensorRT DataTypes) and never on their truthiness: DataType.FLOAT is 0."""
        return [activation_dtype if spec.kind == _ACTIVATION else float32 for spec in self.outputs]


def _same_as_input(shapes: Sequence[Shape]) -> list[Shape]:
    return [list(shapes[0])]


def _activation_and_channel_sums(shapes: Sequence[Shape]) -> list[Shape]:
    n, c = shapes[0][0], shapes[0][1]
    return [list(shapes[0]), [n, c]]


_ACTIVATION = "activation"
_FP32 = "fp32"

DEPTHWISE_LITECONV = PluginSpec(
    name="DepthwiseLiteConv",
    inputs=(TensorSpec("x", _ACTIVATION), TensorSpec("weight", _FP32), TensorSpec("bias", _FP32)),
    outputs=(TensorSpec("y", _ACTIVATION),),
    output_shapes=_same_as_input,
    kernel="depthwise_liteconv",
)

# The last depthwise LiteConv of each stream also writes the stream's per-(n, c) spatial sums, so
# the gate reads each stream once instead of pooling it in a separate pass.
DEPTHWISE_LITECONV_SUMS = PluginSpec(
    name="DepthwiseLiteConvSums",
    inputs=DEPTHWISE_LITECONV.inputs,
    outputs=(TensorSpec("y", _ACTIVATION), TensorSpec("sums", _FP32)),
    output_shapes=_activation_and_channel_sums,
    kernel="depthwise_liteconv_sums",
)

AGGREGATION_GATE = PluginSpec(
    name="AggregationGate",
    inputs=(
        *(TensorSpec(f"x{t}", _ACTIVATION) for t in range(1, 5)),
        *(TensorSpec(f"sums{t}", _FP32) for t in range(1, 5)),
        TensorSpec("fc1_weight", _FP32),
        TensorSpec("fc1_bias", _FP32),
        TensorSpec("fc2_weight", _FP32),
        TensorSpec("fc2_bias", _FP32),
    ),
    outputs=(TensorSpec("y", _ACTIVATION),),
    output_shapes=_same_as_input,
    kernel="aggregation_gate",
)

PLUGINS = {spec.name: spec for spec in (DEPTHWISE_LITECONV, DEPTHWISE_LITECONV_SUMS, AGGREGATION_GATE)}
