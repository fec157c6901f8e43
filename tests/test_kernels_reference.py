"""CPU checks of the fused-kernel package: the NumPy references against the PyTorch modules they
replace, the launch arithmetic, a line-by-line emulation of the depthwise kernel's work split, and
the OSNet rewrite (run on the references) against the unfused model."""

from __future__ import annotations

import math
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine_builder.models import create_osnet
from engine_builder.osnet import ChannelGate, LightConv3x3
from kernels import launch, reference
from engine_builder.fused_osnet import FusedOSBlock, FusionError, fuse_osnet

FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 2e-3
DTYPES = [np.float32, np.float16]

# (N, C, H, W): odd H and W, C not a multiple of 32, N = 1, 1x1 planes, and OSNet's stage 2/4 planes.
DEPTHWISE_SHAPES = [(1, 35, 17, 9), (2, 20, 5, 33), (1, 3, 1, 1), (3, 16, 2, 7), (1, 64, 64, 32), (2, 128, 16, 8)]
GATE_SHAPES = [(1, 40, 17, 9), (3, 48, 5, 7), (1, 16, 1, 1), (2, 64, 16, 8)]


def _tolerance(dtype: type) -> float:
    return FP32_TOLERANCE if np.dtype(dtype) == np.float32 else FP16_TOLERANCE


