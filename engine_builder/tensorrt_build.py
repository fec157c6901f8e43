"""TensorRT engines from the precision ONNX graphs, and a small runner to check them.

Thin on purpose: everything TensorRT is given (plugin-rewritten, FP16 and Q/DQ INT8 ONNX) is made
and tested on CPU elsewhere. Written against TensorRT >= 10.9 and 11.x: the network is strongly
typed (precision comes from the graph; 11.x has no precision flags), one optimization profile
covers batch 1..max_batch_size, the timing cache is reused between builds.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osnet_base.contract import DEFAULT_MAX_BATCH_SIZE, EMBEDDING_NAME, FEATURE_DIM, FEATURES_NAME, INPUT_HEIGHT, INPUT_NAME, INPUT_WIDTH
from osnet_base.errors import OsnetTritonError

logger = logging.getLogger(__name__)

MIN_TENSORRT = (10, 9)


class TensorRTUnavailableError(OsnetTritonError):
    """No usable TensorRT (>= 10.9) or no GPU in this environment."""


def tensorrt_unavailable_reason() -> str | None:
    """None when engines can be built here, else why not (in words a user can act on)."""
    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT is not installed (the engine step needs TensorRT >= 10.9 and an NVIDIA GPU)"
    version = tuple(int(part) for part in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        return f"TensorRT {trt.__version__} is too old: the fused plugins need >= 10.9"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU is visible"
    except Exception as exc:  # CuPy raises CUDARuntimeError or ImportError variants without a GPU
        return f"no usable CUDA GPU through CuPy: {exc}"
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


def _progress_monitor(trt):
    class BuildProgress(trt.IProgressMonitor):
        """Prints the builder's phases and steps on one line: engine builds take minutes."""

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


def build_engine(onnx_path: Path, plan_path: Path, settings: EngineBuildSettings, plugins: bool) -> Path:
    """Build a serialized engine (`model.plan`) from a precision ONNX graph."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise TensorRTUnavailableError(reason)
    import tensorrt as trt

    if plugins:
        from kernels.tensorrt_plugins import register_plugins

        register_plugins()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # 10.x; 11.x is strongly typed only
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OsnetTritonError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.progress_monitor = _progress_monitor(trt)
    profile = builder.create_optimization_profile()
    shape = (3, INPUT_HEIGHT, INPUT_WIDTH)
    profile.set_shape(INPUT_NAME, (1, *shape), (settings.opt_batch_size, *shape), (settings.max_batch_size, *shape))
    config.add_optimization_profile(profile)
    cache_path = settings.timing_cache
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OsnetTritonError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    logger.info("built %s in %.0f s", plan_path, time.perf_counter() - started)
    return plan_path


class EngineRunner:
    """Runs a serialized engine on CuPy buffers: for checks and benchmarks, not for serving."""

    def __init__(self, plan_path: Path, plugins: bool):
        import cupy
        import tensorrt as trt

        if plugins:
            from kernels.tensorrt_plugins import register_plugins

            register_plugins()
        self._cupy = cupy
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise OsnetTritonError(f"TensorRT could not deserialize {plan_path}")
        self.context = self.engine.create_execution_context()
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        cp = self._cupy
        batch = cp.asarray(np.ascontiguousarray(images, dtype=np.float32))
        self.context.set_input_shape(INPUT_NAME, batch.shape)
        outputs = {name: cp.empty((len(images), FEATURE_DIM), dtype=cp.float32) for name in (FEATURES_NAME, EMBEDDING_NAME)}
        self.context.set_tensor_address(INPUT_NAME, batch.data.ptr)
        for name, array in outputs.items():
            self.context.set_tensor_address(name, array.data.ptr)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise OsnetTritonError("TensorRT execution failed")
        self.stream.synchronize()
        return {name: cp.asnumpy(array) for name, array in outputs.items()}

    def images_per_second(self, batch_size: int, seconds: float = 2.0) -> float:
        cp = self._cupy
        images = cp.random.standard_normal((batch_size, 3, INPUT_HEIGHT, INPUT_WIDTH), dtype=cp.float32)
        outputs = [cp.empty((batch_size, FEATURE_DIM), dtype=cp.float32) for _ in range(2)]
        self.context.set_input_shape(INPUT_NAME, images.shape)
        self.context.set_tensor_address(INPUT_NAME, images.data.ptr)
        for name, array in zip((FEATURES_NAME, EMBEDDING_NAME), outputs):
            self.context.set_tensor_address(name, array.data.ptr)
        self.context.execute_async_v3(self.stream.ptr)  # warm-up
        self.stream.synchronize()
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(10):
                self.context.execute_async_v3(self.stream.ptr)
            self.stream.synchronize()
            runs += 10
        return runs * batch_size / (time.perf_counter() - started)
