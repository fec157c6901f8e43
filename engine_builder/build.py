"""Building a model repository: OSNet -> verified ONNX -> Triton models."""
from __future__ import annotations

import logging
from pathlib import Path

from engine_builder.export import export_onnx
from engine_builder.models import create_osnet
from engine_builder.triton_repository import CpuRepositorySettings, tensor_model_name, write_cpu_models

logger = logging.getLogger(__name__)


def build_cpu_repository(
    variant: str,
    repository: str | Path,
    weights: str | Path | None = None,
    settings: CpuRepositorySettings | None = None,
) -> Path:
    """Export `variant` (checked against PyTorch) and write preprocess, `<variant>_fp32` and the `osnet` ensemble."""
    repository = Path(repository)
    settings = settings or CpuRepositorySettings()
    model = create_osnet(variant, weights)
    export_onnx(model, repository / tensor_model_name(variant) / "1" / "model.onnx")
    write_cpu_models(repository, variant, settings)
    logger.info("repository %s ready: tritonserver --model-repository %s", repository, repository)
    return repository
