"""Shared fixtures: one built CPU repository and one real tritonserver per test session."""
from __future__ import annotations

import pytest

from client.triton_server import TritonServerConfig, TritonServerProcess

SERVED_VARIANT = "osnet_x1_0"


@pytest.fixture(scope="session")
def served_repository(tmp_path_factory):
    from engine_builder.build import build_cpu_repository

    return build_cpu_repository(SERVED_VARIANT, tmp_path_factory.mktemp("triton_repo"))


@pytest.fixture(scope="session")
def triton_server(served_repository):
    with TritonServerProcess(TritonServerConfig(model_repository=served_repository)) as server:
        yield server


@pytest.fixture(scope="session")
def served_model():
    from engine_builder.models import create_osnet

    return create_osnet(SERVED_VARIANT)


@pytest.fixture(scope="session")
def tensor_model():
    from engine_builder.triton_repository import tensor_model_name

    return tensor_model_name(SERVED_VARIANT)