def _randomise_batchnorm(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial eval statistics, so folding is really exercised (a fresh BatchNorm is the identity)."""
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            c = bn.num_features
            bn.weight.data = 0.5 + torch.rand(c, generator=generator)
            bn.bias.data = 0.1 * torch.randn(c, generator=generator)
            bn.running_mean.data = 0.1 * torch.randn(c, generator=generator)
            bn.running_var.data = 0.5 + torch.rand(c, generator=generator)


def _lightconv(channels: int, seed: int) -> LightConv3x3:
    generator = torch.Generator().manual_seed(seed)
    lite = LightConv3x3(channels, channels).eval()
    lite.conv2.weight.data = torch.randn(lite.conv2.weight.shape, generator=generator) / 3
    _randomise_batchnorm(lite, generator)
    return lite


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
def test_depthwise_reference_matches_lightconv(shape: tuple[int, int, int, int], dtype: type) -> None:
    n, c, h, w = shape
    lite = _lightconv(c, seed=c + h)
    x = np.random.default_rng(h * w).standard_normal(shape).astype(dtype)
    weight, bias = _folded(lite)

    y = reference.depthwise_liteconv(x, weight, bias)

    assert y.dtype == x.dtype and y.shape == x.shape
    expected = _depthwise_half_in_torch(lite, x)
    assert reference.max_relative_error(y, expected) <= _tolerance(dtype)
    assert (y >= 0).all() and (y == 0).any() and (y > 0).any()  # ReLU really clips something


def test_depthwise_reference_matches_pytorch_fp32_arithmetic() -> None:
    """Against the module in plain FP32 (not float64): what the FP32 kernel is compared with on GPU."""
    lite = _lightconv(24, seed=3)
    x = np.random.default_rng(0).standard_normal((2, 24, 13, 11)).astype(np.float32)
    with torch.no_grad():
        expected = lite.relu(lite.bn(lite.conv2(torch.from_numpy(x)))).numpy()
    y = reference.depthwise_liteconv(x, *_folded(lite))
    assert reference.max_relative_error(y, expected) <= FP32_TOLERANCE


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


def _channel_gate(channels: int, seed: int) -> ChannelGate:
    generator = torch.Generator().manual_seed(seed)
    gate = ChannelGate(channels).eval()
    for conv in (gate.fc1, gate.fc2):
        conv.weight.data = torch.randn(conv.weight.shape, generator=generator) / math.sqrt(conv.weight.shape[1])
        conv.bias.data = 0.2 * torch.randn(conv.bias.shape, generator=generator)
    return gate


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
def test_gate_reference_matches_channel_gate(shape: tuple[int, int, int, int], dtype: type) -> None:
    gate = _channel_gate(shape[1], seed=shape[1])
    streams = _streams(shape, dtype, seed=shape[2])

    y = reference.aggregation_gate(streams, *_gate_params(gate))

    assert y.dtype == streams[0].dtype and y.shape == shape
    assert reference.max_relative_error(y, _gate_in_torch(gate, streams)) <= _tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_gate_reference_from_producer_sums(dtype: type) -> None:
    """The kernel path: GAP from the sums the last depthwise launch of each stream writes."""
    shape = (2, 32, 7, 5)
    gate = _channel_gate(32, seed=7)
    streams = _streams(shape, dtype, seed=9)
    sums = [s.astype(np.float64).sum(axis=(2, 3)).astype(np.float32) for s in streams]

    y = reference.aggregation_gate(streams, *_gate_params(gate), stream_sums=sums)

    assert reference.max_relative_error(y, _gate_in_torch(gate, streams)) <= _tolerance(dtype)


def test_gate_reference_rejects_wrong_stream_count() -> None:
    streams = _streams((1, 16, 2, 2), np.float32, seed=0)
    with pytest.raises(ValueError, match="4 streams"):
        reference.aggregation_gate(streams[:3], *_gate_params(_channel_gate(16, seed=0)))


def test_max_relative_error_is_normalised_by_the_largest_magnitude() -> None:
    assert reference.max_relative_error(np.array([1.0, 0.1]), np.array([2.0, 0.0])) == pytest.approx(0.5)
    assert reference.max_relative_error(np.zeros(3), np.zeros(3)) == 0.0


# ---------------------------------------------------------------------------------------------------
# Launch arithmetic.

OSNET_X1_0_STAGES = [(64, 64, 32), (96, 32, 16), (128, 16, 8)]  # (mid channels, H, W) at 256x128 input


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (1, 35, 17, 9), (3, 7, 100, 3), (2, 5, 3, 129), (1, 2, 9, 300), (4, 3, 2, 1000)]
    + [(n, c, h, w) for n in (1, 32, 256) for c, h, w in OSNET_X1_0_STAGES],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("sms", [1, 132])
def test_plan_depthwise_covers_every_plane_with_whole_planes_per_cta(
    shape: tuple[int, int, int, int], sms: int
) -> None:
    n, c, h, w = shape
    plan = launch.plan_depthwise(n, c, h, w, sm_count=sms)

    assert plan.block == launch.THREADS_PER_CTA and plan.block % 32 == 0
    assert plan.lanes_per_row & (plan.lanes_per_row - 1) == 0 and 1 <= plan.lanes_per_row <= 32
    walkers_per_cta = plan.block // 32 * (32 // plan.lanes_per_row)
    assert plan.planes_per_cta * plan.chunks_per_row * plan.bands_per_plane <= walkers_per_cta
    assert plan.chunks_per_row == math.ceil(w / (plan.lanes_per_row * launch.STRIP))
    assert plan.grid == math.ceil(n * c / plan.planes_per_cta)
    assert plan.band_rows == math.ceil(h / plan.bands_per_plane)
    assert (plan.bands_per_plane - 1) * plan.band_rows < h  # no empty band
    assert plan.band_rows >= min(h, launch.MIN_BAND_ROWS)


@pytest.mark.parametrize("n", [1, 32, 256])
@pytest.mark.parametrize("stage", OSNET_X1_0_STAGES, ids=["stage2", "stage3", "stage4"])
def test_plans_fill_an_h100_when_the_batch_allows(n: int, stage: tuple[int, int, int]) -> None:
    c, h, w = stage
    target = launch.CTAS_PER_SM * 132
    depthwise = launch.plan_depthwise(n, c, h, w, sm_count=132)
    shortest_band = (
        depthwise.band_rows <= launch.MIN_BAND_ROWS
        or depthwise.bands_per_plane * depthwise.chunks_per_row
        == depthwise.block // 32 * (32 // depthwise.lanes_per_row)
    )
    assert depthwise.grid >= target or shortest_band
    gate = launch.plan_gate(n, c, c // 16, h, w, sm_count=132)
    assert gate.grid >= target or gate.channels_per_cta == 1


def test_plan_depthwise_rejects_rows_wider_than_a_cta() -> None:
    with pytest.raises(launch.KernelLaunchError, match="wider"):
        launch.plan_depthwise(1, 1, 4, 5000)
    with pytest.raises(launch.KernelLaunchError, match="positive"):
        launch.plan_depthwise(0, 1, 4, 4)


@pytest.mark.parametrize("shape", [(1, 40, 2, 17, 9), (3, 48, 3, 5, 7), (256, 64, 4, 64, 32), (1, 2048, 128, 1, 1)])
def test_plan_gate_owns_whole_planes_of_one_sample(shape: tuple[int, int, int, int, int]) -> None:
    n, c, hidden, h, w = shape
    plan = launch.plan_gate(n, c, hidden, h, w, sm_count=132)
    assert 1 <= plan.channels_per_cta <= min(c, launch.GATE_MAX_CHANNELS_PER_CTA)
    assert plan.grid == n * math.ceil(c / plan.channels_per_cta)
    assert plan.block == launch.THREADS_PER_CTA


def test_plan_gate_rejects_a_hidden_layer_wider_than_the_kernel_table() -> None:
    with pytest.raises(launch.KernelLaunchError, match="hidden"):
        launch.plan_gate(1, 4096, 256, 8, 8)


def test_entry_point_names() -> None:
    assert launch.depthwise_entry_point("float16", with_sums=True) == "depthwise_liteconv_sums_f16"
    assert launch.gate_entry_point("float32") == "aggregation_gate_f32"
    assert set(launch.ENTRY_POINTS) == {
        launch.depthwise_entry_point(d, with_sums=s) for d in ("float32", "float16") for s in (False, True)
    } | {launch.gate_entry_point(d) for d in ("float32", "float16")}
    with pytest.raises(launch.KernelLaunchError):
        launch.gate_entry_point("bfloat16")


def _source(name: str) -> str:
    return (launch.KERNEL_DIR / name).read_text()


@pytest.mark.parametrize(
    ("source", "pattern", "value"),
    [
        ("depthwise_liteconv.cu", r"kMaxThreads = (\d+);", launch.THREADS_PER_CTA),
        ("depthwise_liteconv.cu", r"kRowsPerStep = (\d+);", launch.ROWS_PER_STEP),
        ("aggregation_gate.cu", r"kMaxThreads = (\d+);", launch.THREADS_PER_CTA),
        ("aggregation_gate.cu", r"kMaxHidden = (\d+);", launch.GATE_MAX_HIDDEN),
        ("aggregation_gate.cu", r"kMaxChannelsPerCta = (\d+);", launch.GATE_MAX_CHANNELS_PER_CTA),
    ],
)
def test_launch_constants_mirror_the_cuda_sources(source: str, pattern: str, value: int) -> None:
    assert [int(v) for v in re.findall(pattern, _source(source))] == [value]


def test_depthwise_strip_width_mirrors_the_cuda_source() -> None:
    assert set(re.findall(r"kStrip = (\d+);", _source("depthwise_liteconv.cu"))) == {str(launch.STRIP)}


def test_every_entry_point_is_an_extern_c_kernel_of_its_source() -> None:
    for entry, source in launch.ENTRY_POINTS.items():
        assert re.search(rf'extern "C" __global__ void __launch_bounds__\([^)]*\)\s+{entry}\(', _source(source)), entry


# ---------------------------------------------------------------------------------------------------
# The CuPy launchers against the kernels' C signatures, with a recording stand-in for CuPy.


def _signature(entry: str) -> list[tuple[str, str]]:
    """(kind, name) of each parameter of an entry point: kind is "ptr" or "int"."""
    match = re.search(rf"{entry}\((.*?)\)\s*\{{", _source(launch.ENTRY_POINTS[entry]), re.S)
    assert match, entry
    params = [p.strip() for p in match.group(1).split(",")]
    return [("ptr" if "*" in p else "int", p.split()[-1].lstrip("*")) for p in params]


class _Recorder:
    """Just enough of CuPy's API for the launchers: records each launch and the stream it ran on."""

    def __init__(self) -> None:
        self.launches: list[dict] = []
        self.current_stream: int | None = None
        self.current_device: int | None = None
        recorder = self

        class Memory:
            def __init__(self, ptr: int, size: int, owner: object, device_id: int) -> None:
                self.ptr, self.size, self.device_id = ptr, size, device_id

        class MemoryPointer:
            def __init__(self, memory: Memory, offset: int) -> None:
                self.ptr, self.size, self.device_id = memory.ptr + offset, memory.size - offset, memory.device_id

        class Device:
            attributes = {"MultiProcessorCount": 132}

            def __init__(self, device_id: int) -> None:
                self.device_id = device_id

            def __enter__(self) -> None:
                recorder.current_device = self.device_id

            def __exit__(self, *exc: object) -> None:
                recorder.current_device = None

        class ExternalStream:
            def __init__(self, ptr: int, device_id: int) -> None:
                self.ptr = ptr

            def __enter__(self) -> None:
                recorder.current_stream = self.ptr

            def __exit__(self, *exc: object) -> None:
                recorder.current_stream = None

        class Kernel:
            num_regs, local_size_bytes, shared_size_bytes = 72, 0, 0

            def __init__(self, name: str) -> None:
                self.name = name

            def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
                recorder.launches.append(
                    {
                        "name": self.name,
                        "grid": grid,
                        "block": block,
                        "args": args,
                        "shared_mem": shared_mem,
                        "stream": recorder.current_stream,
                        "device": recorder.current_device,
                    }
                )

        class RawModule:
            def __init__(self, code: str, options: tuple) -> None:
                assert 'extern "C"' in code and options == launch.NVRTC_OPTIONS

            def get_function(self, name: str) -> Kernel:
                return Kernel(name)

        self.module = type(sys)("cupy")
        self.module.__version__ = "recorder"
        self.module.RawModule = RawModule
        self.module.cuda = SimpleNamespace(
            UnownedMemory=Memory, MemoryPointer=MemoryPointer, Device=Device, ExternalStream=ExternalStream
        )


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch):
    fake = _Recorder()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    caches = (launch._module, launch.kernel, launch.device_sm_count)
    for cache in caches:
        cache.cache_clear()
    yield fake
    for cache in caches:
        cache.cache_clear()


