"""The depthwise LiteConv on CPU: the NumPy reference against the PyTorch module it replaces, BatchNorm
folding, and a line-by-line emulation of depthwise_liteconv.cu (its work split, window walk, warp
shuffles, FP32 fmaf chain and fixed-order sums) that checks coverage, halos and the sums tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_builder.osnet import LightConv3x3
from kernels import launch, reference, sanitize_run

DTYPES = [np.float32, np.float16]
# (N, C, H, W): odd H and W, C not a multiple of 32, N = 1, 1x1 planes, and OSNet's stage 2/4 planes.
DEPTHWISE_SHAPES = [(1, 35, 17, 9), (2, 20, 5, 33), (1, 3, 1, 1), (3, 16, 2, 7), (1, 64, 64, 32), (2, 128, 16, 8)]


def _depthwise_half_in_torch(lite: LightConv3x3, x: np.ndarray) -> np.ndarray:
    """The part of a Lite 3x3 the kernel replaces (conv2, bn, relu), run by PyTorch in float64."""
    module = lite.double()
    with torch.no_grad():
        return module.relu(module.bn(module.conv2(torch.from_numpy(x.astype(np.float64))))).numpy()


def _folded(lite: LightConv3x3) -> tuple[np.ndarray, np.ndarray]:
    bn = lite.bn
    return reference.fold_batchnorm(
        lite.conv2.weight.detach().numpy(),
        bn.weight.detach().numpy(),
        bn.bias.detach().numpy(),
        bn.running_mean.numpy(),
        bn.running_var.numpy(),
        bn.eps,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", DEPTHWISE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_depthwise_reference_matches_lightconv(
    shape: tuple[int, int, int, int], dtype: type, make_lightconv, kernel_tolerance
) -> None:
    n, c, h, w = shape
    lite = make_lightconv(c, seed=c + h)
    x = np.random.default_rng(h * w).standard_normal(shape).astype(dtype)
    weight, bias = _folded(lite)

    y = reference.depthwise_liteconv(x, weight, bias)

    assert y.dtype == x.dtype and y.shape == x.shape
    expected = _depthwise_half_in_torch(lite, x)
    assert reference.max_relative_error(y, expected) <= kernel_tolerance(dtype)
    assert (y >= 0).all() and (y == 0).any() and (y > 0).any()  # ReLU really clips something


def test_depthwise_reference_matches_pytorch_fp32_arithmetic(make_lightconv, kernel_tolerance) -> None:
    """Against the module in plain FP32 (not float64): what the FP32 kernel is compared with on GPU."""
    lite = make_lightconv(24, seed=3)
    x = np.random.default_rng(0).standard_normal((2, 24, 13, 11)).astype(np.float32)
    with torch.no_grad():
        expected = lite.relu(lite.bn(lite.conv2(torch.from_numpy(x)))).numpy()
    y = reference.depthwise_liteconv(x, *_folded(lite))
    assert reference.max_relative_error(y, expected) <= kernel_tolerance(np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_depthwise_sums_are_the_spatial_sums_of_the_output(dtype: type) -> None:
    x = np.random.default_rng(1).standard_normal((2, 5, 9, 7)).astype(dtype)
    weight = np.random.default_rng(2).standard_normal((5, 3, 3)).astype(np.float32)
    bias = np.linspace(-0.5, 0.5, 5, dtype=np.float32)

    y, sums = reference.depthwise_liteconv(x, weight, bias, with_sums=True)

    assert sums.dtype == np.float32 and sums.shape == (2, 5)
    np.testing.assert_allclose(sums, y.astype(np.float64).sum(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(y, reference.depthwise_liteconv(x, weight, bias))


def test_fold_batchnorm_without_affine_parameters() -> None:
    weight = np.ones((2, 1, 3, 3), dtype=np.float32)
    folded_weight, folded_bias = reference.fold_batchnorm(
        weight, None, None, np.array([1.0, 2.0]), np.array([3.0, 0.0]), 1.0
    )
    np.testing.assert_allclose(folded_weight[:, 0, 0], [0.5, 1.0])
    np.testing.assert_allclose(folded_bias, [-0.5, -2.0])


# ---------------------------------------------------------------------------------------------------
# Emulation of depthwise_liteconv.cu: the same per-lane index arithmetic, window walk, warp shuffles
# (width = lanes_per_row), FP32 fmaf chain in the kernel's tap order, FP16 rounding to nearest even,
# and FP32 sums in the kernel's order (each lane's outputs in turn, the walker's butterfly, the
# walkers of a plane in a fixed order). Checks that a plan's grid covers every output exactly once,
# that halos and band edges are right, and what the sums can be compared with.


def _fmaf(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """FP32 fused multiply-add: the float64 product of two FP32 values is exact, then one rounding to
    FP32 (a float64 rounding of the sum comes first, which differs from a single rounding only when
    it lands exactly on an FP32 halfway point)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _emulate_depthwise(
    x: np.ndarray, weight9: np.ndarray, bias: np.ndarray, plan: launch.DepthwiseLaunch
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, c, h, w = x.shape
    strip, rows_per_step = launch.STRIP, launch.ROWS_PER_STEP
    g, bands, ppc = plan.lanes_per_row, plan.bands_per_plane, plan.planes_per_cta
    chunks = -(-w // (g * strip))
    units = chunks * bands
    planes = n * c
    band_rows = -(-h // bands)
    xf = x.reshape(planes, h, w).astype(np.float32)
    weight9 = weight9.astype(np.float32)
    bias = bias.astype(np.float32)
    y = np.zeros((planes, h, w), dtype=x.dtype)
    writes = np.zeros((planes, h, w), dtype=np.int64)
    sums = np.full(planes, np.nan, dtype=np.float32)
    lanes = np.arange(32)
    sub = lanes & (g - 1)
    for cta in range(plan.grid):
        walker_sums: dict[int, np.float32] = {}
        for warp in range(plan.block // 32):
            walker = warp * (32 // g) + lanes // g
            plane_local = walker // units
            unit = walker - plane_local * units
            chunk, band = unit // bands, unit % bands
            plane = cta * ppc + plane_local
            active = (plane_local < ppc) & (plane < planes)
            row_begin = band * band_rows
            row_end = np.minimum(h, row_begin + band_rows)
            col0 = chunk * g * strip + sub * strip
            cols = np.where(active, np.clip(w - col0, 0, strip), 0)
            channel = np.where(active, plane % c, 0)
            up = np.zeros((32, strip + 2), dtype=np.float32)
            mid = np.zeros_like(up)
            lane_sum = np.zeros(32, dtype=np.float32)
            steps = -(-(band_rows + 2) // rows_per_step)
            for step in range(steps):
                for k in range(rows_per_step):
                    q = row_begin - 1 + step * rows_per_step + k
                    load_ok = (q >= 0) & (q < h) & (q <= row_end)
                    low = np.zeros((32, strip + 2), dtype=np.float32)
                    for lane in np.flatnonzero(load_ok & (cols > 0)):
                        low[lane, 1 : 1 + cols[lane]] = xf[plane[lane], q[lane], col0[lane] : col0[lane] + cols[lane]]
                    left = np.where(sub > 0, low[lanes - 1, strip], low[:, strip])  # __shfl_up_sync(.., 1, g)
                    right = np.where(sub < g - 1, low[(lanes + 1) % 32, 1], low[:, 1])  # __shfl_down_sync(.., 1, g)
                    row_ok = active & load_ok
                    for lane in range(32):
                        if sub[lane] == 0:
                            left[lane] = (
                                xf[plane[lane], q[lane], col0[lane] - 1] if row_ok[lane] and col0[lane] > 0 else 0
                            )
                        if sub[lane] == g - 1:
                            inside = row_ok[lane] and col0[lane] + strip < w
                            right[lane] = xf[plane[lane], q[lane], col0[lane] + strip] if inside else 0
                    low[:, 0], low[:, strip + 1] = left, right
                    o = q - 1
                    for lane in np.flatnonzero((cols > 0) & (o >= row_begin) & (o < row_end)):
                        wk = weight9[channel[lane]]
                        acc = np.full(strip, bias[channel[lane]], dtype=np.float32)
                        for tap, row in enumerate((up[lane], mid[lane], low[lane])):  # wk[0..2] up, [3..5] mid, [6..8] low
                            for dx in range(3):
                                acc = _fmaf(np.full(strip, wk[3 * tap + dx]), row[dx : dx + strip], acc)
                        stored = np.where(acc < 0, np.float32(0), acc).astype(x.dtype)[: cols[lane]]
                        y[plane[lane], o[lane], col0[lane] : col0[lane] + cols[lane]] = stored
                        writes[plane[lane], o[lane], col0[lane] : col0[lane] + cols[lane]] += 1
                        for value in stored.astype(np.float32):
                            lane_sum[lane] = np.float32(lane_sum[lane] + value)
                    up, mid = mid, low
            offset = g // 2
            while offset > 0:
                lane_sum = lane_sum + lane_sum[lanes ^ offset]
                offset //= 2
            for lane in np.flatnonzero((sub == 0) & (plane_local < ppc)):
                walker_sums[int(walker[lane])] = lane_sum[lane]
        for t in range(ppc):
            if cta * ppc + t < planes:
                total = np.float32(0)
                for u in range(units):
                    total = np.float32(total + walker_sums[t * units + u])
                sums[cta * ppc + t] = total
    return y.reshape(x.shape), writes.reshape(x.shape), sums.reshape(n, c)


@pytest.mark.parametrize(
    ("shape", "sms"),
    [
        ((1, 3, 9, 21), 132),
        ((1, 2, 17, 9), 1),
        ((2, 3, 5, 4), 132),
        ((1, 2, 3, 6), 132),  # one band of 3 rows: (rows + 2) % 4 == 1, the step count's edge case
        ((1, 300, 7, 5), 1),  # bands of 7 rows, 3 CTAs
        ((1, 2, 6, 300), 132),  # rows wider than a walker: chunk-edge neighbours come from global memory
        ((1, 64, 16, 8), 132),
        ((2, 5, 33, 1), 4),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"{v}sm",
)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_emulated_depthwise_walk_matches_reference(
    shape: tuple[int, int, int, int], sms: int, dtype: type, kernel_tolerance
) -> None:
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(dtype)
    weight = rng.standard_normal((shape[1], 9)).astype(np.float32) / 3
    bias = rng.standard_normal(shape[1]).astype(np.float32) / 4
    plan = launch.plan_depthwise(*shape, sm_count=sms)

    y, writes, sums = _emulate_depthwise(x, weight, bias, plan)

    assert (writes == 1).all(), "every output must be written exactly once"
    assert reference.max_relative_error(y, reference.depthwise_liteconv(x, weight, bias)) <= kernel_tolerance(dtype)
    own_sums = y.astype(np.float64).sum(axis=(2, 3))
    assert reference.max_relative_error(sums, own_sums) <= reference.fp32_sum_tolerance(shape[2] * shape[3])


def _sanitize_run_case(shape: tuple[int, int, int, int], dtype: str):
    x, weight, bias = sanitize_run.depthwise_inputs(shape, dtype)
    return x, weight, bias, _emulate_depthwise(x, weight, bias, launch.plan_depthwise(*shape))


def test_fp16_sums_differ_from_the_references_sums_by_more_than_1e5() -> None:
    """Why kernels/sanitize_run.py compares the sums with the kernel's own y: a correct kernel's FP32
    fmaf chain rounds some FP16 outputs to the other neighbour than the float64 reference does, and at
    sanitize_run's shape (2, 8, 16, 8) that moves the sums 1.1e-5 away from the reference's sums, over
    the 1e-5 the sanitizer run once demanded."""
    x, weight, bias, (y, _, sums) = _sanitize_run_case((2, 8, 16, 8), "float16")
    expected_y, expected_sums = reference.depthwise_liteconv(x, weight, bias, with_sums=True)

    assert (y != expected_y).any(), "some FP16 outputs round differently from the float64 reference"
    assert reference.max_relative_error(sums, expected_sums) > 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", sanitize_run.DEPTHWISE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sanitize_runs_sums_tolerance_holds_for_a_correct_kernel(shape: tuple[int, int, int, int], dtype: str) -> None:
    """The comparison sanitize_run makes, on the emulated kernel: sums against the stored y's sums at
    the FP32 summation bound, for every shape and dtype it runs."""
    _, _, _, (y, _, sums) = _sanitize_run_case(shape, dtype)
    own_sums = y.astype(np.float64).sum(axis=(2, 3))
    assert reference.max_relative_error(sums, own_sums) <= reference.fp32_sum_tolerance(shape[2] * shape[3])


def test_fp32_sum_tolerance_is_the_summation_bound() -> None:
    assert reference.fp32_sum_tolerance(1) == pytest.approx(2.0**-24, rel=1e-6)
    assert reference.fp32_sum_tolerance(128) == pytest.approx(127 * 2.0**-24, rel=1e-5)
    terms = np.full(4096, np.float32(0.1), dtype=np.float32)
    running = np.float32(0)
    for value in terms:  # the worst order: one long chain
        running = np.float32(running + value)
    exact = float(terms.astype(np.float64).sum())
    assert abs(float(running) - exact) / exact <= reference.fp32_sum_tolerance(len(terms))
