"""TensorRT engines from the precision ONNX graphs, what they contain, and a small runner to check them.

Thin on purpose: everything TensorRT is given (plugin-rewritten, FP16 and Q/DQ INT8 ONNX) is made
and tested on CPU elsewhere. The same code builds with TensorRT (10.9+, 11.x) or TensorRT-RTX 1.7;
`kernels/tensorrt_library.py` chooses the module and names the differences. The network is strongly
typed (precision comes from the graph), one optimization profile covers batch 1..max_batch_size,
the timing cache is reused between builds.

Where each step can run: building needs TensorRT and a GPU, or TensorRT-RTX and nothing else;
describing what was built (I/O, profile, layers, plugin layers) is read from the network the
builder compiled, and from the engine itself (IEngineInspector) only where a GPU can deserialize
it; running needs a GPU the library's engines support.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.plugin_specs import PLUGINS
from kernels.tensorrt_library import TensorRTLibrary, TensorRTUnavailableError, load_tensorrt
from osnet_base.contract import (
    DEFAULT_MAX_BATCH_SIZE,
    EMBEDDING_NAME,
    FEATURE_DIM,
    FEATURES_NAME,
    INPUT_NAME,
    INPUT_SHAPE,
)
from osnet_base.errors import OsnetTritonError

logger = logging.getLogger(__name__)

__all__ = ["TensorRTUnavailableError"]  # re-exported: callers catch it from here


def cuda_device_unavailable_reason() -> str | None:
    """None when CuPy sees a CUDA GPU, else why not."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU is visible"
    except Exception as exc:  # CuPy raises CUDARuntimeError or ImportError variants without a GPU
        return f"no usable CUDA GPU through CuPy: {exc}"
    return None


def tensorrt_unavailable_reason() -> str | None:
    """None when engines that Triton serves can be built here (TensorRT >= 10.9 and a GPU), else why not."""
    try:
        library = load_tensorrt()
    except TensorRTUnavailableError as exc:
        return str(exc)
    if not library.served_by_triton:
        return (f"TensorRT is not installed ({library.label} is, and builds these graphs with no GPU, but Triton's "
                "TensorRT backend does not load its plans; the engine step needs TensorRT >= 10.9 and an NVIDIA GPU)")
    return cuda_device_unavailable_reason()


def engine_build_unavailable_reason() -> str | None:
    """None when some TensorRT library can build engines here (TensorRT-RTX needs no GPU), else why not."""
    try:
        library = load_tensorrt()
    except TensorRTUnavailableError as exc:
        return str(exc)
    return cuda_device_unavailable_reason() if library.needs_gpu_to_build else None


def engine_run_unavailable_reason() -> str | None:
    """None when this machine can deserialize and execute the engines it builds, else why not."""
    library = load_tensorrt()
    reason = cuda_device_unavailable_reason()
    if reason:
        return f"executing or inspecting a {library.label} engine needs a CUDA GPU: {reason}"
    if library.name == "TensorRT-RTX":
        import cupy

        major, minor = divmod(int(cupy.cuda.Device().compute_capability), 10)
        if f"{major}.{minor}" not in library.runs_on:
            return f"{library.label} engines do not run on compute capability {major}.{minor} (they run on {library.runs_on})"
    return None


# The batch TensorRT tunes its tactics for, when the profile allows it: what a busy server's dynamic
# batcher forms; a smaller served maximum tunes for that maximum instead.
DEFAULT_OPT_BATCH_SIZE = 32


@dataclass(kw_only=True)
class EngineBuildSettings:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    opt_batch_size: int | None = None  # None: min(DEFAULT_OPT_BATCH_SIZE, max_batch_size)
    workspace_bytes: int = 4 << 30
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.opt_batch_size is None:
            self.opt_batch_size = min(DEFAULT_OPT_BATCH_SIZE, self.max_batch_size)
        if not 1 <= self.opt_batch_size <= self.max_batch_size:
            raise ValueError(f"need 1 <= opt_batch_size ({self.opt_batch_size}) <= max_batch_size ({self.max_batch_size})")


@dataclass(frozen=True)
class TensorDescription:
    name: str
    dtype: str  # NumPy's name for it: "float32"
    shape: tuple[int, ...]  # -1 where dynamic


@dataclass(frozen=True)
class EngineDescription:
    """What an engine takes and holds, read from the built network or from the engine itself."""

    source: str  # "network" (what the builder compiled) or "IEngineInspector"
    inputs: tuple[TensorDescription, ...]
    outputs: tuple[TensorDescription, ...]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)
    layer_types: Counter
    plugin_layers: Counter  # plugin name -> layers

    @property
    def layers(self) -> int:
        return sum(self.layer_types.values())


