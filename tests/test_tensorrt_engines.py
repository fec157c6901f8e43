"""Real TensorRT engines, with and without the fused plugins, against ONNX Runtime FP32.
Needs TensorRT >= 10.9 and a GPU: skipped elsewhere (this project's CI and GPU machine have no TensorRT)."""
from __future__ import annotations

import pytest

from engine_builder.tensorrt_build import tensorrt_unavailable_reason

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]
UNAVAILABLE = tensorrt_unavailable_reason()


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"{UNAVAILABLE}")
def test_fp16_and_int8_engines_with_and_without_plugins_match_fp32(tmp_path):
    from engine_builder.build import PrecisionBuildSettings, build_precision_graphs
    from engine_builder.check_trt import check_engines
    from engine_builder.tensorrt_build import EngineBuildSettings
    from engine_builder.precision import DEFAULT_FLOORS

    graphs = build_precision_graphs("osnet_x1_0", tmp_path, settings=PrecisionBuildSettings(calibration_images=32, evaluation_images=32))
    checks = check_engines(graphs, tmp_path, batch_sizes=[1, 32], eval_dir=None, settings=EngineBuildSettings(max_batch_size=64))
    assert len(checks) == 4
    for check in checks:
        floor = DEFAULT_FLOORS[check.precision]
        assert check.mean_cosine >= floor.min_mean_cosine and check.min_cosine >= floor.min_cosine, check
        assert all(speed > 0 for speed in check.images_per_s.values())
