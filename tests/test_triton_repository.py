"""The repository osnet-build writes: layout and configs that parse with Triton's own schema."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from engine_builder.cli import build_parser
from engine_builder.cpu_runtimes import RUNTIMES
from engine_builder.triton_repository import MAX_DECODE_THREADS, CpuRepositorySettings, parse_config, served_tensor_model, write_cpu_models
from osnet_base.image_decoding import DEFAULT_BUDGETS

VARIANT = "osnet_x0_25"


def read_config(repository, model):
    return parse_config((repository / model / "config.pbtxt").read_text())


def test_repository_layout(served_repository, tensor_model):
    assert sorted(p.name for p in served_repository.iterdir()) == sorted(["osnet", "osnet_frames", "preprocess", tensor_model])
    assert (served_repository / tensor_model / "1" / "model.onnx").is_file()
    assert (served_repository / tensor_model / "1" / "model.py").is_file()
    assert (served_repository / "preprocess" / "1" / "model.py").is_file()
    assert (served_repository / "osnet" / "1").is_dir()


def test_tensor_model_config(served_repository, tensor_model):
    config = read_config(served_repository, tensor_model)
    assert config.backend == "python" and config.max_batch_size >= 64
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("INPUT", model_config_pb2.TYPE_UINT8, [256, 128, 3])]
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


def test_preprocess_carries_its_budgets_and_decodes_on_the_cores(served_repository):
    config = read_config(served_repository, "preprocess")
    parameters = {key: int(value.string_value) for key, value in config.parameters.items() if key != "EXECUTION_ENV_PATH"}
    instances, threads = CpuRepositorySettings().preprocess_layout()
    assert parameters == {"MAX_IMAGE_BYTES": DEFAULT_BUDGETS.max_image_bytes, "MAX_IMAGE_PIXELS": DEFAULT_BUDGETS.max_image_pixels,
                          "MAX_REQUEST_PIXELS": DEFAULT_BUDGETS.max_request_pixels, "DECODE_THREADS": threads}
    assert config.instance_group[0].count == instances
    assert config.input[0].data_type == model_config_pb2.TYPE_STRING
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("INPUT", model_config_pb2.TYPE_UINT8, [256, 128, 3])]
    assert {p.name for p in (served_repository / "preprocess" / "1").iterdir()} >= {"model.py", "contract.py", "image_decoding.py"}


def test_preprocess_layout_shares_the_cores_out():
    cores = len(os.sched_getaffinity(0))
    instances, threads = CpuRepositorySettings().preprocess_layout()
    assert instances * threads >= cores and threads <= max(MAX_DECODE_THREADS, 1) and instances == -(-cores // MAX_DECODE_THREADS)
    assert CpuRepositorySettings(preprocess_instances=3).preprocess_layout() == (3, max(1, -(-cores // 3)))
    assert CpuRepositorySettings(preprocess_instances=2, decode_threads=5).preprocess_layout() == (2, 5)


@pytest.mark.parametrize("bad", [{"max_batch_size": 0}, {"instances": 0}, {"intra_op_threads": 0}, {"max_image_bytes": 0},
                                 {"max_image_pixels": 10, "max_request_pixels": 5}, {"decode_threads": 0},
                                 {"preprocess_instances": 0}])
def test_settings_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        CpuRepositorySettings(**bad)


def test_openvino_config_carries_its_properties_and_the_batcher_its_preferred_sizes(tmp_path):
    settings = CpuRepositorySettings(intra_op_threads=2, streams=2, preferred_batch_sizes=(32,))
    name = write_cpu_models(tmp_path, VARIANT, settings, RUNTIMES["openvino-bf16"])
    config = parse_config((tmp_path / name / "config.pbtxt").read_text())
    assert name == "osnet_x0_25_bf16" and served_tensor_model(tmp_path) == name
    assert {k: v.string_value for k, v in config.parameters.items() if k != "EXECUTION_ENV_PATH"} == {
        "ENGINE": "openvino", "INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "2", "CHUNK": "2",
        "INFERENCE_NUM_THREADS": "2"}
    assert list(config.dynamic_batching.preferred_batch_size) == [32]
    assert {p.name for p in (tmp_path / name / "1").iterdir()} >= {"model.py", "cpu_sessions.py", "contract.py", "batched_responses.py"}


def test_a_new_choice_replaces_the_earlier_cpu_model_of_the_variant(tmp_path):
    write_cpu_models(tmp_path, VARIANT, CpuRepositorySettings(), RUNTIMES["onnxruntime-fp32"])
    other = write_cpu_models(tmp_path, "osnet_x1_0", CpuRepositorySettings(), RUNTIMES["onnxruntime-fp32"])
    write_cpu_models(tmp_path, VARIANT, CpuRepositorySettings(), RUNTIMES["openvino-int8"])
    assert not (tmp_path / "osnet_x0_25_fp32").exists() and (tmp_path / other).is_dir()
    assert served_tensor_model(tmp_path) == "osnet_x0_25_int8"


def test_several_instances_share_the_cores_out_unless_threads_are_given(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert CpuRepositorySettings().threads_per_instance() is None  # one instance: the runtime's own default
    assert CpuRepositorySettings(instances=2).threads_per_instance() == max(1, cores // 2)
    assert CpuRepositorySettings(instances=4 * cores).threads_per_instance() == 1
    assert CpuRepositorySettings(instances=2, intra_op_threads=3).threads_per_instance() == 3
    name = write_cpu_models(tmp_path, VARIANT, CpuRepositorySettings(instances=2), RUNTIMES["onnxruntime-fp32"])
    config = parse_config((tmp_path / name / "config.pbtxt").read_text())
    assert config.parameters["INTRA_OP_THREADS"].string_value == str(max(1, cores // 2))
    assert config.instance_group[0].count == 2


def test_python_env_defaults_to_the_building_venv_and_can_name_the_serving_one(tmp_path):
    import sys

    assert build_parser().parse_args([]).python_env == (Path(sys.prefix) if sys.prefix != sys.base_prefix else None)
    args = build_parser().parse_args(["--python-env", "/srv/osnet-venv"])
    name = write_cpu_models(tmp_path, VARIANT, CpuRepositorySettings(execution_env=args.python_env), RUNTIMES["onnxruntime-fp32"])
    for model in (name, "preprocess"):
        config = parse_config((tmp_path / model / "config.pbtxt").read_text())
        assert config.parameters["EXECUTION_ENV_PATH"].string_value == "/srv/osnet-venv"


@pytest.mark.parametrize("bad", [{"streams": 0}, {"preferred_batch_sizes": (0,)}, {"preferred_batch_sizes": (128,)}])
def test_cpu_settings_refuse_more_nonsense(bad):
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


def test_instances_reach_the_cpu_model_and_the_engines_and_preprocess_has_its_own(tmp_path):
    from engine_builder.cpu_runtimes import RUNTIMES
    from engine_builder.triton_repository import write_cpu_models

    settings = settings_from(["--instances", "2", "--preprocess-instances", "3", "--precision", "fp32", "fp16"])
    cpu_model = write_cpu_models(tmp_path / "repo", settings.variant, settings.cpu_repository(), RUNTIMES["onnxruntime-fp32"])
    served = write_gpu_build(tmp_path / "repo", settings)  # was: preprocess rewritten with 1 instance
    for model, count in (("preprocess", 3), (cpu_model, 2), (served, 2)):
        assert read_config(tmp_path / "repo", model).instance_group[0].count == count, model


def written_cpu_and_gpu_builds(tmp_path, settings):
    """A CPU build's repository and a GPU build's, both written for `settings`."""
    write_cpu_models(tmp_path / "cpu", settings.variant, settings.cpu_repository(), RUNTIMES["onnxruntime-fp32"])
    write_gpu_build(tmp_path / "gpu", settings)
    return tmp_path / "cpu", tmp_path / "gpu"


def test_preprocess_budgets_and_threads_reach_cpu_and_gpu_builds(tmp_path):
    settings = settings_from(["--max-image-bytes", "5000", "--max-image-pixels", "7000", "--max-request-pixels", "9000",
                              "--preprocess-instances", "2", "--decode-threads", "3", "--precision", "fp32", "fp16"])
    expected = {"MAX_IMAGE_BYTES": "5000", "MAX_IMAGE_PIXELS": "7000", "MAX_REQUEST_PIXELS": "9000", "DECODE_THREADS": "3"}
    for repository in written_cpu_and_gpu_builds(tmp_path, settings):
        config = read_config(repository, "preprocess")
        assert {k: v.string_value for k, v in config.parameters.items() if k in expected} == expected, repository.name
        assert config.instance_group[0].count == 2


def test_every_build_writes_osnet_frames_over_the_model_the_ensemble_runs(tmp_path):
    settings = settings_from(["--max-batch-size", "16", "--max-image-pixels", "7000", "--max-request-pixels", "9000",
                              "--precision", "fp32", "fp16"])
    for repository in written_cpu_and_gpu_builds(tmp_path, settings):
        config = read_config(repository, "osnet_frames")
        assert config.backend == "python" and config.max_batch_size == 0, repository.name
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
            ("FRAME", model_config_pb2.TYPE_STRING, [1]), ("BOXES", model_config_pb2.TYPE_FP32, [-1, 4])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("EMBEDDING", [-1, 512]), ("FEATURES", [-1, 512])]
        parameters = {k: v.string_value for k, v in config.parameters.items() if k != "EXECUTION_ENV_PATH"}
        assert parameters == {"TENSOR_MODEL": served_tensor_model(repository), "MAX_BOXES": "16", "MAX_IMAGE_PIXELS": "7000",
                              "MAX_REQUEST_PIXELS": "9000", "MAX_IMAGE_BYTES": str(DEFAULT_BUDGETS.max_image_bytes)}
        assert config.instance_group[0].count == CpuRepositorySettings().frames_instances() >= 2
        assert {p.name for p in (repository / "osnet_frames" / "1").iterdir()} >= {
            "model.py", "contract.py", "image_decoding.py", "frame_boxes.py"}


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
    (["--decode-threads", "0"], "decode threads must be >= 1"),
    (["--max-image-pixels", "200", "--max-request-pixels", "100"], "max_request_pixels (100) must hold at least one image"),
])
def test_a_setting_that_cannot_be_honoured_is_refused_before_any_work(tmp_path, capsys, argv, reason):
    from engine_builder.cli import main

    repository = tmp_path / "repo"
    assert main([*argv, "--repository", str(repository), "--work-dir", str(tmp_path / "work")]) == 1
    error = capsys.readouterr().err
    assert "osnet-build: error: cannot build:" in error and reason in error
    assert not repository.exists() and not (tmp_path / "work").exists()
