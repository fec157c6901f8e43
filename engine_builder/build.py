"""Building a model repository: OSNet -> verified ONNX -> Triton models, and the GPU path:
FP16 / INT8 graphs -> precision report -> plugin rewrite (checked on CPU) -> TensorRT engines."""
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
    RUNTIMES,
    RuntimeChoice,
    RuntimeMeasurement,
    RuntimeSelection,
    RuntimeSelectionError,
    choose_runtime,
    cpu_capabilities,
    load_average_1min,
    make_cpu_int8_onnx,
    measure_candidates,
    openvino_installed,
    resolve_candidates,
    write_runtime_choice,
)
from osnet_base.errors import ExportMismatchError
from engine_builder.export import export_onnx
from osnet_base.contract import EMBEDDING_NAME
from engine_builder.image_sets import CALIBRATION_SEED, EVALUATION_SEED, image_set
from engine_builder.models import create_osnet
from engine_builder.precision import PrecisionFloor
from engine_builder.triton_repository import CpuRepositorySettings, write_cpu_models

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
    with tempfile.TemporaryDirectory(prefix="osnet_cpu_build_") as scratch:
        graphs = make_cpu_graphs(model, {runtime.graph for runtime in candidates}, Path(scratch), selection)
        load = load_average_1min()
        measurements = measure_candidates(
            candidates, graphs, evaluation, reference, floor=selection.floor, threads=threads,
            streams=settings.streams, batch_size=selection.batch_size,
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
        cpu_capabilities=tuple(sorted(capabilities)), threads=threads, streams=settings.streams,
        load_average_1min=load,
    )
    write_runtime_choice(repository / served, choice)
    logger.info("serving %s: %s", served, reason)
    logger.info("repository %s ready: tritonserver --model-repository %s", repository, repository)
    return repository


def pytorch_embeddings(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The reference every CPU runtime is held to: eval-mode PyTorch FP32, L2-normalised."""
    with torch.inference_mode():
        return np.concatenate([torch.nn.functional.normalize(model(torch.from_numpy(images[i : i + batch_size])), dim=1).numpy()
                               for i in range(0, len(images), batch_size)])


def make_cpu_graphs(model: torch.nn.Module, graphs: set[str], work_dir: Path, selection: RuntimeSelection) -> dict[str, Path]:
    """The FP32 export (checked against PyTorch) and, when asked for, the CPU INT8 Q/DQ graph made from it."""
    paths = {"fp32": export_onnx(model, work_dir / "model_fp32.onnx")}
    if "int8" in graphs:
        calibration = image_set(selection.calib_dir, selection.calibration_images, CALIBRATION_SEED)
        paths["int8"] = work_dir / "model_int8.onnx"
        onnx.save(make_cpu_int8_onnx(onnx.load(paths["fp32"]), calibration, selection.calibration_method), paths["int8"])
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
    calib_method: str = "percentile"
    aot_plugins: bool = True
    floors: dict = field(default_factory=dict)  # precision -> PrecisionFloor, overriding the defaults

    def __post_init__(self) -> None:
        unknown = set(self.precisions) - set(REDUCED_PRECISIONS)
        if unknown:
            raise ValueError(f"unknown precision(s) {sorted(unknown)}: choose from {REDUCED_PRECISIONS}")
        if self.calibration_images < 1 or self.evaluation_images < 2:
            raise ValueError("need >= 1 calibration image and >= 2 evaluation images")


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
    from engine_builder.plugin_rewrite import rewrite_to_plugins
    from engine_builder.precision import (
        DEFAULT_FLOORS,
        compare_with_fp32,
        embed_with_onnxruntime,
        enforce_floors,
        make_fp16_onnx,
        make_int8_onnx,
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
        graphs["int8"] = make_int8_onnx(fp32, calibration, method=settings.calib_method)

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
