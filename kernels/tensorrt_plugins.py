"""TensorRT registration of the fused ops as Quickly Deployable Plugins (`tensorrt.plugin`, >= 10.9).

Everything is generated from `kernels/plugin_specs.py`: the registered names, the tensor
arguments in order, the output shape/type rule. Each plugin gets both implementations:
- `impl` (JIT): the CuPy launchers of `kernels/launch.py` on TensorRT's stream. An engine built with
  it needs this module imported wherever it is deserialized (in Triton: the python backend).
- `aot_impl` (AOT): PTX that NVRTC compiles from the same `.cu`, with grid and int32 arguments as
  TensorRT shape expressions. Such an engine runs in any C++ TensorRT runtime, Triton's included.
The ONNX node's `aot` attribute picks one at build time.

The kernels choose their tiling from the batch size. AOT kernels get it at build time, so two
tactics exist, tiled for small and for large batches, and TensorRT times both for the profile.

TensorRT cannot be installed on this project's CI or GPU machines: this module is written against
the documented API and its pure parts (signatures, launch arithmetic) are tested without it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from pathlib import Path

from kernels import launch
from kernels.plugin_specs import PLUGINS, PluginSpec

logger = logging.getLogger(__name__)

# Tactic -> the batch size the tiling is planned for (TensorRT forbids tactic 0).
TACTIC_BATCH = {1: 1, 2: 256}
NVRTC_ARCH = "compute_90"


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


@functools.cache
def kernel_ptx(source: str) -> str:
    """PTX of one `.cu` for TensorRT AOT plugins, from NVRTC (through CuPy's bindings)."""
    from cupy.cuda import nvrtc

    code = (Path(launch.__file__).parent / source).read_text(encoding="utf-8")
    program = nvrtc.createProgram(code, source, [], [])
    try:
        nvrtc.compileProgram(program, [f"-arch={NVRTC_ARCH}", *launch.NVRTC_OPTIONS])
    except nvrtc.NVRTCError as exc:
        raise RuntimeError(f"NVRTC failed on {source}:\n{nvrtc.getProgramLog(program)}") from exc
    ptx = nvrtc.getPTX(program)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def register_plugins() -> None:
    """Register every plugin of `plugin_specs` with TensorRT, once per process."""
    _register_all()


@functools.cache
def _register_all() -> None:
    import tensorrt as trt
    import tensorrt.plugin as trtp

    for spec in PLUGINS.values():
        _register(spec, trt, trtp)
    logger.info("registered TensorRT plugins: %s", ", ".join(spec.qualified_name for spec in PLUGINS.values()))


def _register(spec: PluginSpec, trt, trtp) -> None:
    names = [tensor.name for tensor in spec.inputs]
    output_descs = typing.Tuple[tuple(trtp.TensorDesc for _ in spec.outputs)]
    returns = trtp.TensorDesc if len(spec.outputs) == 1 else output_descs
    kinds = {"activation": None, "fp32": trt.float32}

    def describe(**inputs):
        first = inputs[names[0]]
        shapes = spec.output_shapes([inputs[name].shape_expr for name in names])
        descs = tuple(
            trtp.from_shape_expr(trtp.ShapeExprs.from_tuple(tuple(shape)), dtype=kinds[output.kind] or first.dtype)
            for output, shape in zip(spec.outputs, shapes)
        )
        return descs[0] if len(descs) == 1 else descs

    def autotune(outputs, **inputs):
        types = ["FP32|FP16" if tensor.kind == "activation" else "FP32" for tensor in (*spec.inputs, *spec.outputs)]
        combination = trtp.AutoTuneCombination(", ".join(types), "LINEAR", list(TACTIC_BATCH))
        return [combination]

    def jit(outputs, stream, tactic, **inputs):
        _launch_jit(spec, [inputs[name] for name in names], outputs, stream, trt)

    def aot(outputs, tactic, **inputs):
        return _aot_kernel(spec, [inputs[name] for name in names], tactic, trt, trtp)

    trtp.register(spec.qualified_name)(_with_signature(describe, _signature(names, trtp.TensorDesc, [], returns)))
    trtp.autotune(spec.qualified_name)(
        _with_signature(
            autotune,
            _signature(names, trtp.TensorDesc, [("outputs", output_descs)], typing.List[trtp.AutoTuneCombination]),
        )
    )
    output_tensors = typing.Tuple[tuple(trtp.Tensor for _ in spec.outputs)]
    trtp.impl(spec.qualified_name)(
        _with_signature(
            jit, _signature(names, trtp.Tensor, [("outputs", output_tensors), ("stream", int), ("tactic", int)], None)
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


def _activation_dtype(trt_dtype, trt) -> str:
    return "float16" if trt_dtype == trt.float16 else "float32"


def _launch_jit(spec: PluginSpec, inputs, outputs, stream: int, trt) -> None:
    import cupy

    x = inputs[0]
    n, c, h, w = (int(d) for d in x.shape)
    dtype = _activation_dtype(x.dtype, trt)
    device_id = cupy.cuda.runtime.getDevice()
    if spec.kernel.startswith("depthwise"):
        launch.launch_depthwise_liteconv(
            x=x.data_ptr,
            weight=inputs[1].data_ptr,
            bias=inputs[2].data_ptr,
            y=outputs[0].data_ptr,
            sums=outputs[1].data_ptr if len(outputs) > 1 else None,
            n=n,
            c=c,
            h=h,
            w=w,
            dtype=dtype,
            stream=stream,
            device_id=device_id,
        )
        return
    launch.launch_aggregation_gate(
        streams=tuple(t.data_ptr for t in inputs[0:4]),
        stream_sums=tuple(t.data_ptr for t in inputs[4:8]),
        fc1_weight=inputs[8].data_ptr,
        fc1_bias=inputs[9].data_ptr,
        fc2_weight=inputs[10].data_ptr,
        fc2_bias=inputs[11].data_ptr,
        y=outputs[0].data_ptr,
        n=n,
        c=c,
        hidden=int(inputs[8].shape[0]),
        h=h,
        w=w,
        dtype=dtype,
        stream=stream,
        device_id=device_id,
    )


def _aot_kernel(spec: PluginSpec, inputs, tactic: int, trt, trtp):
    x = inputs[0]
    c, h, w = (x.shape_expr[i].constant_value() for i in (1, 2, 3))
    hidden = inputs[8].shape_expr[0].constant_value() if spec.kernel == "aggregation_gate" else 0
    grouped, block, tiling = plan_for(spec, TACTIC_BATCH[tactic], c, h, w, hidden)
    dtype = _activation_dtype(x.dtype, trt)
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
    return entry, kernel_ptx(launch.ENTRY_POINTS[entry]), params, extra
