"""Launch arithmetic of the fused kernels, and their CuPy launchers.

The `plan_*` functions are pure Python (tested on CPU): they turn tensor dims into the grid, block and
int32 tiling arguments each kernel expects. The same plans serve CuPy here and, later, a TensorRT AOT
plugin's `KernelLaunchParams`. The `launch_*` functions import CuPy at the point of use, compile each
`.cu` once per process (RawModule, NVRTC) and launch on a caller-given stream: no allocation, no host
synchronisation, so they can be captured by CUDA graphs.

Pointers are plain integers (a torch tensor's `data_ptr()`, a CuPy array's `data.ptr`), handed to the
kernel as `cupy.cuda.MemoryPointer`s over `UnownedMemory`: zero-copy, and unlike consuming
`__cuda_array_interface__` it never makes CuPy synchronise a stream.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from osnet_base.errors import OsnetTritonError

logger = logging.getLogger(__name__)

KernelDtype = Literal["float32", "float16"]

KERNEL_DIR = Path(__file__).resolve().parent
KERNEL_SOURCES = ("depthwise_liteconv.cu", "aggregation_gate.cu")  # one CUDA source per fused op

# Mirrors of compile-time constants in the .cu files (kept in one place here; tests pin them).
THREADS_PER_CTA = 256  # depthwise_liteconv.cu kMaxThreads / aggregation_gate.cu kMaxThreads
WARP = 32
STRIP = 4  # output columns per lane (Elem<T>::kStrip): 16-byte FP32 / 8-byte FP16 vectors
ROWS_PER_STEP = 4  # depthwise_liteconv.cu kRowsPerStep
GATE_MAX_HIDDEN = 128  # aggregation_gate.cu kMaxHidden
GATE_MAX_CHANNELS_PER_CTA = 64  # aggregation_gate.cu kMaxChannelsPerCta
INT32_MAX = 2**31 - 1

# Tiling policy: depthwise bands of ~16 rows (halo re-reads cost 2/16), never under 4 rows (a band is
# then at least 2 load steps); gate CTAs stream ~8K elements per input. Both shrink the per-CTA work
# until the grid has at least CTAS_PER_SM CTAs per SM, so small batches still spread over the GPU.
TARGET_BAND_ROWS = 16
MIN_BAND_ROWS = 4
GATE_TARGET_ELEMENTS = 8192
CTAS_PER_SM = 2
DEFAULT_SM_COUNT = 132  # H100 SXM; launchers use the real device's count

NVRTC_OPTIONS = ("--std=c++17",)

DTYPE_SUFFIX: dict[str, str] = {"float32": "f32", "float16": "f16"}
ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2}

# Every kernel entry point, and the source that defines it.
ENTRY_POINTS: dict[str, str] = {
    "depthwise_liteconv_f32": "depthwise_liteconv.cu",
    "depthwise_liteconv_f16": "depthwise_liteconv.cu",
    "depthwise_liteconv_sums_f32": "depthwise_liteconv.cu",
    "depthwise_liteconv_sums_f16": "depthwise_liteconv.cu",
    "aggregation_gate_f32": "aggregation_gate.cu",
    "aggregation_gate_f16": "aggregation_gate.cu",
}


class KernelLaunchError(OsnetTritonError, ValueError):
    """A shape, dtype or pointer the fused kernels do not support."""


def _next_pow2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise KernelLaunchError(f"{name} must be a positive int, got {value!r}")


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_SUFFIX:
        raise KernelLaunchError(f"fused kernels take float32 or float16 activations, got {dtype!r}")
    return DTYPE_SUFFIX[dtype]


@dataclass(frozen=True, kw_only=True)
class DepthwiseLaunch:
    """Launch of `depthwise_liteconv[_sums]_*`: grid x block, plus its int32 tiling arguments."""

    grid: int
    block: int
    lanes_per_row: int  # lanes of one walker (power of two); a walker covers lanes_per_row * STRIP columns
    bands_per_plane: int  # row bands per (n, c) plane, one walker each per column chunk
    planes_per_cta: int  # whole planes a CTA owns (so its sums need no atomics)
    band_rows: int
    chunks_per_row: int

    @property
    def tiling_args(self) -> tuple[int, int, int]:
        """The int32 tiling arguments, in kernel-signature order after N, C, H, W."""
        return (self.lanes_per_row, self.bands_per_plane, self.planes_per_cta)


def plan_depthwise(n: int, c: int, h: int, w: int, *, sm_count: int = DEFAULT_SM_COUNT) -> DepthwiseLaunch:
    """Grid, block and tiling of the depthwise LiteConv for an [n, c, h, w] activation (either dtype).

    A walker (lanes_per_row lanes) covers a whole row if W <= 128, otherwise one 128-column chunk; a
    CTA (256 threads) owns planes_per_cta whole planes. Band height starts at ~16 rows and shrinks (more
    bands, fewer planes per CTA) while the grid is under CTAS_PER_SM per SM, down to 4 rows.
    """
    _check_dims(n=n, c=c, h=h, w=w, sm_count=sm_count)
    if h * w > INT32_MAX:
        raise KernelLaunchError(f"an H x W plane of {h}x{w} exceeds the kernels' int32 plane offsets")
    lanes = min(WARP, _next_pow2(_ceil_div(w, STRIP)))
    chunks = _ceil_div(w, lanes * STRIP)
    walkers_per_cta = (THREADS_PER_CTA // WARP) * (WARP // lanes)
    if chunks > walkers_per_cta:
        raise KernelLaunchError(
            f"W={w} is wider than one CTA's walkers cover ({walkers_per_cta * lanes * STRIP} columns): a CTA "
            "must own whole planes for its deterministic sums"
        )
    planes = n * c
    max_bands = min(h, walkers_per_cta // chunks)
    min_rows = min(h, MIN_BAND_ROWS)

    def grid_for(bands: int) -> int:
        return _ceil_div(planes, walkers_per_cta // (chunks * bands))

    bands = max(1, min(max_bands, _ceil_div(h, TARGET_BAND_ROWS)))
    while bands < max_bands and grid_for(bands) < CTAS_PER_SM * sm_count and _ceil_div(h, bands + 1) >= min_rows:
        bands += 1
    band_rows = _ceil_div(h, bands)
    bands = _ceil_div(h, band_rows)  # no empty trailing band
    planes_per_cta = walkers_per_cta // (chunks * bands)
    grid = _ceil_div(planes, planes_per_cta)
    if grid > INT32_MAX:
        raise KernelLaunchError(f"N*C={planes} needs {grid} CTAs, over CUDA's grid limit")
    return DepthwiseLaunch(
        grid=grid,
        block=THREADS_PER_CTA,
        lanes_per_row=lanes,
        bands_per_plane=bands,
        planes_per_cta=planes_per_cta,
        band_rows=band_rows,
        chunks_per_row=chunks,
    )


@dataclass(frozen=True, kw_only=True)
class GateLaunch:
    """Launch of `aggregation_gate_*`: grid x block, plus its int32 tiling argument."""

    grid: int
    block: int
    channels_per_cta: int


def plan_gate(n: int, c: int, hidden: int, h: int, w: int, *, sm_count: int = DEFAULT_SM_COUNT) -> GateLaunch:
    """Grid, block and channels per CTA of the aggregation gate for four [n, c, h, w] streams.

    A CTA takes whole planes of one sample (contiguous in NCHW): enough of them to stream ~8K elements
    per input, halved while the grid is under CTAS_PER_SM per SM.
    """
    _check_dims(n=n, c=c, hidden=hidden, h=h, w=w, sm_count=sm_count)
    if hidden > GATE_MAX_HIDDEN:
        raise KernelLaunchError(f"gate hidden width {hidden} exceeds the kernel's {GATE_MAX_HIDDEN}")
    if h * w > INT32_MAX:
        raise KernelLaunchError(f"an H x W plane of {h}x{w} exceeds the kernels' int32 plane offsets")
    per_cta = max(1, min(c, GATE_MAX_CHANNELS_PER_CTA, _ceil_div(GATE_TARGET_ELEMENTS, h * w)))
    while per_cta > 1 and n * _ceil_div(c, per_cta) < CTAS_PER_SM * sm_count:
        per_cta = _ceil_div(per_cta, 2)
    grid = n * _ceil_div(c, per_cta)
    if grid > INT32_MAX:
        raise KernelLaunchError(f"N={n}, C={c} needs {grid} CTAs, over CUDA's grid limit")
    return GateLaunch(grid=grid, block=THREADS_PER_CTA, channels_per_cta=per_cta)


def depthwise_entry_point(dtype: str, *, with_sums: bool) -> str:
    return f"depthwise_liteconv{'_sums' if with_sums else ''}_{_check_dtype(dtype)}"


def gate_entry_point(dtype: str) -> str:
    return f"aggregation_gate_{_check_dtype(dtype)}"


# ---------------------------------------------------------------------------------------------------
# CuPy launchers. Everything below imports CuPy lazily.


@functools.cache
def _module(source: str) -> Any:
    """One RawModule per source per process; CuPy compiles it with NVRTC for each device on first use."""
    import cupy

    code = (KERNEL_DIR / source).read_text(encoding="utf-8")
    logger.info("compiling %s with NVRTC (CuPy %s)", source, cupy.__version__)
    return cupy.RawModule(code=code, options=NVRTC_OPTIONS)


@functools.cache
def kernel(entry_point: str) -> Any:
    """The `cupy.RawKernel` of an entry point (compiled once per process, loaded once per device)."""
    if entry_point not in ENTRY_POINTS:
        raise KernelLaunchError(f"unknown kernel {entry_point!r}; known: {', '.join(ENTRY_POINTS)}")
    return _module(ENTRY_POINTS[entry_point]).get_function(entry_point)


@functools.cache
def device_sm_count(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def prepare_kernels(device_id: int) -> dict[str, dict[str, int]]:
    """Compile and load every entry point on `device_id` now, so that no compilation or module load
    happens inside a CUDA graph capture. Returns each kernel's registers and local memory."""
    import cupy

    resources: dict[str, dict[str, int]] = {}
    with cupy.cuda.Device(device_id):
        device_sm_count(device_id)
        for entry_point in ENTRY_POINTS:
            raw = kernel(entry_point)
            resources[entry_point] = {
                "registers": int(raw.num_regs),
                "local_bytes": int(raw.local_size_bytes),
                "static_shared_bytes": int(raw.shared_size_bytes),
            }
    logger.info("fused kernels ready on device %d: %s", device_id, resources)
    return resources


