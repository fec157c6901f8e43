"""`osnet-check-trt`: do the fused plugins earn their place, and what ran where?

Builds the FP32 engine and the FP16 and INT8 engines twice, with the plugins and plain (TensorRT's
own kernels on the unrewritten graph), and for each says which library built it, in how long, how
big the plan is, its layers and plugin layers, and whether its I/O and profile are what the
Triton config declares. Where this machine can execute the engines, it also compares every
engine's embeddings with FP32 ONNX Runtime on the same images and measures img/s per batch size
with the plugin/plain ratio; where it cannot (TensorRT-RTX on a CPU), it says why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine_builder.build import PrecisionGraphs
from engine_builder.image_sets import EVALUATION_SEED, image_set
from engine_builder.tensorrt_build import (
    BuiltEngine,
    EngineBuildSettings,
    EngineDescription,
    EngineRunner,
    build,
    config_mismatches,
    engine_run_unavailable_reason,
)
from engine_builder.triton_repository import GpuRepositorySettings, tensorrt_model_config
from osnet_base.contract import EMBEDDING_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineCheck:
    precision: str
    plugins: bool
    built: BuiltEngine
    config_problems: list[str]  # how the built engine differs from the Triton config (empty: as declared)
    ran_on: str | None = None  # the GPU that executed it; None when nothing ran
    engine: EngineDescription | None = None  # what IEngineInspector read from the deserialized engine
    mean_cosine: float | None = None
    min_cosine: float | None = None
    images_per_s: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckReport:
    checks: list[EngineCheck]
    not_run_reason: str | None  # why no engine was executed here


def check_engines(
    graphs: PrecisionGraphs, work_dir: Path, batch_sizes: list[int], eval_dir: Path | None, settings: EngineBuildSettings
) -> CheckReport:
    from engine_builder.precision import embed_with_onnxruntime

    import onnx

    config = tensorrt_model_config("check", GpuRepositorySettings(max_batch_size=settings.max_batch_size))
    not_run = engine_run_unavailable_reason()
    if not_run is None:
        import cupy

        images = image_set(eval_dir, 64, EVALUATION_SEED)
        reference = embed_with_onnxruntime(onnx.load(graphs.fp32), images)
        gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    builds = [("fp32", False, graphs.fp32)]
    for precision in graphs.with_plugins:
        builds += [(precision, True, graphs.with_plugins[precision]), (precision, False, graphs.plugin_free[precision])]
    checks = []
    for precision, plugins, graph in builds:
        built = build(graph, work_dir / f"check_{precision}_{'plugins' if plugins else 'plain'}.plan", settings, plugins)
        check = EngineCheck(precision, plugins, built, config_mismatches(built.network, config))
        if not_run is None:
            runner = EngineRunner(built.plan, built.plugins)
            embeddings = np.concatenate([runner.run(images[i : i + 16])[EMBEDDING_NAME] for i in range(0, len(images), 16)])
            cosines = np.sum(embeddings * reference, axis=1) / np.linalg.norm(embeddings, axis=1)
            speed = {batch: runner.images_per_second(batch) for batch in batch_sizes if batch <= settings.max_batch_size}
            check = replace(check, ran_on=gpu, engine=runner.description, mean_cosine=float(cosines.mean()),
                            min_cosine=float(cosines.min()), images_per_s=speed)
        checks.append(check)
    return CheckReport(checks, not_run)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_checks(report: CheckReport) -> str:
    checks = report.checks
    batches = sorted({b for check in checks for b in check.images_per_s})
    header = ("| precision | kernels | built with | build s | plan MB | layers | plugin layers | as the config declares | "
              "ran on | mean cosine vs FP32 | min cosine | " + "".join(f"img/s @{b} | " for b in batches))
    lines = [header.rstrip(), "|" + " --- |" * (11 + len(batches))]
    for check in checks:
        built = check.built
        plugin_layers = ", ".join(f"{name} {count}" for name, count in sorted(built.network.plugin_layers.items())) or "-"
        speeds = "".join(f" {check.images_per_s[b]:.0f} |" for b in batches)
        lines.append(
            f"| {check.precision} | {'fused plugins' if check.plugins else 'plain TensorRT'} | {built.library} | "
            f"{built.seconds:.1f} | {built.plan_bytes / 1e6:.1f} | {built.network.layers} | {plugin_layers} | "
            f"{'yes' if not check.config_problems else '; '.join(check.config_problems)} | {check.ran_on or 'not run'} | "
            f"{_fmt(check.mean_cosine, '.6f')} | {_fmt(check.min_cosine, '.6f')} |{speeds}")
    ran = {(c.precision, c.plugins): c for c in checks if c.images_per_s}
    for (precision, plugins), fused in ran.items():
        base = ran.get((precision, False))
        if plugins and base is not None:
            ratios = ", ".join(f"@{b}: {fused.images_per_s[b] / base.images_per_s[b]:.2f}x" for b in batches)
            lines.append(f"\n{precision}: plugin / plain speed {ratios}")
    if report.not_run_reason:
        lines.append(f"\nBuilt and inspected (from the network each engine was built from) only; not executed: "
                     f"{report.not_run_reason}.")
    return "\n".join(lines)
