"""Everything around TensorRT that runs without it: the plugin registration's generated signatures
and AOT launch arithmetic, the tensorrt_plan config, and the CLI's behaviour where TensorRT is absent."""
from __future__ import annotations

import enum
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from engine_builder.cli import check_trt_main, main
from engine_builder.tensorrt_build import engine_build_unavailable_reason, tensorrt_unavailable_reason
from engine_builder.triton_repository import GpuRepositorySettings, parse_config, render_config, tensorrt_model_config
from kernels import launch, tensorrt_plugins
from kernels.plugin_specs import AGGREGATION_GATE, DEPTHWISE_LITECONV, DEPTHWISE_LITECONV_SUMS, PLUGINS


def test_every_spec_has_a_kernel_for_both_dtypes():
    for spec in PLUGINS.values():
        for dtype in ("float32", "float16"):
            entry = (launch.gate_entry_point(dtype) if spec is AGGREGATION_GATE
                     else launch.depthwise_entry_point(dtype, with_sums=spec is DEPTHWISE_LITECONV_SUMS))
            assert entry in launch.ENTRY_POINTS


def test_generated_signatures_follow_tensorrt_plugin_schemas():
    names = [t.name for t in AGGREGATION_GATE.inputs]
    signature = tensorrt_plugins._signature(names, object, [("outputs", tuple), ("stream", int), ("tactic", int)], None)
    wrapped = tensorrt_plugins._with_signature(lambda **kw: sorted(kw), signature)
    assert list(inspect.signature(wrapped).parameters) == [*names, "outputs", "stream", "tactic"]
    assert wrapped(*range(len(names)), (), 0, 1) == sorted([*names, "outputs", "stream", "tactic"])


def test_output_shapes_and_types_follow_the_spec():
    assert DEPTHWISE_LITECONV.output_shapes([[8, 64, 64, 32], [64, 9], [64]]) == [[8, 64, 64, 32]]
    assert DEPTHWISE_LITECONV_SUMS.output_shapes([[8, 64, 64, 32]]) == [[8, 64, 64, 32], [8, 64]]
    assert DEPTHWISE_LITECONV_SUMS.output_dtypes("float16") == ["float16", "float32"]


class _DataType(enum.IntEnum):
    """TensorRT numbers its types from FLOAT = 0: a rule that tests a type's truthiness breaks on it."""

    FLOAT = 0
    HALF = 1


def test_sums_stay_fp32_whatever_the_type_tokens_truthiness():
    assert not _DataType.FLOAT  # what `kinds[kind] or first.dtype` once relied on being truthy
    assert DEPTHWISE_LITECONV_SUMS.output_dtypes(_DataType.HALF, float32=_DataType.FLOAT) == [_DataType.HALF, _DataType.FLOAT]
    assert AGGREGATION_GATE.output_dtypes(_DataType.HALF, float32=_DataType.FLOAT) == [_DataType.HALF]


def _format_rules():
    return SimpleNamespace(TensorFormat=SimpleNamespace(LINEAR="linear", CHW32="chw32"), DataType=_DataType)


def test_plugin_formats_are_nchw_with_one_activation_type_and_fp32_weights_and_sums():
    trt = _format_rules()
    spec = AGGREGATION_GATE  # x1..x4, sums1..4, fc1_weight, fc1_bias, fc2_weight, fc2_bias -> y
    half, fp32 = _DataType.HALF, _DataType.FLOAT
    types = [half] * 4 + [fp32] * 8 + [half]
    linear = ["linear"] * len(types)
    assert all(tensorrt_plugins.supports_format(spec, pos, types, linear, trt) for pos in range(len(types)))
    assert not tensorrt_plugins.supports_format(spec, 0, types, ["chw32", *linear[1:]], trt)
    assert not tensorrt_plugins.supports_format(spec, 4, types[:4] + [half], linear, trt)  # FP16 sums
    assert not tensorrt_plugins.supports_format(spec, 1, [half, fp32], linear, trt)  # mixed activation types


class _Dim(int):
    def constant_value(self) -> int:
        return int(self)