def _pointer(cupy_module: Any, address: int, nbytes: int, device_id: int) -> Any:
    # device_id given explicitly: UnownedMemory would otherwise query the pointer's attributes.
    memory = cupy_module.cuda.UnownedMemory(address, nbytes, None, device_id)
    return cupy_module.cuda.MemoryPointer(memory, 0)


@dataclass(frozen=True)
class StreamPointer:
    """A cudaStream_t as CuPy's kernel launch takes it (anything with `.ptr`). CuPy 14 deprecates
    ExternalStream, and making a stream current would be more than this launch needs."""

    ptr: int


def _launch(
    cupy_module: Any, entry_point: str, grid: int, block: int, args: list[Any], stream: int, device_id: int
) -> None:
    # cuLaunchKernel on the caller's stream, nothing else (capturable); the device context makes CuPy
    # pick the module loaded for that device.
    with cupy_module.cuda.Device(device_id):
        kernel(entry_point)((grid,), (block,), tuple(args), shared_mem=0, stream=StreamPointer(stream))


def _int32(value: int) -> Any:
    import numpy

    return numpy.int32(value)  # a Python int would be passed as 8 bytes to an `int` parameter


def launch_depthwise_liteconv(
    *,
    x: int,
    weight: int,
    bias: int,
    y: int,
    sums: int | None,
    n: int,
    c: int,
    h: int,
    w: int,
    dtype: KernelDtype,
    stream: int,
    device_id: int,
) -> DepthwiseLaunch | None:
    """Launch depthwise_liteconv[_sums]_{f32,f16} on `stream` (a cudaStream_t as int).

    x, y: [n, c, h, w] contiguous of `dtype`; weight [c, 9], bias [c]: FP32, BatchNorm folded in;
    sums: [n, c] FP32 output, or None for the variant without sums. y must not alias x. Nothing is
    launched for an empty batch. Returns the plan it launched.
    """
    if n == 0 or c == 0:
        return None
    import cupy

    _check_dtype(dtype)
    itemsize = ITEMSIZE[dtype]
    plan = plan_depthwise(n, c, h, w, sm_count=device_sm_count(device_id))
    activation_bytes = n * c * h * w * itemsize
    args: list[Any] = [
        _pointer(cupy, x, activation_bytes, device_id),
        _pointer(cupy, weight, c * 9 * 4, device_id),
        _pointer(cupy, bias, c * 4, device_id),
        *(_int32(v) for v in (n, c, h, w, *plan.tiling_args)),
        _pointer(cupy, y, activation_bytes, device_id),
    ]
    if sums is not None:
        args.append(_pointer(cupy, sums, n * c * 4, device_id))
    _launch(
        cupy, depthwise_entry_point(dtype, with_sums=sums is not None), plan.grid, plan.block, args, stream, device_id
    )
    return plan


