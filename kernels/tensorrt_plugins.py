"""TensorRT registration of the fused ops, generated from `kernels/plugin_specs.py`.

The names, the tensor arguments in order and the output shape and type rules all come from the
specs, so the ONNX rewrite and both registrations cannot drift apart. Two registrations:

- Class-based IPluginV3 (IPluginV3OneCore/Build/Runtime, created by an IPluginCreatorV3One in the
  plugin registry): the same code on TensorRT and TensorRT-RTX, and what CI builds engines through.
  `enqueue` runs the CuPy launchers of `kernels/launch.py` on TensorRT's stream, so it is a JIT
  plugin: an engine built with it needs this module registered wherever it is deserialized (in
  Triton: the python backend).
- Quickly Deployable Plugins with `aot_impl` (`tensorrt.plugin`, TensorRT >= 10.9 only): PTX that
  NVRTC compiles from the same `.cu`, grid and int32 arguments as TensorRT shape expressions. Such
  an engine runs in any C++ TensorRT runtime, Triton's included.
Both register under the same name, namespace and version, so a process registers one of them.

The kernels choose their tiling from the batch size. AOT kernels get it at build time, so two
tactics exist, tiled for small and for large batches, and TensorRT times both for the profile.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing

from kernels import launch
from kernels.nvrtc import aot_ptx
from kernels.plugin_specs import PLUGINS, PluginSpec
from kernels.tensorrt_library import TensorRTUnavailableError, load_tensorrt

logger = logging.getLogger(__name__)

# Tactic -> the batch size the tiling is planned for (TensorRT forbids tactic 0).
TACTIC_BATCH = {1: 1, 2: 256}
CLASS_BASED = "class-based IPluginV3 (JIT, CuPy launch)"
QUICK_AOT = "tensorrt.plugin aot_impl (AOT, NVRTC PTX in the plan)"

class PluginClasses(typing.NamedTuple):
    plugin: type
    creator: type


_registered: dict[str, str] = {}  # registration kind -> what registered it, one kind per process
_creators: list[object] = []  # the registry keeps raw pointers: the Python creators must stay alive


def register_plugins(aot: bool = False) -> str:
    """Register every plugin of `plugin_specs` with TensorRT, once per process; returns how.

    aot=False: class-based IPluginV3 (TensorRT or TensorRT-RTX). aot=True: `tensorrt.plugin`'s
    aot_impl, TensorRT only.
    """
    kind = QUICK_AOT if aot else CLASS_BASED
    if _registered and kind not in _registered:
        raise TensorRTUnavailableError(f"this process registered the plugins as {next(iter(_registered))}; "
                                       f"{kind} registers the same names: build it in another process")
    if kind in _registered:
        return kind
    library = load_tensorrt()
    if aot:
        if not library.quick_plugins:
            raise TensorRTUnavailableError(f"{library.label} has no tensorrt.plugin: AOT plugins need TensorRT >= 10.9")
        import tensorrt.plugin as trtp

        for spec in PLUGINS.values():
            _register_quick(spec, library.module, trtp)
    else:
        reason = library.plugin_layers_unavailable_reason()
        if reason:
            raise TensorRTUnavailableError(reason)
        registry = library.module.get_plugin_registry()
        for spec in PLUGINS.values():
            creator = plugin_classes(library.module).creator(spec)
            if not registry.register_creator(creator, spec.namespace):
                raise TensorRTUnavailableError(f"{library.label} refused to register {spec.qualified_name} (already registered?)")
            _creators.append(creator)
    _registered[kind] = library.label
    logger.info("registered %s with %s as %s", ", ".join(s.qualified_name for s in PLUGINS.values()), library.label, kind)
    return kind


# ---------------------------------------------------------------------------------------------------
# Class-based IPluginV3: TensorRT and TensorRT-RTX.


def _activation_dtype(trt_dtype, trt) -> launch.KernelDtype:
    return "float16" if trt_dtype == trt.DataType.HALF else "float32"


def supports_format(spec: PluginSpec, pos: int, types: typing.Sequence, formats: typing.Sequence, trt) -> bool:
    """TensorRT's format negotiation for tensor `pos` (inputs, then outputs): NCHW (LINEAR) only;
    activations FP32 or FP16, all of one type; weights and sums FP32."""
    if formats[pos] != trt.TensorFormat.LINEAR:
        return False
    kinds = [tensor.kind for tensor in (*spec.inputs, *spec.outputs)]
    if kinds[pos] != "activation":
        return types[pos] == trt.DataType.FLOAT
    first = kinds.index("activation")
    return types[pos] in (trt.DataType.FLOAT, trt.DataType.HALF) and types[pos] == types[first]


@functools.cache
def plugin_classes(trt) -> PluginClasses:
    """The IPluginV3 and IPluginCreatorV3One classes for one TensorRT module (tensorrt or tensorrt_rtx_bindings)."""

    class FusedOpPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """One fused op: shape and type rules from its spec, NCHW, launched through CuPy on TensorRT's stream."""

        def __init__(self, spec: PluginSpec):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.spec = spec
            self.plugin_name = spec.name
            self.plugin_namespace = spec.namespace
            self.plugin_version = spec.version
            self.num_outputs = len(spec.outputs)

        def get_capability_interface(self, capability):
            return self

        def clone(self):
            return FusedOpPlugin(self.spec)

        def get_output_data_types(self, input_types):
            return self.spec.output_dtypes(input_types[self.spec.activation_inputs[0]], float32=trt.DataType.FLOAT)

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            shapes = self.spec.output_shapes([[dims[i] for i in range(len(dims))] for dims in inputs])
            return [trt.DimsExprs(list(shape)) for shape in shapes]

        def supports_format_combination(self, pos, in_out, num_inputs):
            descs = [tensor.desc for tensor in in_out[: pos + 1]]
            return supports_format(self.spec, pos, [d.type for d in descs], [d.format for d in descs], trt)

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []  # the launch plan follows the real batch size at enqueue

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([])  # weights are input tensors: nothing to serialize

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            dims = [tuple(int(d) for d in desc.dims) for desc in input_desc]
            launch_jit(self.spec, dims, _activation_dtype(input_desc[0].type, trt), list(inputs), list(outputs), stream)

    class FusedOpCreator(trt.IPluginCreatorV3One):
        def __init__(self, spec: PluginSpec):
            trt.IPluginCreatorV3One.__init__(self)
            self.spec = spec
            self.name = spec.name
            self.plugin_namespace = spec.namespace
            self.plugin_version = spec.version
            self.field_names = trt.PluginFieldCollection([])

        def create_plugin(self, name, fields, phase):
            return FusedOpPlugin(self.spec)

    return PluginClasses(plugin=FusedOpPlugin, creator=FusedOpCreator)


