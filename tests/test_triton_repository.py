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
