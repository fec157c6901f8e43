"""Launch every fused kernel entry point on small awkward shapes and check each against its NumPy
reference: the workload compute-sanitizer runs (CuPy only, no torch, so it starts fast under the tool).

Covers both dtypes, both depthwise variants, the vector and element-wise paths (odd W, and pointers
deliberately misaligned by one element), rows wider than a walker (chunk edges), 1x1 planes, N = 1.

Run as a program it switches CuPy's memory pool off: inside a pooled block an out-of-bounds access
lands in memory CuPy owns and memcheck cannot see it; with the pool off every array is an allocation
of its own size. Every copy, launch and read-back of a check goes to one stream, in order.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m kernels.sanitize_run
    compute-sanitizer --tool racecheck --error-exitcode 1 python -m kernels.sanitize_run

Exit status 0 when every launch matches its reference.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from kernels import launch, reference

logger = logging.getLogger(__name__)

DEPTHWISE_SHAPES = [(1, 35, 17, 9), (2, 16, 8, 32), (1, 3, 1, 1), (1, 3, 5, 300), (2, 8, 16, 8)]
GATE_SHAPES = [(1, 40, 17, 9), (2, 64, 16, 8), (1, 16, 1, 1)]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3}
# The sums are compared with the sums of the kernel's own stored y, at the FP32 summation bound for
# H * W terms (reference.fp32_sum_tolerance). Not with the sums of the reference's y: in FP16 a
# correct kernel's FP32 accumulation rounds a few outputs to the neighbouring FP16 value, which
# moves the sums by ~1e-5 of their size (tests/test_kernels_depthwise.py emulates it).


def _device_array(cp: Any, host: np.ndarray, *, misaligned: bool) -> Any:
    """A device copy of `host`; with `misaligned`, starting one element into its allocation."""
    if not misaligned:
        return cp.asarray(host)
    storage = cp.zeros(host.size + 1, dtype=host.dtype)
    view = storage[1:].reshape(host.shape)
    view[...] = cp.asarray(host)
    return view


def _empty(cp: Any, shape: tuple[int, ...], dtype: np.dtype, *, misaligned: bool) -> Any:
    return _device_array(cp, np.zeros(shape, dtype=dtype), misaligned=misaligned)


def depthwise_inputs(shape: tuple[int, int, int, int], dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, folded weight [C, 9] and bias [C] of one depthwise check (seeded by the shape)."""
    n, c, h, w = shape
    rng = np.random.default_rng(n * c * h * w)
    x = rng.standard_normal(shape).astype(dtype)
    weight = (rng.standard_normal((c, 9)) / 3).astype(np.float32)
    bias = (rng.standard_normal(c) / 4).astype(np.float32)
    return x, weight, bias


