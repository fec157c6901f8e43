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


# ---------------------------------------------------------------------------------------------------
# Fused kernels: helpers the CPU kernel tests share, and the kernels compiled once per session.
# tests/test_kernels_gpu.py keeps its own copies: the GPU machine runs it with --noconftest.

KERNEL_TOLERANCE = {"float32": 1e-5, "float16": 2e-3}  # max relative error against a float64 reference


def randomise_batchnorm(module, generator) -> None:
    """Non-trivial eval statistics, so folding is really exercised (a fresh BatchNorm is the identity)."""
    import torch

    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            c = bn.num_features
            bn.weight.data = 0.5 + torch.rand(c, generator=generator)
            bn.bias.data = 0.1 * torch.randn(c, generator=generator)
            bn.running_mean.data = 0.1 * torch.randn(c, generator=generator)
            bn.running_var.data = 0.5 + torch.rand(c, generator=generator)


@pytest.fixture(scope="session")
def kernel_tolerance():
    """dtype -> the max relative error a kernel or reference may have against float64."""
    import numpy as np

    return lambda dtype: KERNEL_TOLERANCE[np.dtype(dtype).name]


@pytest.fixture(scope="session")
def batchnorm_randomiser():
    return randomise_batchnorm


@pytest.fixture(scope="session")
def make_lightconv():
    """(channels, seed) -> an eval-mode LightConv3x3 with random depthwise weights and BatchNorm statistics."""
    import torch

    from engine_builder.osnet import LightConv3x3

    def make(channels: int, seed: int) -> LightConv3x3:
        generator = torch.Generator().manual_seed(seed)
        lite = LightConv3x3(channels, channels).eval()
        lite.conv2.weight.data = torch.randn(lite.conv2.weight.shape, generator=generator) / 3
        randomise_batchnorm(lite, generator)
        return lite

    return make


@pytest.fixture(scope="session")
def make_channel_gate():
    """(channels, seed) -> an eval-mode ChannelGate with random fc1/fc2."""
    import math

    import torch

    from engine_builder.osnet import ChannelGate

    def make(channels: int, seed: int) -> ChannelGate:
        generator = torch.Generator().manual_seed(seed)
        gate = ChannelGate(channels).eval()
        for conv in (gate.fc1, gate.fc2):
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) / math.sqrt(conv.weight.shape[1])
            conv.bias.data = 0.2 * torch.randn(conv.bias.shape, generator=generator)
        return gate

    return make


_compile_reports: list = []  # the nvcc report, kept for the summary at the end of the run


@pytest.fixture(scope="session")
def kernel_compile_report():
    """Every kernels/*.cu built once per session by nvcc (sm_80, sm_90 SASS, compute_90 PTX)."""
    import shutil

    from kernels import compile_check

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: cannot compile the CUDA kernels")
    report = compile_check.check(nvcc, compile_check.DEFAULT_ARCHS)
    _compile_reports.append(report)
    return report


def pytest_terminal_summary(terminalreporter):
    """The registers and spills of every kernel, as `make test` used to print them before the tests."""
    if _compile_reports:
        from kernels import compile_check

        terminalreporter.section("fused kernels: registers and spills (nvcc)")
        terminalreporter.write_line(compile_check.format_table(_compile_reports[0].kernels))