def _check_args(launched: dict, pointers: dict[str, tuple[int, int]], ints: dict[str, int]) -> None:
    signature = _signature(launched["name"])
    assert len(launched["args"]) == len(signature)
    for (kind, name), arg in zip(signature, launched["args"], strict=True):
        if kind == "ptr":
            assert (arg.ptr, arg.size, arg.device_id) == (*pointers[name], 0), name
        else:
            assert type(arg) is np.int32 and int(arg) == ints[name], name
    assert launched["stream"] == 0xABC and launched["device"] == 0 and launched["shared_mem"] == 0


@pytest.mark.parametrize("with_sums", [False, True])
@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_depthwise_launcher_passes_the_kernel_signature(
    recorder: _Recorder, dtype: str, itemsize: int, with_sums: bool
) -> None:
    n, c, h, w = 2, 3, 5, 7
    plan = launch.launch_depthwise_liteconv(
        x=0x1000,
        weight=0x2000,
        bias=0x3000,
        y=0x4000,
        sums=0x5000 if with_sums else None,
        n=n,
        c=c,
        h=h,
        w=w,
        dtype=dtype,
        stream=0xABC,
        device_id=0,
    )
    (launched,) = recorder.launches
    assert launched["name"] == launch.depthwise_entry_point(dtype, with_sums=with_sums)
    assert plan == launch.plan_depthwise(n, c, h, w, sm_count=132)
    assert (launched["grid"], launched["block"]) == ((plan.grid,), (plan.block,))
    activation = n * c * h * w * itemsize
    pointers = {
        "x": (0x1000, activation),
        "weight": (0x2000, c * 36),
        "bias": (0x3000, c * 4),
        "y": (0x4000, activation),
        "sums": (0x5000, n * c * 4),
    }
    ints = {
        "n": n,
        "c": c,
        "h": h,
        "w": w,
        "lanes_per_row": plan.lanes_per_row,
        "bands_per_plane": plan.bands_per_plane,
        "planes_per_cta": plan.planes_per_cta,
    }
    _check_args(launched, pointers, ints)


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_gate_launcher_passes_the_kernel_signature(recorder: _Recorder, dtype: str, itemsize: int) -> None:
    n, c, hidden, h, w = 3, 40, 2, 9, 5
    plan = launch.launch_aggregation_gate(
        streams=(0x10, 0x20, 0x30, 0x40),
        stream_sums=(0x50, 0x60, 0x70, 0x80),
        fc1_weight=0x90,
        fc1_bias=0xA0,
        fc2_weight=0xB0,
        fc2_bias=0xC0,
        y=0xD0,
        n=n,
        c=c,
        hidden=hidden,
        h=h,
        w=w,
        dtype=dtype,
        stream=0xABC,
        device_id=0,
    )
    (launched,) = recorder.launches
    assert launched["name"] == launch.gate_entry_point(dtype)
    assert plan == launch.plan_gate(n, c, hidden, h, w, sm_count=132)
    activation = n * c * h * w * itemsize
    pointers = {f"x{i + 1}": (0x10 * (i + 1), activation) for i in range(4)}
    pointers |= {f"s{i + 1}": (0x50 + 0x10 * i, n * c * 4) for i in range(4)}
    pointers |= {
        "fc1_weight": (0x90, hidden * c * 4),
        "fc1_bias": (0xA0, hidden * 4),
        "fc2_weight": (0xB0, c * hidden * 4),
        "fc2_bias": (0xC0, c * 4),
        "y": (0xD0, activation),
    }
    ints = {"n": n, "c": c, "hidden": hidden, "h": h, "w": w, "channels_per_cta": plan.channels_per_cta}
    _check_args(launched, pointers, ints)