def check_depthwise(
    cp: Any, shape: tuple[int, int, int, int], dtype: str, *, with_sums: bool, misaligned: bool
) -> tuple[float, float]:
    """Launch one depthwise entry point; returns the max relative errors of y against the reference
    and of the sums against the sums of the stored y (0 without sums)."""
    n, c, h, w = shape
    x, weight, bias = depthwise_inputs(shape, dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:  # the uploads, the launch and the downloads in one stream's order
        x_dev = _device_array(cp, x, misaligned=misaligned)
        y_dev = _empty(cp, shape, x.dtype, misaligned=misaligned)
        weight_dev, bias_dev = cp.asarray(weight), cp.asarray(bias)
        sums_dev = cp.zeros((n, c), dtype=np.float32) if with_sums else None
        launch.launch_depthwise_liteconv(
            x=x_dev.data.ptr,
            weight=weight_dev.data.ptr,
            bias=bias_dev.data.ptr,
            y=y_dev.data.ptr,
            sums=None if sums_dev is None else sums_dev.data.ptr,
            n=n,
            c=c,
            h=h,
            w=w,
            dtype=dtype,
            stream=stream.ptr,
            device_id=cp.cuda.Device().id,
        )
        y = cp.asnumpy(y_dev, stream=stream)
        sums = None if sums_dev is None else cp.asnumpy(sums_dev, stream=stream)
    stream.synchronize()
    error = reference.max_relative_error(y, reference.depthwise_liteconv(x, weight, bias))
    own_sums = y.astype(np.float64).sum(axis=(2, 3))
    sums_error = 0.0 if sums is None else reference.max_relative_error(sums, own_sums)
    return error, sums_error


def check_gate(cp: Any, shape: tuple[int, int, int, int], dtype: str, *, misaligned: bool) -> float:
    """Launch one aggregation gate entry point; returns its max relative error against the reference."""
    n, c, h, w = shape
    hidden = max(1, c // 16)
    rng = np.random.default_rng(n + c + h + w)
    streams = [np.maximum(rng.standard_normal(shape), 0).astype(dtype) for _ in range(4)]
    sums = [s.astype(np.float64).sum(axis=(2, 3)).astype(np.float32) for s in streams]
    fc1_weight = (rng.standard_normal((hidden, c)) / np.sqrt(c)).astype(np.float32)
    fc1_bias = (rng.standard_normal(hidden) / 5).astype(np.float32)
    fc2_weight = (rng.standard_normal((c, hidden)) / np.sqrt(hidden)).astype(np.float32)
    fc2_bias = (rng.standard_normal(c) / 5).astype(np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        streams_dev = [_device_array(cp, s, misaligned=misaligned) for s in streams]
        sums_dev = [cp.asarray(s) for s in sums]
        params_dev = [cp.asarray(p) for p in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
        y_dev = _empty(cp, shape, streams[0].dtype, misaligned=misaligned)
        launch.launch_aggregation_gate(
            streams=tuple(s.data.ptr for s in streams_dev),
            stream_sums=tuple(s.data.ptr for s in sums_dev),
            fc1_weight=params_dev[0].data.ptr,
            fc1_bias=params_dev[1].data.ptr,
            fc2_weight=params_dev[2].data.ptr,
            fc2_bias=params_dev[3].data.ptr,
            y=y_dev.data.ptr,
            n=n,
            c=c,
            hidden=hidden,
            h=h,
            w=w,
            dtype=dtype,
            stream=stream.ptr,
            device_id=cp.cuda.Device().id,
        )
        y = cp.asnumpy(y_dev, stream=stream)
    stream.synchronize()
    expected = reference.aggregation_gate(streams, fc1_weight, fc1_bias, fc2_weight, fc2_bias, stream_sums=sums)
    return reference.max_relative_error(y, expected)


def run_all(cp: Any) -> list[str]:
    """Every entry point on every shape, aligned and misaligned; returns the failures."""
    failures: list[str] = []
    for dtype in ("float32", "float16"):
        for misaligned in (False, True):
            for shape in DEPTHWISE_SHAPES:
                for with_sums in (False, True):
                    error, sums_error = check_depthwise(cp, shape, dtype, with_sums=with_sums, misaligned=misaligned)
                    label = (
                        f"{launch.depthwise_entry_point(dtype, with_sums=with_sums)} {shape} misaligned={misaligned}"
                    )
                    logger.info("%s: max relative error %.2e, sums %.2e", label, error, sums_error)
                    if not error <= TOLERANCE[dtype]:
                        failures.append(f"{label}: max relative error {error:.3e} > {TOLERANCE[dtype]:.0e}")
                    sums_tolerance = reference.fp32_sum_tolerance(shape[2] * shape[3])
                    if not sums_error <= sums_tolerance:
                        failures.append(f"{label}: sums max relative error {sums_error:.3e} > {sums_tolerance:.1e}")
            for shape in GATE_SHAPES:
                error = check_gate(cp, shape, dtype, misaligned=misaligned)
                label = f"{launch.gate_entry_point(dtype)} {shape} misaligned={misaligned}"
                logger.info("%s: max relative error %.2e", label, error)
                if not error <= TOLERANCE[dtype]:
                    failures.append(f"{label}: max relative error {error:.3e} > {TOLERANCE[dtype]:.0e}")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="log every launch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    import cupy as cp

    cp.cuda.set_allocator(None)  # no pool: memcheck then sees an access past any array's end
    failures = run_all(cp)
    for failure in failures:
        logger.error("FAIL %s", failure)
    logger.warning("sanitize_run: %d failures", len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
