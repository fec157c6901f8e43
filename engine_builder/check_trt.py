"""`osnet-check-trt`: do the fused plugins earn their place on this GPU?

Builds FP16 and INT8 engines twice, with the plugins and plain (TensorRT's own kernels on the
unrewritten graph), compares every engine's embeddings with FP32 ONNX Runtime on the same images,
and measures img/s per batch size with the plugin/plain ratio.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine_builder.build import PrecisionGraphs
from osnet_base.contract import EMBEDDING_NAME
from engine_builder.image_sets import EVALUATION_SEED, image_set
from engine_builder.tensorrt_build import EngineBuildSettings, EngineRunner, build_engine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineCheck:
    precision: str
    plugins: bool
    mean_cosine: float
    min_cosine: float
    images_per_s: dict[int, float]


def check_engines(
    graphs: PrecisionGraphs, work_dir: Path, batch_sizes: list[int], eval_dir: Path | None, settings: EngineBuildSettings
) -> list[EngineCheck]:
    from engine_builder.precision import embed_with_onnxruntime

    import onnx

    images = image_set(eval_dir, 64, EVALUATION_SEED)
    reference = embed_with_onnxruntime(onnx.load(graphs.fp32), images)
    checks = []
    for precision in graphs.with_plugins:
        for plugins, graph in ((True, graphs.with_plugins[precision]), (False, graphs.plugin_free[precision])):
            plan = build_engine(graph, work_dir / f"check_{precision}_{'plugins' if plugins else 'plain'}.plan", settings, plugins)
            runner = EngineRunner(plan, plugins)
            embeddings = np.concatenate([runner.run(images[i : i + 16])[EMBEDDING_NAME] for i in range(0, len(images), 16)])
            cosines = np.sum(embeddings * reference, axis=1) / np.linalg.norm(embeddings, axis=1)
            speed = {batch: runner.images_per_second(batch) for batch in batch_sizes if batch <= settings.max_batch_size}
            checks.append(EngineCheck(precision, plugins, float(cosines.mean()), float(cosines.min()), speed))
    return checks


def format_checks(checks: list[EngineCheck]) -> str:
    batches = sorted({b for check in checks for b in check.images_per_s})
    header = "| precision | kernels | mean cosine vs FP32 | min cosine | " + " | ".join(f"img/s @{b}" for b in batches) + " |"
    lines = [header, "|" + " --- |" * (4 + len(batches))]
    plain = {check.precision: check for check in checks if not check.plugins}
    for check in checks:
        speeds = " | ".join(f"{check.images_per_s[b]:.0f}" for b in batches)
        lines.append(f"| {check.precision} | {'fused plugins' if check.plugins else 'plain TensorRT'} | "
                     f"{check.mean_cosine:.6f} | {check.min_cosine:.6f} | {speeds} |")
    for precision, base in plain.items():
        fused = next(c for c in checks if c.precision == precision and c.plugins)
        ratios = ", ".join(f"@{b}: {fused.images_per_s[b] / base.images_per_s[b]:.2f}x" for b in batches)
        lines.append(f"\n{precision}: plugin / plain speed {ratios}")
    return "\n".join(lines)
