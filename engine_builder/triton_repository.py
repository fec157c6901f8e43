"""Writes the Triton model repository that `tritonserver --model-repository triton_repo` serves.

Configs are built as `ModelConfig` protobuf messages (Triton's own schema, shipped in tritonclient)
and rendered with protobuf's text format, so a config we write always parses in the server.

The CPU repository holds three models:
- `preprocess`: python backend, encoded image bytes -> INPUT uint8 pixels (decoded on a thread pool,
  within the budgets of `CpuRepositorySettings`; see osnet_base/image_decoding.py);
- `<variant>_<precision>` (fp32, bf16 or int8): python backend running model.onnx with the CPU
  runtime the build chose (ONNX Runtime or OpenVINO, see `cpu_runtimes`);
- `osnet`: ensemble IMAGE -> preprocess -> <variant>_<precision> -> EMBEDDING, FEATURES;
- `osnet_frames`: python backend, one camera FRAME and its BOXES -> one embedding per box, the crops
  sent through BLS to the tensor model the ensemble runs (see triton_repo/frame_embedder.py).
TensorRT builds add `<variant>_trt_fp16|int8` and point the ensemble at the fastest of them.
The python-backend sources are committed at the top of `triton_repo/` and copied into each model.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from engine_builder import cpu_sessions
from engine_builder.cpu_runtimes import PRECISION_ORDER, CpuRuntime
from osnet_base import contract, frame_boxes, image_decoding
from osnet_base.errors import OsnetTritonError
from osnet_base.contract import (
    BOXES_NAME,
    DEFAULT_MAX_BATCH_SIZE,
    EMBEDDING_NAME,
    ENSEMBLE_MODEL,
    FEATURE_DIM,
    FEATURES_NAME,
    FRAME_NAME,
    FRAMES_MODEL,
    IMAGE_NAME,
    INPUT_NAME,
    INPUT_SHAPE,
    PREPROCESS_MODEL,
)
from osnet_base.image_decoding import DEFAULT_BUDGETS, DecodeBudgets

logger = logging.getLogger(__name__)

PYTHON_MODEL_SOURCES = Path(__file__).resolve().parent.parent / "triton_repo"
# Modules every python-backend model finds beside its model.py (the stub puts that folder on sys.path).
PYTHON_HELPER_MODULES = (PYTHON_MODEL_SOURCES / "batched_responses.py", Path(contract.__file__), Path(cpu_sessions.__file__),
                         Path(image_decoding.__file__), Path(frame_boxes.__file__))
CPU_TENSOR_MODEL_SOURCE = "cpu_embedder.py"  # every CPU runtime: the config parameter ENGINE picks one
# Pillow holds the GIL while it parses headers and copies pixels out (~25% of a person crop's ~260 us
# here), and releases it while it decodes and resizes: one process gains little past ~4 threads.
MAX_DECODE_THREADS = 4


def building_venv() -> Path | None:
    """The venv running this build, if it runs in one."""
    return Path(sys.prefix) if sys.prefix != sys.base_prefix else None


@dataclass(kw_only=True)
class CpuRepositorySettings:
    """How the CPU models are served. `None` means: let the server or the runtime decide."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    instances: int = 1
    # Threads of each tensor-model instance: ONNX Runtime's intra-op threads, OpenVINO's INFERENCE_NUM_THREADS.
    # None: see `threads_per_instance`.
    intra_op_threads: int | None = None
    # Streams per instance: a batch is split over them and its parts run in parallel. None: for ONNX
    # Runtime a session per thread, for OpenVINO as many as its THROUGHPUT hint picks for this CPU (see
    # CpuRuntime.config_parameters).
    streams: int | None = None
    max_queue_delay_us: int = 100
    # Batch sizes the tensor model's dynamic batcher aims for; empty: as large as the queue allows.
    preferred_batch_sizes: tuple[int, ...] = ()
    # The preprocessor's budgets (see osnet_base/image_decoding.DEFAULT_BUDGETS for the measurements).
    max_image_bytes: int = DEFAULT_BUDGETS.max_image_bytes
    max_image_pixels: int = DEFAULT_BUDGETS.max_image_pixels
    max_request_pixels: int = DEFAULT_BUDGETS.max_request_pixels
    # Preprocess instances, and decode threads in each. None: see `preprocess_layout`.
    preprocess_instances: int | None = None
    decode_threads: int | None = None
    # `osnet_frames` instances: each decodes one frame at a time and waits for its crops' embeddings.
    # None: see `frames_instances`.
    frame_instances: int | None = None
    # The environment the python-backend stub runs in on the serving machine (EXECUTION_ENV_PATH):
    # by default the venv doing the build; None outside a venv: the server's own Python.
    execution_env: Path | None = field(default_factory=building_venv)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1, got {self.intra_op_threads}")
        if self.streams is not None and self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if any(size < 1 or size > self.max_batch_size for size in self.preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes must lie in 1..{self.max_batch_size}, got {self.preferred_batch_sizes}")
        for name in ("preprocess_instances", "decode_threads", "frame_instances"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.decode_budgets()  # refuses budgets that make no sense

    def decode_budgets(self) -> DecodeBudgets:
        return DecodeBudgets(max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                             max_request_pixels=self.max_request_pixels)

    def preprocess_layout(self) -> tuple[int, int]:
        """(instances, decode threads per instance) of `preprocess`: as given; else a thread per core in
        instances of at most MAX_DECODE_THREADS threads (2 cores: one instance of 2 threads)."""
        cores = len(os.sched_getaffinity(0))
        instances = self.preprocess_instances or -(-cores // MAX_DECODE_THREADS)
        return instances, self.decode_threads or max(1, -(-cores // instances))

    def frames_instances(self) -> int:
        """Instances of `osnet_frames`: as given; else one per core, and at least 2, so that one instance
        decodes a frame while another's crops are embedded."""
        return self.frame_instances or max(2, len(os.sched_getaffinity(0)))

    def threads_per_instance(self) -> int | None:
        """The threads each tensor-model instance runs: as given; else, for one instance, the runtime's
        default (every core); for several, the cores shared out between them. Each instance is its own
        process and would otherwise start a thread per core: two ONNX Runtime instances on 2 cores served
        71 img/s that way against 84-92 with one thread each (osnet_x1_0)."""
        if self.intra_op_threads is not None or self.instances == 1:
            return self.intra_op_threads
        return max(1, len(os.sched_getaffinity(0)) // self.instances)


def tensor_model_name(variant: str, precision: str = "fp32") -> str:
    """The CPU tensor model: `<variant>_fp32|bf16|int8`."""
    return f"{variant}_{precision}"


def tensorrt_model_name(variant: str, precision: str) -> str:
    """A TensorRT engine: `<variant>_trt_fp16|int8`, beside the CPU model of the same precision, never over it."""
    return f"{variant}_trt_{precision}"


def render_config(config: pb.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> pb.ModelConfig:
    return text_format.Parse(text, pb.ModelConfig())


def _set_execution_env(config: pb.ModelConfig, execution_env: Path | None) -> None:
    if execution_env is not None:
        config.parameters["EXECUTION_ENV_PATH"].string_value = str(execution_env)


def _python_model_config(name: str, settings: CpuRepositorySettings, instances: int) -> pb.ModelConfig:
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=settings.max_batch_size)
    config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=instances)
    _set_execution_env(config, settings.execution_env)
    return config


def _add_embedding_outputs(config: pb.ModelConfig) -> None:
    for name in (EMBEDDING_NAME, FEATURES_NAME):
        config.output.add(name=name, data_type=pb.TYPE_FP32, dims=[FEATURE_DIM])


def _add_tensor_model_io(config: pb.ModelConfig) -> None:
    """INPUT -> EMBEDDING, FEATURES: the same for every tensor model, so clients and the ensemble do not care which serves."""
    config.input.add(name=INPUT_NAME, data_type=pb.TYPE_UINT8, dims=list(INPUT_SHAPE))
    _add_embedding_outputs(config)


def preprocess_config(settings: CpuRepositorySettings) -> pb.ModelConfig:
    instances, threads = settings.preprocess_layout()
    config = _python_model_config(PREPROCESS_MODEL, settings, instances)
    config.input.add(name=IMAGE_NAME, data_type=pb.TYPE_STRING, dims=[1])
    config.output.add(name=INPUT_NAME, data_type=pb.TYPE_UINT8, dims=list(INPUT_SHAPE))
    parameters = {**settings.decode_budgets().as_parameters(), "DECODE_THREADS": threads}
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


def cpu_tensor_model_config(name: str, settings: CpuRepositorySettings, parameters: Mapping[str, str]) -> pb.ModelConfig:
    """INPUT -> EMBEDDING, FEATURES on the CPU; `parameters` configure the runtime (see `CpuRuntime.config_parameters`)."""
    config = _python_model_config(name, settings, settings.instances)
    _add_tensor_model_io(config)
    config.dynamic_batching.preferred_batch_size.extend(settings.preferred_batch_sizes)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def frames_config(tensor_model: str, settings: CpuRepositorySettings) -> pb.ModelConfig:
    """FRAME [1] and BOXES [K,4] -> EMBEDDING, FEATURES [K,512]; a request is one frame, so the model does
    not batch requests itself: the crops of its instances' frames meet in `tensor_model`'s batcher. A
    frame takes at most a full batch of that model's boxes."""
    config = pb.ModelConfig(name=FRAMES_MODEL, backend="python", max_batch_size=0)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=settings.frames_instances())
    _set_execution_env(config, settings.execution_env)
    config.input.add(name=FRAME_NAME, data_type=pb.TYPE_STRING, dims=[1])
    config.input.add(name=BOXES_NAME, data_type=pb.TYPE_FP32, dims=[-1, 4])
    for name in (EMBEDDING_NAME, FEATURES_NAME):
        config.output.add(name=name, data_type=pb.TYPE_FP32, dims=[-1, FEATURE_DIM])
    parameters = {**settings.decode_budgets().as_parameters(), "MAX_BOXES": settings.max_batch_size, "TENSOR_MODEL": tensor_model}
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


def ensemble_config(tensor_model: str, max_batch_size: int) -> pb.ModelConfig:
    config = pb.ModelConfig(name=ENSEMBLE_MODEL, platform="ensemble", max_batch_size=max_batch_size)
    config.input.add(name=IMAGE_NAME, data_type=pb.TYPE_STRING, dims=[1])
    _add_embedding_outputs(config)
    preprocess = config.ensemble_scheduling.step.add(model_name=PREPROCESS_MODEL, model_version=-1)
    preprocess.input_map[IMAGE_NAME] = IMAGE_NAME
    preprocess.output_map[INPUT_NAME] = "preprocessed_image"
    embed = config.ensemble_scheduling.step.add(model_name=tensor_model, model_version=-1)
    embed.input_map[INPUT_NAME] = "preprocessed_image"
    for name in (EMBEDDING_NAME, FEATURES_NAME):
        embed.output_map[name] = name
    return config


def write_model(repository: Path, config: pb.ModelConfig, python_source: str | None = None) -> Path:
    """Write `config` as version 1; for python-backend models also `model.py` from the committed
    source, and beside it the helper modules the sources import."""
    version_dir = repository / config.name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    if python_source is not None:
        for source, target in [(PYTHON_MODEL_SOURCES / python_source, "model.py"), *((helper, helper.name) for helper in PYTHON_HELPER_MODULES)]:
            if not source.is_file():
                raise FileNotFoundError(f"python-backend source {source} is missing: is this a checkout of osnet-triton?")
            shutil.copyfile(source, version_dir / target)
    (repository / config.name / "config.pbtxt").write_text(render_config(config))
    logger.info("wrote model %s into %s", config.name, repository)
    return version_dir


def write_ensemble(repository: Path, tensor_model: str, settings: CpuRepositorySettings) -> None:
    """Write `preprocess` and the `osnet` ensemble over `tensor_model` (a CPU model or a TensorRT engine),
    and `osnet_frames` over the same model."""
    write_model(repository, preprocess_config(settings), "image_preprocessor.py")
    write_model(repository, ensemble_config(tensor_model, settings.max_batch_size))
    write_model(repository, frames_config(tensor_model, settings), "frame_embedder.py")


def write_cpu_models(repository: Path, variant: str, settings: CpuRepositorySettings, runtime: CpuRuntime) -> str:
    """Write preprocess, the tensor model `runtime` serves and the ensemble over it; the tensor model's
    `1/model.onnx` must be written separately. A CPU tensor model of the same variant left by an
    earlier build is removed: the server would load it too. Returns the tensor model's name.
    """
    tensor_model = tensor_model_name(variant, runtime.precision)
    parameters = runtime.config_parameters(settings.threads_per_instance(), settings.streams)
    write_model(repository, cpu_tensor_model_config(tensor_model, settings, parameters), CPU_TENSOR_MODEL_SOURCE)
    write_ensemble(repository, tensor_model, settings)
    for precision in PRECISION_ORDER:
        stale = repository / tensor_model_name(variant, precision)
        if stale.name != tensor_model and stale.is_dir():
            shutil.rmtree(stale)
            logger.info("removed %s, left by an earlier CPU build", stale)
    return tensor_model


def served_tensor_model(repository: Path) -> str:
    """The tensor model the `osnet` ensemble runs."""
    config = parse_config((Path(repository) / ENSEMBLE_MODEL / "config.pbtxt").read_text())
    return config.ensemble_scheduling.step[1].model_name


@dataclass(kw_only=True)
class GpuRepositorySettings:
    """How the TensorRT models are served."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    instances: int = 1
    max_queue_delay_us: int = 100
    cuda_graphs: bool = True
    # For the python-backend models of a GPU build: `preprocess`, and JIT-plugin engines.
    execution_env: Path | None = field(default_factory=building_venv)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.instances < 1:
            raise ValueError("max_batch_size and instances must be >= 1")


def _gpu_tensor_model_config(settings: GpuRepositorySettings, **name_and_kind: str) -> pb.ModelConfig:
    config = pb.ModelConfig(max_batch_size=settings.max_batch_size, **name_and_kind)
    _add_tensor_model_io(config)
    config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=settings.instances)
    return config


def tensorrt_model_config(name: str, settings: GpuRepositorySettings) -> pb.ModelConfig:
    """`tensorrt_plan` with the CPU model's I/O names."""
    config = _gpu_tensor_model_config(settings, name=name, platform="tensorrt_plan")
    config.optimization.cuda.graphs = settings.cuda_graphs
    return config


def tensorrt_jit_model_config(name: str, settings: GpuRepositorySettings) -> pb.ModelConfig:
    """A python-backend model that runs a JIT-plugin plan: those need our plugin module in-process."""
    config = _gpu_tensor_model_config(settings, name=name, backend="python")
    _set_execution_env(config, settings.execution_env)
    return config


def write_tensorrt_model(
    repository: Path, name: str, plan: Path, settings: GpuRepositorySettings, jit_plugins: bool, report_dir: Path | None = None
) -> Path:
    """Install `plan` as `<name>/1/model.plan` with its config (and the precision report beside it)."""
    if jit_plugins:
        version_dir = write_model(repository, tensorrt_jit_model_config(name, settings), "tensorrt_jit_embedder.py")
    else:
        version_dir = write_model(repository, tensorrt_model_config(name, settings))
    shutil.copyfile(plan, version_dir / "model.plan")
    if report_dir is not None:
        for report in report_dir.glob("precision_report.*"):
            shutil.copyfile(report, repository / name / report.name)
    return version_dir


def write_tensorrt_models(
    repository: Path, variant: str, plans: Mapping[str, Path], settings: GpuRepositorySettings, *,
    preprocess: CpuRepositorySettings, jit_plugins: bool, report_dir: Path | None = None,
) -> str:
    """Install each precision's plan as `<variant>_trt_<precision>` and point the `osnet` ensemble at
    INT8 if it was built (it passed its precision floor, and it is the lighter engine), else FP16.
    `preprocess` serves the ensemble's first step, as in a CPU build of the same settings.
    The CPU tensor model stays, under its own name. Returns the model the ensemble now runs."""
    if not plans or set(plans) - {"fp16", "int8"}:
        raise ValueError(f"TensorRT plans are fp16 and/or int8, got {sorted(plans)}")
    for precision, plan in plans.items():
        write_tensorrt_model(repository, tensorrt_model_name(variant, precision), plan, settings, jit_plugins, report_dir)
    served = tensorrt_model_name(variant, "int8" if "int8" in plans else "fp16")
    if preprocess.max_batch_size != settings.max_batch_size:
        raise ValueError(f"preprocess and the engines must take the same max batch size, got {preprocess.max_batch_size} "
                         f"and {settings.max_batch_size}")
    write_ensemble(repository, served, preprocess)
    return served


class RepositoryNotServableError(OsnetTritonError):
    """A written repository that is incomplete, or that a real tritonserver does not serve."""


def missing_files(repository: Path) -> list[str]:
    """What a server would need and does not find: the files of each python-backend model (and the
    graph or plan of a tensor model), the plan of each engine, every model an ensemble step names."""
    repository = Path(repository)
    models = {path.parent.name: path for path in repository.glob("*/config.pbtxt")}
    missing = [] if models else [f"{repository}: no model (no */config.pbtxt)"]
    for name, config_path in sorted(models.items()):
        config = parse_config(config_path.read_text())
        version_dir = repository / name / "1"
        if config.backend == "python":
            needed = ["model.py", *(helper.name for helper in PYTHON_HELPER_MODULES)]
            if any(tensor.name == INPUT_NAME for tensor in config.input):  # a tensor model: its graph or engine too
                on_gpu = any(group.kind == pb.ModelInstanceGroup.KIND_GPU for group in config.instance_group)
                needed.append("model.plan" if on_gpu else "model.onnx")
        elif config.platform == "tensorrt_plan":
            needed = ["model.plan"]
        else:
            needed = []
        missing += [str(version_dir / file) for file in needed if not (version_dir / file).is_file()]
        if config.platform == "ensemble":
            missing += [f"{repository / step.model_name} (a step of {name})" for step in config.ensemble_scheduling.step
                        if step.model_name not in models]
    return missing


def check_repository_servable(repository: Path, execution_env: Path | None) -> None:
    """The last step of a CPU build: the repository is complete, and a real tritonserver (under the
    supervisor, start bounded) loads it and answers the probe image through the `osnet` ensemble
    with a correct embedding. Where the python backend's environment lies on another machine
    (`--python-env`), the server cannot run it here and only completeness is checked."""
    from osnet_base.triton_server import TritonServerConfig, TritonServerError, TritonServerProcess

    missing = missing_files(repository)
    if missing:
        raise RepositoryNotServableError(f"the repository {repository} is incomplete; missing: {', '.join(missing)}")
    if execution_env is not None and not (Path(execution_env) / "bin" / "activate").is_file():
        logger.warning("not serving %s as a check: its python environment %s is not on this machine", repository, execution_env)
        return
    try:
        with TritonServerProcess(TritonServerConfig(model_repository=repository)):
            pass  # the start waits for a correct answer through the models
    except TritonServerError as exc:
        logger.debug("%s", exc)
        reason = str(exc).splitlines()[0]  # the offending line; the rest is the server log's tail
        raise RepositoryNotServableError(f"tritonserver does not serve the repository {repository}: {reason}") from None
    logger.info("checked: tritonserver serves %s and answers correctly", repository)