def test_launchers_skip_an_empty_batch_and_prepare_every_kernel(recorder: _Recorder) -> None:
    assert (
        launch.launch_depthwise_liteconv(
            x=1, weight=2, bias=3, y=4, sums=None, n=0, c=3, h=5, w=7, dtype="float32", stream=0xABC, device_id=0
        )
        is None
    )
    assert recorder.launches == []
    resources = launch.prepare_kernels(0)
    assert set(resources) == set(launch.ENTRY_POINTS)
    assert all(r["registers"] == 72 for r in resources.values())


# ---------------------------------------------------------------------------------------------------
# Emulation of depthwise_liteconv.cu: the same per-lane index arithmetic, window walk, warp shuffles
# (width = lanes_per_row) and fixed-order sums, in NumPy. Checks that a plan's grid covers every output
# exactly once, that halos and band edges are right, and that the sums reduction reads only written
# walker slots, for shapes the GPU tests also run.


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
                        window = np.stack([up[lane], mid[lane], low[lane]]).astype(np.float64)
                        wk = weight9[channel[lane]].reshape(3, 3).astype(np.float64)
                        out = np.array([bias[channel[lane]] + (wk * window[:, j : j + 3]).sum() for j in range(strip)])
                        stored = np.maximum(out, 0).astype(x.dtype)[: cols[lane]]
                        y[plane[lane], o[lane], col0[lane] : col0[lane] + cols[lane]] = stored
                        writes[plane[lane], o[lane], col0[lane] : col0[lane] + cols[lane]] += 1
                        lane_sum[lane] += np.float32(stored.astype(np.float32).sum())
                    up, mid = mid, low
            offset = g // 2
            while offset > 0:
                lane_sum = lane_sum + lane_sum[lanes ^ offset]
                offset //= 2
            for lane in np.flatnonzero((sub == 0) & (plane_local < ppc)):
                walker_sums[int(walker[lane])] = lane_sum[lane]
        for t in range(ppc):
            if cta * ppc + t < planes:
                sums[cta * ppc + t] = sum((walker_sums[t * units + u] for u in range(units)), np.float32(0))
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
def test_emulated_depthwise_walk_matches_reference(shape: tuple[int, int, int, int], sms: int, dtype: type) -> None:
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(dtype)
    weight = rng.standard_normal((shape[1], 9)).astype(np.float32) / 3
    bias = rng.standard_normal(shape[1]).astype(np.float32) / 4
    plan = launch.plan_depthwise(*shape, sm_count=sms)

    y, writes, sums = _emulate_depthwise(x, weight, bias, plan)

    assert (writes == 1).all(), "every output must be written exactly once"
    expected, expected_sums = reference.depthwise_liteconv(x, weight, bias, with_sums=True)
    assert reference.max_relative_error(y, expected) <= _tolerance(dtype)
    assert reference.max_relative_error(sums, expected_sums) <= 2e-6


