"""Building a model repository: OSNet -> verified ONNX -> Triton models, and the GPU path:
FP16 / INT8 graphs -> precision report -> plugin rewrite (checked on CPU) -> TensorRT engines.

`BuildSettings` is the one settings object of a build: parsed once from the CLI, checked before any
work, and the one source every step's settings are derived from (the CPU models, the runtime choice,
the precision graphs, the TensorRT engines, the GPU models), so a setting the CLI accepts reaches
every model it shapes or is refused up front with the reason. `build_repository` runs a whole build.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from engine_builder.cpu_runtimes import (
    RUNTIME_CHOICES,
    RUNTIMES,
    RuntimeChoice,
    RuntimeMeasurement,
    RuntimeSelection,
    RuntimeSelectionError,
    choose_runtime,
    cpu_capabilities,
    load_average_1min,
    measure_candidates,
    openvino_installed,
    resolve_candidates,
    write_runtime_choice,
)
from osnet_base.errors import ExportMismatchError, OsnetTritonError
from engine_builder.export import export_onnx
from osnet_base.contract import EMBEDDING_NAME
from engine_builder.image_sets import CALIBRATION_SEED, EVALUATION_SEED, image_set
from engine_builder.models import VARIANTS, create_osnet
from engine_builder.precision import (
    CALIBRATION_METHODS,
    CPU_CALIBRATION_METHOD,
    TENSORRT_CALIBRATION_METHOD,
    PrecisionFloor,
    quantize_int8,
)
from engine_builder.preprocessing import normalize_pixels
from engine_builder.reference_weights import REFERENCE_VARIANT, default_weights
from engine_builder.tensorrt_build import EngineBuildSettings
from engine_builder.triton_repository import CpuRepositorySettings, GpuRepositorySettings, building_venv, check_repository_servable, write_cpu_models
from osnet_base.contract import DEFAULT_MAX_BATCH_SIZE, DEFAULT_RUNTIME
from osnet_base.image_decoding import DEFAULT_BUDGETS, DecodeBudgets

logger = logging.getLogger(__name__)

REDUCED_PRECISIONS = ("fp16", "int8")
# The rewritten graph must reproduce its own plugin-free source: same arithmetic, other kernels.
# In a Q/DQ graph a last-bit difference before a QuantizeLinear can flip a rounding to the next
# INT8 step, and such flips compound through the quantized layers: a looser bound there.
REWRITE_MIN_COSINE = {"fp16": 0.9999, "int8": 0.998}


def build_cpu_repository(
    variant: str,
    repository: str | Path,
    weights: str | Path | None = None,
    settings: CpuRepositorySettings | None = None,
    selection: RuntimeSelection | None = None,
) -> Path:
    """Export `variant` (checked against PyTorch), choose its CPU runtime, and write `preprocess`,
    `<variant>_<precision>` and the `osnet` ensemble.

    `selection.runtime` names the runtime (ONNX Runtime FP32 unless told otherwise) or is "auto":
    every candidate is measured in-process and the fastest within the precision floor is served.
    Either way the served model's embeddings are checked against PyTorch FP32 on held-out images,
    the build fails below the floor, and `<model>/runtime_choice.json` (and .md) says what was
    chosen and why.
    """
    repository = Path(repository)
    settings = settings or CpuRepositorySettings()
    selection = selection or RuntimeSelection()
    capabilities = cpu_capabilities()
    candidates = resolve_candidates(selection, capabilities, openvino_installed())
    model = create_osnet(variant, weights)
    evaluation = image_set(selection.eval_dir, selection.evaluation_images, EVALUATION_SEED)
    reference = pytorch_embeddings(model, evaluation)
    auto = selection.runtime == "auto"
    threads = settings.threads_per_instance()  # what the served model will run with, measured with the same
    batch_size = min(selection.batch_size, settings.max_batch_size)
    with tempfile.TemporaryDirectory(prefix="osnet_cpu_build_") as scratch:
        graphs = make_cpu_graphs(model, {runtime.graph for runtime in candidates}, Path(scratch), selection)
        load = load_average_1min()
        measurements = measure_candidates(
            candidates, graphs, evaluation, reference, floor=selection.floor, threads=threads,
            streams=settings.streams, instances=settings.instances, batch_size=batch_size,
            # An explicit runtime is only checked for precision: timing it would choose nothing.
            seconds_per_candidate=selection.seconds_per_candidate if auto else 0.0,
        )
        if auto:
            chosen, reason = choose_runtime(measurements, selection.floor)
        else:
            chosen, reason = selection.runtime, f"{selection.runtime}: requested explicitly"
            _enforce_floor(measurements[0], selection.floor, len(evaluation))
        runtime = RUNTIMES[chosen]
        served = write_cpu_models(repository, variant, settings, runtime)
        shutil.copyfile(graphs[runtime.graph], repository / served / "1" / "model.onnx")
    choice = RuntimeChoice(
        runtime=chosen, precision=runtime.precision, reason=reason, floor=selection.floor, measurements=tuple(measurements),
        cpu_capabilities=tuple(sorted(capabilities)), threads=threads, streams=settings.streams, instances=settings.instances,
        load_average_1min=load,
    )
    write_runtime_choice(repository / served, choice)
    check_repository_servable(repository, settings.execution_env)
    logger.info("serving %s: %s", served, reason)
    logger.info("repository %s ready: tritonserver --model-repository %s", repository, repository)
    return repository


def pytorch_embeddings(model: torch.nn.Module, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The reference every CPU runtime is held to: torchreid's normalisation of the served input pixels
    (uint8 [N,256,128,3]), eval-mode PyTorch FP32, L2-normalised."""
    with torch.inference_mode():
        return np.concatenate([torch.nn.functional.normalize(model(normalize_pixels(pixels[i : i + batch_size])), dim=1).numpy()
                               for i in range(0, len(pixels), batch_size)])


