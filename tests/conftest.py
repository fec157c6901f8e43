"""Shared fixtures: one built CPU repository and one real tritonserver per test session.

The served model is the reference checkpoint (osnet_x0_25 trained on generated people), so
retrieval tests have embeddings that mean something; `served_model` is the same weights in PyTorch.
"""
from __future__ import annotations

import pytest

from osnet_base.triton_server import TritonServerConfig, TritonServerProcess
from engine_builder.reference_weights import REFERENCE_VARIANT, reference_weights

SERVED_VARIANT = REFERENCE_VARIANT


@pytest.fixture(scope="session")
def served_weights():
    return reference_weights()


@pytest.fixture(scope="session")
def served_repository(tmp_path_factory, served_weights):
    from engine_builder.build import build_cpu_repository
    from engine_builder.cpu_runtimes import BASELINE_RUNTIME, RuntimeSelection

    # An explicit runtime: what `auto` picks depends on timings, and the tests' answers must not.
    return build_cpu_repository(SERVED_VARIANT, tmp_path_factory.mktemp("triton_repo"), served_weights,
                                selection=RuntimeSelection(runtime=BASELINE_RUNTIME))


@pytest.fixture(scope="session")
def triton_server(served_repository):
    with TritonServerProcess(TritonServerConfig(model_repository=served_repository)) as server:
        yield server


@pytest.fixture(scope="session")
def served_model(served_weights):
    from engine_builder.models import create_osnet

    return create_osnet(SERVED_VARIANT, weights=served_weights)


@pytest.fixture(scope="session")
def tensor_model():
    from engine_builder.triton_repository import tensor_model_name

    return tensor_model_name(SERVED_VARIANT)