@dataclass(frozen=True)
class BuiltEngine:
    plan: Path
    library: str  # "TensorRT-RTX 1.7.1.116"
    plugins: str | None  # how the plugins were registered; None for a plugin-free graph
    seconds: float
    plan_bytes: int
    network: EngineDescription


def _numpy_name(trt, dtype) -> str:
    return np.dtype(trt.nptype(dtype)).name


def _plugin_name(layer_name: str) -> str | None:
    """The rewrite names each plugin node `<replaced node>_<plugin name>`; layers keep node names."""
    suffix = layer_name.rsplit("_", 1)[-1]
    return suffix if suffix in PLUGINS else None


def describe_network(trt, network, profile) -> EngineDescription:
    """The parsed network the builder compiles, with the profile it was given."""
    layer_types, plugins = Counter(), Counter()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        layer_types[layer.type.name] += 1
        if layer.type == trt.LayerType.PLUGIN_V3:
            layer.__class__ = trt.IPluginV3Layer  # the bindings hand out ILayer: downcast to reach the plugin
            plugins[layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE).plugin_name] += 1

    def tensors(count, get):
        return tuple(TensorDescription(t.name, _numpy_name(trt, t.dtype), tuple(t.shape)) for t in map(get, range(count)))

    inputs = tensors(network.num_inputs, network.get_input)
    shapes = {t.name: tuple(tuple(s) for s in profile.get_shape(t.name)) for t in inputs}
    return EngineDescription("network", inputs, tensors(network.num_outputs, network.get_output), shapes, layer_types, plugins)


def describe_engine(trt, engine) -> EngineDescription:
    """The deserialized engine through IEngineInspector (needs the GPU that deserialized it)."""
    inputs, outputs, profile = [], [], {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        tensor = TensorDescription(name, _numpy_name(trt, engine.get_tensor_dtype(name)), tuple(engine.get_tensor_shape(name)))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs.append(tensor)
            profile[name] = tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
        else:
            outputs.append(tensor)
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))["Layers"]
    layer_types = Counter(layer.get("LayerType", "unknown") for layer in layers)
    plugins = Counter(name for layer in layers if (name := _plugin_name(layer.get("Name", ""))))
    return EngineDescription("IEngineInspector", tuple(inputs), tuple(outputs), profile, layer_types, plugins)


def config_mismatches(description: EngineDescription, config) -> list[str]:
    """How an engine differs from the Triton config that will serve it (empty when it serves as declared)."""
    from tritonclient.grpc import model_config_pb2 as pb

    dtypes = {pb.TYPE_FP32: "float32", pb.TYPE_FP16: "float16", pb.TYPE_INT8: "int8", pb.TYPE_INT32: "int32", pb.TYPE_UINT8: "uint8"}
    problems = []
    for kind, declared, actual in (("input", config.input, description.inputs), ("output", config.output, description.outputs)):
        expected = {t.name: (dtypes.get(t.data_type, str(t.data_type)), (-1, *t.dims)) for t in declared}
        found = {t.name: (t.dtype, t.shape) for t in actual}
        if expected != found:
            problems.append(f"{kind}s: config declares {expected}, the engine has {found}")
    for name, (minimum, _, maximum) in description.profile.items():
        if minimum[0] != 1 or maximum[0] != config.max_batch_size:
            problems.append(f"profile of {name} covers batch {minimum[0]}..{maximum[0]}, the config serves 1..{config.max_batch_size}")
    return problems