def make_cpu_graphs(model: torch.nn.Module, graphs: set[str], work_dir: Path, selection: RuntimeSelection) -> dict[str, Path]:
    """The FP32 export (checked against PyTorch) and, when asked for, the CPU INT8 Q/DQ graph made from it."""
    paths = {"fp32": export_onnx(model, work_dir / "model_fp32.onnx")}
    if "int8" in graphs:
        calibration = image_set(selection.calib_dir, selection.calibration_images, CALIBRATION_SEED)
        paths["int8"] = work_dir / "model_int8.onnx"
        onnx.save(quantize_int8(onnx.load(paths["fp32"]), calibration, method=selection.calibration_method), paths["int8"])
    return paths


def _enforce_floor(measured: RuntimeMeasurement, floor: PrecisionFloor, images: int) -> None:
    if measured.within_floor:
        return
    agreement = measured.error or (f"mean cosine {measured.mean_cosine:.6f}, min {measured.min_cosine:.6f}, "
                                   f"top-1 agreement {measured.top1_agreement:.3f}")
    raise RuntimeSelectionError(
        f"{measured.runtime} drifts too far from PyTorch FP32 on {images} held-out images: {agreement} (floor: mean "
        f"{floor.min_mean_cosine}, min {floor.min_cosine}, top-1 {floor.min_top1_agreement}). Choose another --runtime, "
        "or calibrate INT8 on images like the ones you serve.")


@dataclass(kw_only=True)
class PrecisionBuildSettings:
    precisions: tuple[str, ...] = REDUCED_PRECISIONS
    calib_dir: Path | None = None
    eval_dir: Path | None = None
    calibration_images: int = 64
    evaluation_images: int = 64
    calib_method: str = TENSORRT_CALIBRATION_METHOD
    aot_plugins: bool = True
    floors: dict = field(default_factory=dict)  # precision -> PrecisionFloor, overriding the defaults

    def __post_init__(self) -> None:
        unknown = set(self.precisions) - set(REDUCED_PRECISIONS)
        if unknown:
            raise ValueError(f"unknown precision(s) {sorted(unknown)}: choose from {REDUCED_PRECISIONS}")
        if self.calibration_images < 1 or self.evaluation_images < 2:
            raise ValueError("need >= 1 calibration image and >= 2 evaluation images")
        if self.calib_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.calib_method!r}")