def launch_jit(spec: PluginSpec, dims: list[tuple[int, ...]], dtype: launch.KernelDtype, inputs: list[int],
               outputs: list[int], stream: int) -> None:
    """Launch the op's kernel on `stream` for TensorRT-owned buffers (device pointers as ints)."""
    import cupy

    n, c, h, w = dims[0]
    device_id = cupy.cuda.runtime.getDevice()
    if spec.kernel.startswith("depthwise"):
        launch.launch_depthwise_liteconv(
            x=inputs[0], weight=inputs[1], bias=inputs[2], y=outputs[0], sums=outputs[1] if len(outputs) > 1 else None,
            n=n, c=c, h=h, w=w, dtype=dtype, stream=stream, device_id=device_id,
        )
        return
    launch.launch_aggregation_gate(
        streams=tuple(inputs[0:4]), stream_sums=tuple(inputs[4:8]), fc1_weight=inputs[8], fc1_bias=inputs[9],
        fc2_weight=inputs[10], fc2_bias=inputs[11], y=outputs[0], n=n, c=c, hidden=dims[8][0], h=h, w=w,
        dtype=dtype, stream=stream, device_id=device_id,
    )


# ---------------------------------------------------------------------------------------------------
# Quickly Deployable Plugins, AOT: TensorRT >= 10.9 only.


def _signature(
    names: list[str], annotation: object, extra: list[tuple[str, object]], returns: object
) -> inspect.Signature:
    parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation) for name in names
    ]
    parameters += [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind) for name, kind in extra
    ]
    return inspect.Signature(parameters, return_annotation=returns)


