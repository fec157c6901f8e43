"""The repository osnet-build writes: layout and configs that parse with Triton's own schema."""
from __future__ import annotations

import pytest
from tritonclient.grpc import model_config_pb2

from engine_builder.triton_repository import CpuRepositorySettings, parse_config


def read_config(repository, model):
    return parse_config((repository / model / "config.pbtxt").read_text())


def test_repository_layout(served_repository, tensor_model):
    assert sorted(p.name for p in served_repository.iterdir()) == sorted(["osnet", "preprocess", tensor_model])
    assert (served_repository / tensor_model / "1" / "model.onnx").is_file()
    assert (served_repository / tensor_model / "1" / "model.py").is_file()
    assert (served_repository / "preprocess" / "1" / "model.py").is_file()
    assert (served_repository / "osnet" / "1").is_dir()


def test_tensor_model_config(served_repository, tensor_model):
    config = read_config(served_repository, tensor_model)
    assert config.backend == "python" and config.max_batch_size >= 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("INPUT", [3, 256, 128])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("EMBEDDING", [512]), ("FEATURES", [512])]
    assert config.HasField("dynamic_batching")
    assert config.parameters["EXECUTION_ENV_PATH"].string_value  # the venv with ONNX Runtime and NumPy < 2


def test_ensemble_wires_image_to_embedding(served_repository, tensor_model):
    config = read_config(served_repository, "osnet")
    assert config.platform == "ensemble"
    steps = config.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocess", tensor_model]
    assert steps[0].output_map["INPUT"] == steps[1].input_map["INPUT"]
    assert dict(steps[1].output_map) == {"EMBEDDING": "EMBEDDING", "FEATURES": "FEATURES"}


def test_preprocess_limits_image_size(served_repository):
    config = read_config(served_repository, "preprocess")
    assert int(config.parameters["MAX_IMAGE_PIXELS"].string_value) == 16_000_000
    assert config.input[0].data_type == model_config_pb2.TYPE_STRING


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"instances": 0}, {"intra_op_threads": 0}])
def test_settings_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        CpuRepositorySettings(**bad)


# One settings object per build: every model it writes follows it, and what it cannot honour is
# refused before any work.

def settings_from(argv):
    from engine_builder.cli import build_parser, build_settings

    return build_settings(build_parser().parse_args(argv))


def write_gpu_build(repository, settings):
    """What `osnet-build` writes for `settings` once TensorRT built its plans (stand-in plan files here)."""
    from engine_builder.triton_repository import write_tensorrt_models

    plans = {}
    for precision in settings.reduced_precisions:
        plans[precision] = repository.parent / f"{precision}.plan"
        plans[precision].write_bytes(precision.encode())
    return write_tensorrt_models(repository, settings.variant, plans, settings.gpu_repository(),
                                 preprocess=settings.cpu_repository(), jit_plugins=settings.jit_plugins)


def test_max_batch_size_16_reaches_the_engine_profile_and_every_config(tmp_path):
    settings = settings_from(["--max-batch-size", "16", "--precision", "fp16"])
    engine = settings.engine_build()  # was: ValueError, the opt batch was fixed at 32
    assert (engine.max_batch_size, engine.opt_batch_size) == (16, 16)
    assert settings.runtime_selection().batch_size >= 16  # measured at min(this, 16): see test_cpu_runtimes
    served = write_gpu_build(tmp_path / "repo", settings)
    for model in ("preprocess", "osnet", served):
        assert read_config(tmp_path / "repo", model).max_batch_size == 16, model


def test_instances_reach_preprocess_the_cpu_model_and_the_engines(tmp_path):
    from engine_builder.cpu_runtimes import RUNTIMES
    from engine_builder.triton_repository import write_cpu_models

    settings = settings_from(["--instances", "2", "--precision", "fp32", "fp16"])
    cpu_model = write_cpu_models(tmp_path / "repo", settings.variant, settings.cpu_repository(), RUNTIMES["onnxruntime-fp32"])
    served = write_gpu_build(tmp_path / "repo", settings)  # was: preprocess rewritten with 1 instance
    for model in ("preprocess", cpu_model, served):
        assert read_config(tmp_path / "repo", model).instance_group[0].count == 2, model


def test_calib_method_reaches_both_int8_graphs():
    settings = settings_from(["--calib-method", "entropy", "--precision", "fp32", "int8"])
    assert settings.runtime_selection().calibration_method == "entropy"
    assert settings.precision_build().calib_method == "entropy"
    unset = settings_from([])
    assert (unset.runtime_selection().calibration_method, unset.precision_build().calib_method) == ("minmax", "percentile")


@pytest.mark.parametrize("argv, reason", [
    (["--instances", "0"], "instances must be >= 1"),
    (["--max-batch-size", "0"], "max batch size must be >= 1"),
    (["--intra-op-threads", "0"], "intra-op threads must be >= 1"),
    (["--jit-plugins"], "--jit-plugins shapes TensorRT engines only"),
    (["--floor", "int8=0.9,0.8,0.7"], "int8"),
    (["--calib-dir", "/nonexistent/crops"], "calibration image folder /nonexistent/crops does not exist"),
    (["--weights", "/nonexistent/w.pth"], "checkpoint /nonexistent/w.pth does not exist"),
    (["--python-env", "/nonexistent/venv"], "is not a folder"),
])
def test_a_setting_that_cannot_be_honoured_is_refused_before_any_work(tmp_path, capsys, argv, reason):
    from engine_builder.cli import main

    repository = tmp_path / "repo"
    assert main([*argv, "--repository", str(repository), "--work-dir", str(tmp_path / "work")]) == 1
    error = capsys.readouterr().err
    assert "osnet-build: error: cannot build:" in error and reason in error
    assert not repository.exists() and not (tmp_path / "work").exists()