@dataclass(frozen=True)
class PrecisionGraphs:
    """What the precision build wrote into its work directory."""

    fp32: Path
    plugin_free: dict[str, Path]  # precision -> graph TensorRT builds without our plugins
    with_plugins: dict[str, Path]  # precision -> the same graph rewritten to plugin nodes
    report_dir: Path


def _check_rewrite(plugin_free: onnx.ModelProto, rewritten: onnx.ModelProto, images: np.ndarray, precision: str) -> float:
    """Execute the rewritten graph (plugins as NumPy references) against its source; return the worst cosine."""
    from engine_builder.precision import embed_with_onnxruntime
    from kernels.onnxruntime_reference_ops import run_reference

    expected = embed_with_onnxruntime(plugin_free, images)
    actual = run_reference(rewritten, images, [EMBEDDING_NAME])[0]
    cosine = float(np.min(np.sum(expected * actual, axis=1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1))))
    if cosine < REWRITE_MIN_COSINE[precision]:
        raise ExportMismatchError(
            f"{precision} plugin rewrite changed the embeddings: min cosine {cosine:.6f} < {REWRITE_MIN_COSINE[precision]}"
        )
    return cosine


def build_precision_graphs(
    variant: str, work_dir: str | Path, weights: str | Path | None = None, settings: PrecisionBuildSettings | None = None
) -> PrecisionGraphs:
    """FP32 export, FP16 / INT8 graphs, each rewritten to plugin nodes (the rewrite checked on CPU
    against its plugin-free source), and the precision report; the build fails below the floors."""
    from engine_builder.plugin_rewrite import plugin_bound_node_names, rewrite_to_plugins
    from engine_builder.precision import (
        DEFAULT_FLOORS,
        compare_with_fp32,
        embed_with_onnxruntime,
        enforce_floors,
        make_fp16_onnx,
        write_precision_report,
    )
    from kernels.onnxruntime_reference_ops import run_reference

    settings = settings or PrecisionBuildSettings()
    work_dir = Path(work_dir)
    fp32_path = export_onnx(create_osnet(variant, weights), work_dir / "model_fp32.onnx")
    fp32 = onnx.load(fp32_path)
    evaluation = image_set(settings.eval_dir, settings.evaluation_images, EVALUATION_SEED)
    fp32_embeddings = embed_with_onnxruntime(fp32, evaluation)

    graphs: dict[str, onnx.ModelProto] = {}
    if "fp16" in settings.precisions:
        graphs["fp16"] = make_fp16_onnx(fp32)
    if "int8" in settings.precisions:
        calibration = image_set(settings.calib_dir, settings.calibration_images, CALIBRATION_SEED)
        graphs["int8"] = quantize_int8(fp32, calibration, method=settings.calib_method,
                                       leave_in_float=plugin_bound_node_names(fp32), float_weights=True)

    floors = {name: settings.floors.get(name, DEFAULT_FLOORS[name]) for name in graphs}
    results = [
        compare_with_fp32(name, fp32_embeddings, embed_with_onnxruntime(graph, evaluation), floors[name])
        for name, graph in graphs.items()
    ]
    shipped: dict[str, onnx.ModelProto] = {}
    for name, graph in graphs.items():
        exact, counts = rewrite_to_plugins(graph, aot=settings.aot_plugins)
        cosine = _check_rewrite(graph, exact, evaluation[:2], name)
        logger.info("%s: %s; rewritten graph == plugin-free graph (min cosine %.7f)", name, counts, cosine)
        shipped[name] = exact
    if "int8" in graphs:
        # The INT8 engine runs the plugins in FP16: report the graph as the engine will run it.
        shipped["int8"], _ = rewrite_to_plugins(graphs["int8"], aot=settings.aot_plugins, fp16_plugins=True)
        embeddings = np.concatenate([run_reference(shipped["int8"], evaluation[i : i + 16], [EMBEDDING_NAME])[0]
                                     for i in range(0, len(evaluation), 16)])
        results.append(compare_with_fp32("int8 (FP16 plugins, as the engine runs)", fp32_embeddings, embeddings, floors["int8"]))
    write_precision_report(results, work_dir, variant, str(weights) if weights else "seeded random initialisation")
    for result in results:
        logger.info("%s vs fp32: mean cosine %.6f, min %.6f, top-1 agreement %.3f", result.precision,
                    result.mean_cosine, result.min_cosine, result.top1_agreement)
    enforce_floors(results)

    plugin_free, with_plugins = {}, {}
    for name, graph in graphs.items():
        plugin_free[name] = work_dir / f"model_{name}.onnx"
        with_plugins[name] = work_dir / f"model_{name}_plugins.onnx"
        onnx.save(graph, plugin_free[name])
        onnx.save(shipped[name], with_plugins[name])
    return PrecisionGraphs(fp32=fp32_path, plugin_free=plugin_free, with_plugins=with_plugins, report_dir=work_dir)


