"""Real engines from the build's precision graphs, through whichever TensorRT is installed: TensorRT-RTX
in CI (it builds with no GPU), TensorRT on a GPU machine.

Built here: osnet_x0_25's FP32, FP16 and INT8 graphs with the dynamic-batch profile, the FP16 and INT8
ones with and without the fused plugins (registered as class-based IPluginV3, the code TensorRT uses
for JIT plugins too), each checked against the Triton config that serves it; and osnet_x1_0's plugin
graphs, with every plugin node resolved and counted. Deserializing (IEngineInspector) and executing
an engine need a GPU the library supports: those tests skip with the reason elsewhere."""
from __future__ import annotations

import pytest

from engine_builder.tensorrt_build import engine_build_unavailable_reason

pytestmark = pytest.mark.tensorrt
UNAVAILABLE = engine_build_unavailable_reason()
if UNAVAILABLE is not None:
    pytest.skip(f"no engine can be built here: {UNAVAILABLE}", allow_module_level=True)

from engine_builder.build import PrecisionBuildSettings, build_precision_graphs  # noqa: E402
from engine_builder.check_trt import check_engines, format_checks  # noqa: E402
from engine_builder.tensorrt_build import EngineBuildSettings, build, engine_run_unavailable_reason  # noqa: E402
from kernels.tensorrt_library import load_tensorrt  # noqa: E402

MAX_BATCH_SIZE = 64
# What the rewrite writes for every OSNet variant: 60 depthwise LiteConvs, the last one of each of the
# 24 streams also writing the channel sums, and 6 aggregation gates.
PLUGIN_LAYERS = {"DepthwiseLiteConv": 36, "DepthwiseLiteConvSums": 24, "AggregationGate": 6}
SMALL = PrecisionBuildSettings(calibration_images=16, evaluation_images=16, calib_method="minmax")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return build_precision_graphs("osnet_x0_25", tmp_path_factory.mktemp("graphs"), settings=SMALL)


@pytest.fixture(scope="module")
def report(graphs, tmp_path_factory):
    return check_engines(graphs, tmp_path_factory.mktemp("engines"), batch_sizes=[1, 32], eval_dir=None,
                         settings=EngineBuildSettings(max_batch_size=MAX_BATCH_SIZE))


def _checks(report):
    return {(check.precision, check.plugins): check for check in report.checks}


def test_every_precision_builds_an_engine_that_serves_as_the_config_declares(report):
    checks = _checks(report)
    assert set(checks) == {("fp32", False), ("fp16", True), ("fp16", False), ("int8", True), ("int8", False)}
    for check in checks.values():
        network = check.built.network
        assert check.built.plan.stat().st_size == check.built.plan_bytes > 0
        assert check.config_problems == [], check.config_problems
        # uint8 pixels in, as the CPU models take them: the graph normalises
        assert [(t.name, t.dtype, t.shape) for t in network.inputs] == [("INPUT", "uint8", (-1, 256, 128, 3))]
        assert network.profile["INPUT"] == ((1, 256, 128, 3), (32, 256, 128, 3), (MAX_BATCH_SIZE, 256, 128, 3))


def test_config_mismatches_name_what_differs(report):
    from engine_builder.tensorrt_build import config_mismatches
    from engine_builder.triton_repository import GpuRepositorySettings, tensorrt_model_config

    network = _checks(report)["fp16", True].built.network
    problems = config_mismatches(network, tensorrt_model_config("m", GpuRepositorySettings(max_batch_size=128)))
    assert len(problems) == 1 and "batch 1..64, the config serves 1..128" in problems[0]


def test_precision_comes_from_the_graph(report):
    checks = _checks(report)
    for precision, plugins in checks:
        layer_types = checks[precision, plugins].built.network.layer_types
        quantized = layer_types["QUANTIZE"] > 0 and layer_types["DEQUANTIZE"] > 0
        assert quantized == (precision == "int8"), (precision, plugins, layer_types)


def test_every_plugin_node_becomes_a_plugin_layer(report):
    for (precision, plugins), check in _checks(report).items():
        assert dict(check.built.network.plugin_layers) == (PLUGIN_LAYERS if plugins else {}), (precision, plugins)
        assert (check.built.plugins is not None) == plugins


def test_osnet_x1_0_plugin_graphs_build_with_every_fused_op(tmp_path):
    settings = PrecisionBuildSettings(calibration_images=8, evaluation_images=8, calib_method="minmax")
    graphs = build_precision_graphs("osnet_x1_0", tmp_path / "graphs", settings=settings)
    engine_settings = EngineBuildSettings(max_batch_size=MAX_BATCH_SIZE)
    for precision, graph in graphs.with_plugins.items():
        built = build(graph, tmp_path / f"{precision}.plan", engine_settings, plugins=True)
        assert dict(built.network.plugin_layers) == PLUGIN_LAYERS, precision
        assert sum(built.network.plugin_layers.values()) == built.network.layer_types["PLUGIN_V3"] == 66


def test_check_trt_says_what_built_and_what_ran_where(report):
    text = format_checks(report)
    library = load_tensorrt()
    rows = [line for line in text.splitlines() if line.startswith("| fp") or line.startswith("| int8")]
    assert len(rows) == 5 and all(library.label in row for row in rows)
    assert "AggregationGate 6, DepthwiseLiteConv 36, DepthwiseLiteConvSums 24" in text
    if report.not_run_reason:
        assert all("| not run |" in row for row in rows)
        assert f"not executed: {report.not_run_reason}" in text


RUN_UNAVAILABLE = engine_run_unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(RUN_UNAVAILABLE is not None, reason=f"{RUN_UNAVAILABLE}")
def test_engine_inspector_reads_back_what_was_built(report):
    for check in report.checks:
        engine, network = check.engine, check.built.network
        assert engine is not None and engine.source == "IEngineInspector"
        assert (engine.inputs, engine.outputs, engine.profile) == (network.inputs, network.outputs, network.profile)
        assert engine.plugin_layers == network.plugin_layers


@pytest.mark.gpu
@pytest.mark.skipif(RUN_UNAVAILABLE is not None, reason=f"{RUN_UNAVAILABLE}")
def test_fp16_and_int8_engines_with_and_without_plugins_match_fp32(report):
    from engine_builder.precision import DEFAULT_FLOORS

    for check in report.checks:
        floor = DEFAULT_FLOORS.get(check.precision, DEFAULT_FLOORS["fp16"])
        assert check.mean_cosine >= floor.min_mean_cosine and check.min_cosine >= floor.min_cosine, check
        assert all(speed > 0 for speed in check.images_per_s.values())