def _progress_monitor(trt):
    class BuildProgress(trt.IProgressMonitor):
        """Prints the builder's phases and steps on one line of a terminal: engine builds take minutes."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._phases: dict[str, tuple[int, int]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._phases[phase_name] = (0, num_steps)

        def step_complete(self, phase_name, step):
            self._phases[phase_name] = (step + 1, self._phases.get(phase_name, (0, 0))[1])
            line = " | ".join(f"{name} {done}/{total}" for name, (done, total) in self._phases.items())
            sys.stderr.write(f"\r{line[-150:]:<150}")
            sys.stderr.flush()
            return True

        def phase_finish(self, phase_name):
            self._phases.pop(phase_name, None)
            if not self._phases:
                sys.stderr.write("\n")

    return BuildProgress()


def _graph_wants_aot_plugins(onnx_path: Path) -> bool:
    import onnx

    nodes = [node for node in onnx.load(onnx_path, load_external_data=False).graph.node if node.op_type in PLUGINS]
    return any(attribute.name == "aot" and attribute.i for node in nodes for attribute in node.attribute)


def _register_plugins_for(onnx_path: Path, library: TensorRTLibrary) -> str:
    from kernels.tensorrt_plugins import register_plugins

    aot = _graph_wants_aot_plugins(onnx_path)
    if aot and not library.quick_plugins:
        logger.warning("%s has no tensorrt.plugin: %s's plugins are built as JIT (class-based IPluginV3), "
                       "its nodes' aot attribute is not honoured", library.label, onnx_path.name)
        aot = False
    return register_plugins(aot=aot)


def build(onnx_path: Path, plan_path: Path, settings: EngineBuildSettings, plugins: bool) -> BuiltEngine:
    """Build a serialized engine (`model.plan`) from a precision ONNX graph and describe what it holds."""
    library = load_tensorrt()
    if library.needs_gpu_to_build and (reason := cuda_device_unavailable_reason()):
        raise TensorRTUnavailableError(f"{library.label} builds on a GPU only: {reason}")
    trt = library.module
    registration = _register_plugins_for(onnx_path, library) if plugins else None
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(library.network_flags())
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OsnetTritonError(f"{library.label} could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # IEngineInspector then lists every layer
    if sys.stderr.isatty():
        config.progress_monitor = _progress_monitor(trt)
    profile = builder.create_optimization_profile()
    shape = INPUT_SHAPE
    profile.set_shape(INPUT_NAME, (1, *shape), (settings.opt_batch_size, *shape), (settings.max_batch_size, *shape))
    config.add_optimization_profile(profile)
    cache_path = settings.timing_cache if library.timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OsnetTritonError(f"{library.label} failed to build an engine from {onnx_path} (see the log above)")
    seconds = time.perf_counter() - started
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    logger.info("%s built %s in %.1f s (%.1f MB)", library.label, plan_path, seconds, serialized.nbytes / 1e6)
    return BuiltEngine(plan=plan_path, library=library.label, plugins=registration, seconds=seconds,
                       plan_bytes=serialized.nbytes, network=describe_network(trt, network, profile))


def build_engine(onnx_path: Path, plan_path: Path, settings: EngineBuildSettings, plugins: bool) -> Path:
    """Build `model.plan` from a precision ONNX graph; returns its path."""
    return build(onnx_path, plan_path, settings, plugins).plan


class EngineRunner:
    """Runs a serialized engine on CuPy buffers: for checks and benchmarks, not for serving.

    Every copy, the execution and the read-back go to one non-blocking stream, in that order: an
    input written on CuPy's legacy stream would race an engine launched on another stream."""

    def __init__(self, plan_path: Path, plugins: str | None):
        """`plugins`: how the plan's plugins were registered when it was built (`BuiltEngine.plugins`)."""
        import cupy

        from kernels.tensorrt_plugins import QUICK_AOT, register_plugins

        library = load_tensorrt()
        if plugins is not None:
            register_plugins(aot=plugins == QUICK_AOT)  # deserializing needs the creators it was built with
        self._cupy = cupy
        trt = library.module
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise OsnetTritonError(f"{library.label} could not deserialize {plan_path}")
        self.description = describe_engine(trt, self.engine)
        self.context = self.engine.create_execution_context()
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def _bind(self, images, outputs) -> None:
        self.context.set_input_shape(INPUT_NAME, images.shape)
        self.context.set_tensor_address(INPUT_NAME, images.data.ptr)
        for name, array in outputs.items():
            self.context.set_tensor_address(name, array.data.ptr)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.ptr):
            raise OsnetTritonError("TensorRT execution failed")

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        cp = self._cupy
        with self.stream:
            batch = cp.asarray(np.ascontiguousarray(images, dtype=np.uint8))  # the served input: uint8 pixels
            outputs = {name: cp.empty((len(images), FEATURE_DIM), dtype=cp.float32) for name in (FEATURES_NAME, EMBEDDING_NAME)}
            self._bind(batch, outputs)
            self._execute()
            host = {name: cp.asnumpy(array, stream=self.stream) for name, array in outputs.items()}
        self.stream.synchronize()
        return host

    def images_per_second(self, batch_size: int, seconds: float = 2.0) -> float:
        cp = self._cupy
        with self.stream:
            images = cp.random.randint(0, 256, (batch_size, *INPUT_SHAPE), dtype=cp.uint8)
            outputs = {name: cp.empty((batch_size, FEATURE_DIM), dtype=cp.float32) for name in (FEATURES_NAME, EMBEDDING_NAME)}
            self._bind(images, outputs)
            self._execute()  # warm-up
        self.stream.synchronize()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(10):
                self._execute()
            self.stream.synchronize()
            runs += 10
        return runs * batch_size / (time.perf_counter() - started)