def _with_signature(function: typing.Callable, signature: inspect.Signature) -> typing.Callable:
    # tensorrt.plugin reads inspect.signature(): the generated functions declare the spec's names.
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        return function(**bound.arguments)

    wrapper.__signature__ = signature
    wrapper.__name__ = function.__name__
    return wrapper


def plan_for(spec: PluginSpec, n: int, c: int, h: int, w: int, hidden: int = 0) -> tuple[int, int, tuple[int, ...]]:
    """(planes or channels grouped per CTA, block, int32 tiling args) for a representative batch `n`."""
    if spec.kernel.startswith("depthwise"):
        plan = launch.plan_depthwise(n, c, h, w)
        return plan.planes_per_cta, plan.block, plan.tiling_args
    plan = launch.plan_gate(n, c, hidden, h, w)
    return plan.channels_per_cta, plan.block, (plan.channels_per_cta,)


def _register_quick(spec: PluginSpec, trt, trtp) -> None:
    names = [tensor.name for tensor in spec.inputs]
    output_descs = typing.Tuple[tuple(trtp.TensorDesc for _ in spec.outputs)]
    returns = trtp.TensorDesc if len(spec.outputs) == 1 else output_descs

    def describe(**inputs):
        first = inputs[names[spec.activation_inputs[0]]]
        shapes = spec.output_shapes([inputs[name].shape_expr for name in names])
        dtypes = spec.output_dtypes(first.dtype, float32=trt.float32)
        descs = tuple(
            trtp.from_shape_expr(trtp.ShapeExprs.from_tuple(tuple(shape)), dtype=dtype)
            for dtype, shape in zip(dtypes, shapes)
        )
        return descs[0] if len(descs) == 1 else descs

    def autotune(outputs, **inputs):
        types = ["FP32|FP16" if tensor.kind == "activation" else "FP32" for tensor in (*spec.inputs, *spec.outputs)]
        combination = trtp.AutoTuneCombination(", ".join(types), "LINEAR", list(TACTIC_BATCH))
        return [combination]

    def aot(outputs, tactic, **inputs):
        return aot_kernel(spec, [inputs[name] for name in names], tactic, trt, trtp)

    trtp.register(spec.qualified_name)(_with_signature(describe, _signature(names, trtp.TensorDesc, [], returns)))
    trtp.autotune(spec.qualified_name)(
        _with_signature(
            autotune,
            _signature(names, trtp.TensorDesc, [("outputs", output_descs)], typing.List[trtp.AutoTuneCombination]),
        )
    )
    aot_returns = typing.Tuple[
        typing.Union[str, bytes], typing.Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs
    ]
    trtp.aot_impl(spec.qualified_name)(
        _with_signature(
            aot, _signature(names, trtp.TensorDesc, [("outputs", output_descs), ("tactic", int)], aot_returns)
        )
    )


def aot_kernel(spec: PluginSpec, inputs, tactic: int, trt, trtp):
    """(entry point, PTX, launch parameters, int32 arguments) of one AOT tactic."""
    x = inputs[0]
    c, h, w = (x.shape_expr[i].constant_value() for i in (1, 2, 3))
    hidden = inputs[8].shape_expr[0].constant_value() if spec.kernel == "aggregation_gate" else 0
    grouped, block, tiling = plan_for(spec, TACTIC_BATCH[tactic], c, h, w, hidden)
    dtype = "float16" if x.dtype == trt.float16 else "float32"
    n = x.shape_expr[0]
    params = trtp.KernelLaunchParams()
    params.block_x = block
    params.shared_mem = 0
    if spec.kernel.startswith("depthwise"):
        entry = launch.depthwise_entry_point(dtype, with_sums=len(spec.outputs) > 1)
        params.grid_x = trtp.cdiv(n * c, grouped)
        scalars = [n, c, h, w, *tiling]
    else:
        entry = launch.gate_entry_point(dtype)
        params.grid_x = n * ((c + grouped - 1) // grouped)
        scalars = [n, c, hidden, h, w, *tiling]
    extra = trtp.SymIntExprs(len(scalars))
    for index, value in enumerate(scalars):
        extra[index] = trtp.SymInt32(value)
    return entry, aot_ptx(launch.ENTRY_POINTS[entry]), params, extra