def launch_aggregation_gate(
    *,
    streams: tuple[int, int, int, int],
    stream_sums: tuple[int, int, int, int],
    fc1_weight: int,
    fc1_bias: int,
    fc2_weight: int,
    fc2_bias: int,
    y: int,
    n: int,
    c: int,
    hidden: int,
    h: int,
    w: int,
    dtype: KernelDtype,
    stream: int,
    device_id: int,
) -> GateLaunch | None:
    """Launch aggregation_gate_{f32,f16} on `stream`.

    streams: 4 pointers to [n, c, h, w] of `dtype`; stream_sums: 4 pointers to [n, c] FP32 spatial sums
    (what depthwise_liteconv_sums_* writes); fc1_weight [hidden, c], fc1_bias [hidden], fc2_weight
    [c, hidden], fc2_bias [c]: FP32, as the module holds them (no 1/HW pre-scaling). y: [n, c, h, w].
    """
    if n == 0 or c == 0:
        return None
    import cupy

    if len(streams) != 4 or len(stream_sums) != 4:
        raise KernelLaunchError("the aggregation gate takes exactly 4 streams and 4 sums")
    _check_dtype(dtype)
    itemsize = ITEMSIZE[dtype]
    plan = plan_gate(n, c, hidden, h, w, sm_count=device_sm_count(device_id))
    activation_bytes = n * c * h * w * itemsize
    args: list[Any] = [
        *(_pointer(cupy, p, activation_bytes, device_id) for p in streams),
        *(_pointer(cupy, p, n * c * 4, device_id) for p in stream_sums),
        _pointer(cupy, fc1_weight, hidden * c * 4, device_id),
        _pointer(cupy, fc1_bias, hidden * 4, device_id),
        _pointer(cupy, fc2_weight, c * hidden * 4, device_id),
        _pointer(cupy, fc2_bias, c * 4, device_id),
        *(_int32(v) for v in (n, c, hidden, h, w, plan.channels_per_cta)),
        _pointer(cupy, y, activation_bytes, device_id),
    ]
    _launch(cupy, gate_entry_point(dtype), plan.grid, plan.block, args, stream, device_id)
    return plan


def bytes_moved_depthwise(n: int, c: int, h: int, w: int, dtype: str, *, with_sums: bool) -> int:
    """Compulsory DRAM traffic of one depthwise launch: read x, write y (+ sums), weights ignored."""
    return 2 * n * c * h * w * ITEMSIZE[dtype] + (4 * n * c if with_sums else 0)


def bytes_moved_gate(n: int, c: int, h: int, w: int, dtype: str) -> int:
    """Compulsory DRAM traffic of one gate launch: read 4 streams and 4 sums, write y."""
    return 5 * n * c * h * w * ITEMSIZE[dtype] + 4 * 4 * n * c


__all__ = [
    "DepthwiseLaunch",
    "ENTRY_POINTS",
    "GateLaunch",
    "KernelLaunchError",
    "bytes_moved_depthwise",
    "bytes_moved_gate",
    "depthwise_entry_point",
    "gate_entry_point",
    "kernel",
    "launch_aggregation_gate",
    "launch_depthwise_liteconv",
    "plan_depthwise",
    "plan_gate",
    "prepare_kernels",
]
