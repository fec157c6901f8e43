"""NumPy references of the fused ops: they define the semantics the CUDA kernels implement.

Each op computes in float64 and rounds once to the input dtype, which is what a kernel with FP32
accumulation approximates; tests compare kernels and PyTorch modules against these with
`max_relative_error`. Works with NumPy 1.26 and 2.x.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
NUM_STREAMS = 4


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the error metric of the kernel acceptance thresholds.

    Normalised by the largest magnitude rather than element-wise, because post-ReLU tensors are full of
    exact zeros and tiny values where an element-wise relative error means nothing.
    """
    expected64 = np.asarray(expected, dtype=np.float64)
    diff = np.abs(np.asarray(actual, dtype=np.float64) - expected64)
    scale = float(np.max(np.abs(expected64))) if expected64.size else 0.0
    worst = float(np.max(diff)) if diff.size else 0.0
    return worst / scale if scale > 0.0 else worst


def fold_batchnorm(
    conv_weight: np.ndarray,
    bn_weight: np.ndarray | None,
    bn_bias: np.ndarray | None,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold eval-mode BatchNorm into a bias-free depthwise 3x3: returns (weight [C, 3, 3], bias [C]), FP32.

    bn(conv(x)) = conv(x) * s + (beta - mean * s) with s = gamma / sqrt(var + eps); a missing affine
    weight/bias (BatchNorm2d(affine=False)) means gamma = 1, beta = 0.
    """
    weight64 = np.asarray(conv_weight, dtype=np.float64)
    channels = weight64.shape[0]
    if weight64.size != channels * 9:
        raise ValueError(f"depthwise 3x3 weight must hold C * 9 values, got shape {weight64.shape}")
    gamma = np.ones(channels) if bn_weight is None else np.asarray(bn_weight, dtype=np.float64)
    beta = np.zeros(channels) if bn_bias is None else np.asarray(bn_bias, dtype=np.float64)
    scale = gamma / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    folded_weight = weight64.reshape(channels, 3, 3) * scale[:, None, None]
    folded_bias = beta - np.asarray(running_mean, dtype=np.float64) * scale
    return folded_weight.astype(np.float32), folded_bias.astype(np.float32)


def _check_activation(x: np.ndarray, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be NCHW (4-d), got shape {x.shape}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32 or float16, got {x.dtype}")


def depthwise_liteconv(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, *, with_sums: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """y = relu(depthwise_conv3x3(x, weight, stride 1, pad 1) + bias), in x's dtype.

    weight: [C, 3, 3] (or [C, 9] / [C, 1, 3, 3]) with BatchNorm already folded in; bias: [C].
    With `with_sums`, also returns y.sum over H x W per (n, c) in FP32, summed from the rounded y:
    exactly what `depthwise_liteconv_sums_*` writes for the aggregation gate.
    """
    _check_activation(x, "x")
    n, c, h, w = x.shape
    weight64 = np.asarray(weight, dtype=np.float64).reshape(c, 3, 3)
    bias64 = np.asarray(bias, dtype=np.float64).reshape(c)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = np.broadcast_to(bias64[None, :, None, None], (n, c, h, w)).copy()
    for dy in range(3):
        for dx in range(3):
            acc += weight64[None, :, dy, dx, None, None] * padded[:, :, dy : dy + h, dx : dx + w]
    y = np.maximum(acc, 0.0).astype(x.dtype)  # np.maximum propagates NaN, like torch.relu
    if not with_sums:
        return y
    sums = y.astype(np.float64).sum(axis=(2, 3)).astype(np.float32)
    return y, sums


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # exp(-log(1 + exp(-z))) never overflows, unlike 1 / (1 + exp(-z)) for very negative z.
    return np.exp(-np.logaddexp(0.0, -z))


def aggregation_gate(
    streams: Sequence[np.ndarray],
    fc1_weight: np.ndarray,
    fc1_bias: np.ndarray,
    fc2_weight: np.ndarray,
    fc2_bias: np.ndarray,
    *,
    stream_sums: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """y = sum_t x_t * sigmoid(fc2(relu(fc1(GAP(x_t))))), channel-wise, over OSNet's 4 streams.

    fc1_weight: [C/r, C] (or the Conv2d's [C/r, C, 1, 1]), fc2_weight: [C, C/r]. With `stream_sums`
    (4 arrays [N, C], the spatial sums the depthwise kernel writes), GAP = sums / (H * W) as in the
    CUDA kernel; otherwise GAP is computed from the streams.
    """
    if len(streams) != NUM_STREAMS:
        raise ValueError(f"the aggregation gate takes {NUM_STREAMS} streams, got {len(streams)}")
    for index, stream in enumerate(streams):
        _check_activation(stream, f"stream {index + 1}")
        if stream.shape != streams[0].shape or stream.dtype != streams[0].dtype:
            raise ValueError("all streams must share one shape and dtype")
    n, c, h, w = streams[0].shape
    w1 = np.asarray(fc1_weight, dtype=np.float64).reshape(-1, c)
    w2 = np.asarray(fc2_weight, dtype=np.float64).reshape(c, w1.shape[0])
    b1 = np.asarray(fc1_bias, dtype=np.float64).reshape(w1.shape[0])
    b2 = np.asarray(fc2_bias, dtype=np.float64).reshape(c)
    y = np.zeros((n, c, h, w), dtype=np.float64)
    for index, stream in enumerate(streams):
        x64 = stream.astype(np.float64)
        if stream_sums is None:
            pooled = x64.mean(axis=(2, 3))
        else:
            pooled = np.asarray(stream_sums[index], dtype=np.float64).reshape(n, c) / (h * w)
        hidden = np.maximum(pooled @ w1.T + b1, 0.0)
        gate = _sigmoid(hidden @ w2.T + b2)
        y += x64 * gate[:, :, None, None]
    return y.astype(streams[0].dtype)


FP32_UNIT_ROUNDOFF = 2.0**-24


def fp32_sum_tolerance(terms: int) -> float:
    """Relative error bound of summing `terms` non-negative FP32 values in FP32, in any order.

    Every term meets at most terms - 1 roundings of relative size <= 2^-24 on its way into the total
    (Higham, Accuracy and Stability of Numerical Algorithms, 4.2), whatever tree the additions form:
    the kernels' lane, butterfly and walker order included. Post-ReLU sums have no cancellation, so
    the bound holds relative to the sum itself and therefore relative to the largest sum.
    """
    steps = max(terms - 1, 1)
    return steps * FP32_UNIT_ROUNDOFF / (1 - steps * FP32_UNIT_ROUNDOFF)