# ---------------------------------------------------------------------------------------------------
# The OSNet rewrite, run on the NumPy references.


def _seeded_model(name: str) -> torch.nn.Module:
    model = create_osnet(name)
    _randomise_batchnorm(model, torch.Generator().manual_seed(0))
    return model.eval()


@pytest.mark.parametrize("name", ["osnet_x0_25", "osnet_ibn_x1_0", "osnet_ain_x0_25"])
def test_fused_osnet_on_references_matches_unfused(name: str) -> None:
    model = _seeded_model(name)
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))

    fused = fuse_osnet(model, backend="reference")

    blocks = [m for m in fused.modules() if isinstance(m, FusedOSBlock)]
    assert len(blocks) == 6
    with torch.no_grad():
        expected = model(images)
        actual = fused(images)
    cosine = torch.nn.functional.cosine_similarity(actual.double(), expected.double(), dim=1)
    assert cosine.min().item() >= 0.99999
    assert reference.max_relative_error(actual.numpy(), expected.numpy()) <= 1e-4
    assert not any(p.requires_grad for p in fused.parameters())
    assert any(p.requires_grad for p in model.parameters()), "the input model is left untouched"


def test_fuse_osnet_needs_eval_mode() -> None:
    with pytest.raises(FusionError, match="eval"):
        fuse_osnet(create_osnet("osnet_x0_25").train(), backend="reference")


def test_fuse_osnet_cuda_backend_needs_a_cuda_model() -> None:
    with pytest.raises(FusionError, match="CUDA"):
        fuse_osnet(create_osnet("osnet_x0_25"), backend="cuda")


def test_fused_model_refuses_weights_converted_after_fusion() -> None:
    fused = fuse_osnet(create_osnet("osnet_x0_25"), backend="reference").half()
    block = next(m for m in fused.modules() if isinstance(m, FusedOSBlock))
    with pytest.raises(FusionError, match="before fuse_osnet"):
        block(torch.randn(1, block.conv1.conv.in_channels, 16, 8).half())