PRECISIONS = ("fp32", *REDUCED_PRECISIONS)


class BuildSettingsError(OsnetTritonError, ValueError):
    """A combination of settings the build cannot honour; raised before any work is done."""


@dataclass(frozen=True, kw_only=True)
class BuildSettings:
    """Everything one build is asked for. `None` means: the default of the step that uses it."""

    variant: str = REFERENCE_VARIANT
    weights: Path | None = None  # None: the reference checkpoint for its variant, else seeded random weights
    repository: Path = Path("triton_repo")
    precisions: tuple[str, ...] = ("fp32",)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    instances: int = 1
    intra_op_threads: int | None = None
    python_env: Path | None = field(default_factory=building_venv)
    runtime: str = DEFAULT_RUNTIME
    calib_dir: Path | None = None
    eval_dir: Path | None = None
    calib_method: str | None = None  # None: each INT8 graph's own default (precision.py says why)
    floors: dict[str, PrecisionFloor] = field(default_factory=dict)
    work_dir: Path | None = None  # None: build/<variant>
    jit_plugins: bool = False
    # The preprocessor's budgets and decode threads (CpuRepositorySettings says what they mean).
    max_image_bytes: int = DEFAULT_BUDGETS.max_image_bytes
    max_image_pixels: int = DEFAULT_BUDGETS.max_image_pixels
    max_request_pixels: int = DEFAULT_BUDGETS.max_request_pixels
    preprocess_instances: int | None = None
    decode_threads: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"unknown variant {self.variant!r}; choose one of: {', '.join(sorted(VARIANTS))}")
        if not self.precisions or set(self.precisions) - set(PRECISIONS):
            problems.append(f"precisions must be some of {PRECISIONS}, got {list(self.precisions)}")
        for name, value in (("max batch size", self.max_batch_size), ("instances", self.instances),
                            ("intra-op threads", self.intra_op_threads), ("preprocess instances", self.preprocess_instances),
                            ("decode threads", self.decode_threads)):
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        try:
            DecodeBudgets(max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                          max_request_pixels=self.max_request_pixels)
        except ValueError as exc:
            problems.append(str(exc))
        if self.runtime not in RUNTIME_CHOICES:
            problems.append(f"unknown CPU runtime {self.runtime!r}: choose from {', '.join(RUNTIME_CHOICES)}")
        if self.calib_method is not None and self.calib_method not in CALIBRATION_METHODS:
            problems.append(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.calib_method!r}")
        if set(self.floors) - set(REDUCED_PRECISIONS):
            problems.append(f"floors apply to {REDUCED_PRECISIONS} only, got {sorted(self.floors)}")
        elif set(self.floors) - set(self.precisions):
            problems.append(f"a floor for {sorted(set(self.floors) - set(self.precisions))} is set, but that precision is not built")
        if self.jit_plugins and not set(self.precisions) & set(REDUCED_PRECISIONS):
            problems.append("--jit-plugins shapes TensorRT engines only: build fp16 or int8 as well")
        for name, folder in (("calibration", self.calib_dir), ("evaluation", self.eval_dir)):
            if folder is not None and not Path(folder).is_dir():
                problems.append(f"the {name} image folder {folder} does not exist")
        if self.weights is not None and not Path(self.weights).is_file():
            problems.append(f"checkpoint {self.weights} does not exist")
        if self.python_env is not None and not Path(self.python_env).is_dir():
            problems.append(f"the python-backend environment {self.python_env} is not a folder")
        if problems:
            raise BuildSettingsError("cannot build: " + "; ".join(problems))

    @property
    def builds_cpu_models(self) -> bool:
        return "fp32" in self.precisions

    @property
    def reduced_precisions(self) -> tuple[str, ...]:
        return tuple(p for p in self.precisions if p in REDUCED_PRECISIONS)

    def resolved_weights(self) -> Path | None:
        return self.weights if self.weights is not None else default_weights(self.variant)

    def resolved_work_dir(self) -> Path:
        return self.work_dir or Path("build") / self.variant

    def cpu_repository(self) -> CpuRepositorySettings:
        """`preprocess` and the CPU tensor model; a GPU build's `preprocess` is the same."""
        return CpuRepositorySettings(max_batch_size=self.max_batch_size, instances=self.instances,
                                     intra_op_threads=self.intra_op_threads, execution_env=self.python_env,
                                     max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                                     max_request_pixels=self.max_request_pixels, preprocess_instances=self.preprocess_instances,
                                     decode_threads=self.decode_threads)

    def runtime_selection(self) -> RuntimeSelection:
        return RuntimeSelection(runtime=self.runtime, eval_dir=self.eval_dir, calib_dir=self.calib_dir,
                                calibration_method=self.calib_method or CPU_CALIBRATION_METHOD)

    def precision_build(self) -> PrecisionBuildSettings:
        return PrecisionBuildSettings(precisions=self.reduced_precisions or REDUCED_PRECISIONS, calib_dir=self.calib_dir,
                                      eval_dir=self.eval_dir, calib_method=self.calib_method or TENSORRT_CALIBRATION_METHOD,
                                      aot_plugins=not self.jit_plugins, floors=dict(self.floors))

    def engine_build(self) -> EngineBuildSettings:
        return EngineBuildSettings(max_batch_size=self.max_batch_size, timing_cache=self.resolved_work_dir() / "timing.cache")

    def gpu_repository(self) -> GpuRepositorySettings:
        return GpuRepositorySettings(max_batch_size=self.max_batch_size, instances=self.instances, execution_env=self.python_env)