def _fake_trt():
    trt = SimpleNamespace(float16="half", float32="float")
    trtp = SimpleNamespace(
        KernelLaunchParams=lambda: SimpleNamespace(),
        SymIntExprs=lambda count: [None] * count,
        SymInt32=lambda value: value,
        cdiv=lambda a, b: -(-a // b),
    )
    return trt, trtp


@pytest.mark.parametrize("tactic", sorted(tensorrt_plugins.TACTIC_BATCH))
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_aot_launch_matches_the_kernel_contract_for_any_batch(monkeypatch, tactic, batch):
    monkeypatch.setattr(tensorrt_plugins, "aot_ptx", lambda source: f"ptx of {source}")
    trt, trtp = _fake_trt()
    x = SimpleNamespace(shape_expr=[batch, _Dim(64), _Dim(64), _Dim(32)], dtype="half")
    entry, ptx, params, extra = tensorrt_plugins.aot_kernel(DEPTHWISE_LITECONV_SUMS, [x, None, None], tactic, trt, trtp)
    plan = launch.plan_depthwise(tensorrt_plugins.TACTIC_BATCH[tactic], 64, 64, 32)
    assert entry == "depthwise_liteconv_sums_f16" and ptx == "ptx of depthwise_liteconv.cu"
    assert params.grid_x == -(-batch * 64 // plan.planes_per_cta) and params.block_x == plan.block
    assert extra == [batch, 64, 64, 32, *plan.tiling_args]

    weights = [None] * 8 + [SimpleNamespace(shape_expr=[_Dim(4), _Dim(64)])] + [None] * 3
    entry, _, params, extra = tensorrt_plugins.aot_kernel(AGGREGATION_GATE, [x, *weights[1:]], tactic, trt, trtp)
    gate = launch.plan_gate(tensorrt_plugins.TACTIC_BATCH[tactic], 64, 4, 64, 32)
    assert entry == "aggregation_gate_f16"
    assert params.grid_x == batch * -(-64 // gate.channels_per_cta)
    assert extra == [batch, 64, 4, 64, 32, gate.channels_per_cta]


def test_tensorrt_plan_config_serves_the_cpu_models_io():
    config = parse_config(render_config(tensorrt_model_config("osnet_x1_0_fp16", GpuRepositorySettings(max_batch_size=128, instances=2))))
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 128
    assert [i.name for i in config.input] == ["INPUT"] and [o.name for o in config.output] == ["EMBEDDING", "FEATURES"]
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU and config.instance_group[0].count == 2
    assert config.optimization.cuda.graphs and config.HasField("dynamic_batching")


def test_engines_sit_beside_the_cpu_model_and_the_ensemble_runs_int8(tmp_path):
    from engine_builder.cpu_runtimes import RUNTIMES
    from engine_builder.triton_repository import CpuRepositorySettings, served_tensor_model, write_cpu_models, write_tensorrt_models

    cpu_model = write_cpu_models(tmp_path, "osnet_x1_0", CpuRepositorySettings(), RUNTIMES["openvino-int8"])
    cpu_config = (tmp_path / cpu_model / "config.pbtxt").read_text()
    plans = {}
    for precision in ("fp16", "int8"):
        plans[precision] = tmp_path / f"{precision}.plan"
        plans[precision].write_bytes(precision.encode())
    served = write_tensorrt_models(tmp_path, "osnet_x1_0", plans, GpuRepositorySettings(max_batch_size=32),
                                   preprocess=CpuRepositorySettings(max_batch_size=32, preprocess_instances=2), jit_plugins=False)
    assert served == "osnet_x1_0_trt_int8" == served_tensor_model(tmp_path)
    assert (tmp_path / "osnet_x1_0_trt_fp16" / "1" / "model.plan").read_bytes() == b"fp16"
    assert parse_config((tmp_path / served / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    assert (tmp_path / cpu_model / "config.pbtxt").read_text() == cpu_config  # osnet_x1_0_int8, on the CPU, untouched
    # the preprocess settings reach a GPU build's preprocess too
    assert parse_config((tmp_path / "preprocess" / "config.pbtxt").read_text()).instance_group[0].count == 2
    ensemble = parse_config((tmp_path / "osnet" / "config.pbtxt").read_text())
    assert ensemble.max_batch_size == 32 and (tmp_path / "preprocess" / "1" / "model.py").is_file()
    serving_env = Path("/opt/osnet-serving-venv")  # where the python backend finds its packages on the serving machine
    only_fp16 = write_tensorrt_models(tmp_path / "gpu_only", "osnet_x1_0", {"fp16": plans["fp16"]},
                                      GpuRepositorySettings(execution_env=serving_env),
                                      preprocess=CpuRepositorySettings(execution_env=serving_env), jit_plugins=True)
    assert only_fp16 == served_tensor_model(tmp_path / "gpu_only") == "osnet_x1_0_trt_fp16"
    for model in (only_fp16, "preprocess"):
        config = parse_config((tmp_path / "gpu_only" / model / "config.pbtxt").read_text())
        assert config.parameters["EXECUTION_ENV_PATH"].string_value == str(serving_env)
    with pytest.raises(ValueError, match="fp16 and/or int8"):
        write_tensorrt_models(tmp_path, "osnet_x1_0", {"fp32": plans["fp16"]}, GpuRepositorySettings(),
                              preprocess=CpuRepositorySettings(), jit_plugins=False)


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT is installed here: the engine step runs instead")
def test_without_tensorrt_the_build_writes_graphs_and_says_why_no_engine(tmp_path, capsys):
    """TensorRT-RTX (installed in CI) builds engines, but not ones Triton serves: osnet-build writes none."""
    assert main(["--variant", "osnet_x0_25", "--precision", "fp16", "--work-dir", str(tmp_path / "work"),
                 "--repository", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "work" / "model_fp16_plugins.onnx").is_file()
    assert (tmp_path / "work" / "precision_report.md").is_file()
    assert "engines not built: TensorRT is not installed" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


@pytest.mark.skipif(engine_build_unavailable_reason() is None, reason="an engine can be built here: check-trt runs instead")
def test_check_trt_without_any_tensorrt_says_what_it_needs(capsys):
    assert check_trt_main(["--variant", "osnet_x0_25"]) == 1
    assert "check-trt needs TensorRT and a GPU, or TensorRT-RTX" in capsys.readouterr().err
