"""The aggregation gate on CPU: the NumPy reference against OSNet's ChannelGate as OSBlock uses it
(gate each of the four streams, add them), from pooled streams and from the producer's sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_builder.osnet import ChannelGate
from kernels import reference

DTYPES = [np.float32, np.float16]
GATE_SHAPES = [(1, 40, 17, 9), (3, 48, 5, 7), (1, 16, 1, 1), (2, 64, 16, 8)]


def _gate_in_torch(gate: ChannelGate, streams: list[np.ndarray]) -> np.ndarray:
    """What OSBlock does with its gate: gate each stream, add the four (float64)."""
    module = gate.double()
    with torch.no_grad():
        gated = [module(torch.from_numpy(s.astype(np.float64))) for s in streams]
        return (gated[0] + gated[1] + gated[2] + gated[3]).numpy()


def _streams(shape: tuple[int, int, int, int], dtype: type, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Post-ReLU activations, with per-channel scales so the gates differ between channels.
    scale = rng.uniform(0.2, 2.0, size=(1, shape[1], 1, 1))
    return [np.maximum(rng.standard_normal(shape) * scale, 0).astype(dtype) for _ in range(4)]


def _gate_params(gate: ChannelGate) -> tuple[np.ndarray, ...]:
    return tuple(p.detach().numpy() for p in (gate.fc1.weight, gate.fc1.bias, gate.fc2.weight, gate.fc2.bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gate_reference_matches_channel_gate(
    shape: tuple[int, int, int, int], dtype: type, make_channel_gate, kernel_tolerance
) -> None:
    gate = make_channel_gate(shape[1], seed=shape[1])
    streams = _streams(shape, dtype, seed=shape[2])

    y = reference.aggregation_gate(streams, *_gate_params(gate))

    assert y.dtype == streams[0].dtype and y.shape == shape
    assert reference.max_relative_error(y, _gate_in_torch(gate, streams)) <= kernel_tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_gate_reference_from_producer_sums(dtype: type, make_channel_gate, kernel_tolerance) -> None:
    """The kernel path: GAP from the sums the last depthwise launch of each stream writes."""
    shape = (2, 32, 7, 5)
    gate = make_channel_gate(32, seed=7)
    streams = _streams(shape, dtype, seed=9)
    sums = [s.astype(np.float64).sum(axis=(2, 3)).astype(np.float32) for s in streams]

    y = reference.aggregation_gate(streams, *_gate_params(gate), stream_sums=sums)

    assert reference.max_relative_error(y, _gate_in_torch(gate, streams)) <= kernel_tolerance(dtype)


def test_gate_reference_rejects_wrong_stream_count(make_channel_gate) -> None:
    streams = _streams((1, 16, 2, 2), np.float32, seed=0)
    with pytest.raises(ValueError, match="4 streams"):
        reference.aggregation_gate(streams[:3], *_gate_params(make_channel_gate(16, seed=0)))


def test_max_relative_error_is_normalised_by_the_largest_magnitude() -> None:
    assert reference.max_relative_error(np.array([1.0, 0.1]), np.array([2.0, 0.0])) == pytest.approx(0.5)
    assert reference.max_relative_error(np.zeros(3), np.zeros(3)) == 0.0