@dataclass(frozen=True)
class BuildResult:
    served: str | None  # the model the `osnet` ensemble runs, where this build wrote one
    work_dir: Path | None  # the precision graphs and their report, where reduced precisions were built
    engines_skipped: str | None  # why no TensorRT engine was built, where one was asked for


def build_repository(settings: BuildSettings) -> BuildResult:
    """The whole build `settings` asks for."""
    from engine_builder.tensorrt_build import build_engine, tensorrt_unavailable_reason
    from engine_builder.triton_repository import served_tensor_model, write_tensorrt_models

    weights = settings.resolved_weights()
    served = None
    if settings.builds_cpu_models:
        build_cpu_repository(settings.variant, settings.repository, weights, settings.cpu_repository(), settings.runtime_selection())
        served = served_tensor_model(settings.repository)
    if not settings.reduced_precisions:
        return BuildResult(served=served, work_dir=None, engines_skipped=None)
    work_dir = settings.resolved_work_dir()
    graphs = build_precision_graphs(settings.variant, work_dir, weights, settings.precision_build())
    reason = tensorrt_unavailable_reason()
    if reason:
        return BuildResult(served=served, work_dir=work_dir, engines_skipped=reason)
    plans = {precision: build_engine(graph, work_dir / f"{precision}.plan", settings.engine_build(), plugins=True)
             for precision, graph in graphs.with_plugins.items()}
    served = write_tensorrt_models(settings.repository, settings.variant, plans, settings.gpu_repository(),
                                   preprocess=settings.cpu_repository(), jit_plugins=settings.jit_plugins, report_dir=work_dir)
    return BuildResult(served=served, work_dir=work_dir, engines_skipped=None)
