"""GPU acceptance of the fused kernels: each kernel against the PyTorch module it replaces, the fused
osnet_x1_0 against the unfused one, CUDA graph capture, determinism. Needs CuPy and a CUDA device;
skipped elsewhere. Run: PYTHONPATH=. python -m pytest -m gpu tests/test_kernels_gpu.py"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="CuPy is not installed: the fused kernels launch through CuPy")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the fused-kernel GPU tests need one", allow_module_level=True)

from engine_builder.models import create_osnet  # noqa: E402  (after the skips: nothing to import on CPU)
from engine_builder.osnet import ChannelGate, LightConv3x3  # noqa: E402
from kernels import launch, reference, sanitize_run  # noqa: E402
from engine_builder.fused_osnet import CudaFusedOps, FusedLiteConv, fuse_osnet  # noqa: E402

DEVICE = torch.device("cuda")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
TOLERANCE_BY_NAME = {"float32": 1e-5, "float16": 2e-3}
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]

# Odd H/W, C not a multiple of 32, N = 1, 1x1 planes, rows wider than a walker, and osnet_x1_0's stages.
DEPTHWISE_SHAPES = [
    (1, 35, 17, 9),
    (2, 20, 5, 33),
    (1, 3, 1, 1),
    (1, 4, 6, 300),
    (2, 64, 64, 32),
    (1, 96, 32, 16),
    (3, 128, 16, 8),
]
GATE_SHAPES = [(1, 40, 17, 9), (3, 48, 5, 7), (1, 16, 1, 1), (2, 64, 64, 32), (1, 96, 32, 16), (4, 128, 16, 8)]


@pytest.fixture(autouse=True, scope="module")
def _exact_fp32() -> Iterator[None]:
    """TF32 would put 1e-3 errors into the PyTorch side of FP32 comparisons."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _kernel_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16"}[dtype]


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return reference.max_relative_error(actual.double().cpu().numpy(), expected.double().cpu().numpy())


def _randomise_batchnorm(module: torch.nn.Module, generator: torch.Generator) -> None:
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
    return lite.to(DEVICE)


def _depthwise_in_torch(lite: LightConv3x3, x: torch.Tensor) -> torch.Tensor:
    """conv2 -> bn -> relu of the module, in float64 on the GPU: the ground truth for both dtypes."""
    module = LightConv3x3(lite.conv2.in_channels, lite.conv2.in_channels).to(DEVICE).double().eval()
    module.load_state_dict(lite.state_dict())
    with torch.no_grad():
        return module.relu(module.bn(module.conv2(x.double())))


def _run_depthwise(lite: LightConv3x3, x: torch.Tensor, *, with_sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    fused = FusedLiteConv(lite, CudaFusedOps())
    return fused.ops.depthwise(x, fused.weight, fused.bias, with_sums=with_sums)


@pytest.mark.parametrize("with_sums", [False, True], ids=["plain", "sums"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", DEPTHWISE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_depthwise_kernel_matches_pytorch(
    shape: tuple[int, int, int, int], dtype: torch.dtype, with_sums: bool
) -> None:
    lite = _lightconv(shape[1], seed=sum(shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)

    y, sums = _run_depthwise(lite, x, with_sums=with_sums)
    torch.cuda.synchronize()

    assert y.dtype == dtype and y.shape == x.shape
    assert _rel(y, _depthwise_in_torch(lite, x)) <= TOLERANCE[dtype]
    if with_sums:
        assert sums is not None and sums.dtype == torch.float32 and sums.shape == shape[:2]
        assert _rel(sums, y.double().sum(dim=(2, 3))) <= reference.fp32_sum_tolerance(shape[2] * shape[3])
    else:
        assert sums is None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_depthwise_kernel_elementwise_path_on_misaligned_tensors(dtype: torch.dtype) -> None:
    """W % 4 == 0 but x and y start one element into their storage: the kernel must take the scalar path."""
    shape = (2, 16, 8, 32)
    lite = _lightconv(16, seed=5)
    numel = math.prod(shape)
    x = torch.randn(numel + 1, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)[1:].view(shape)
    fused = FusedLiteConv(lite, CudaFusedOps())
    y = torch.empty(numel + 1, device=DEVICE, dtype=dtype)[1:].view(shape)
    launch.launch_depthwise_liteconv(
        x=x.data_ptr(),
        weight=fused.weight.data_ptr(),
        bias=fused.bias.data_ptr(),
        y=y.data_ptr(),
        sums=None,
        n=shape[0],
        c=shape[1],
        h=shape[2],
        w=shape[3],
        dtype=_kernel_dtype(dtype),
        stream=torch.cuda.current_stream().cuda_stream,
        device_id=torch.cuda.current_device(),
    )
    torch.cuda.synchronize()
    assert x.data_ptr() % 8 != 0
    assert _rel(y, _depthwise_in_torch(lite, x)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_depthwise_sums_are_bitwise_deterministic(dtype: torch.dtype) -> None:
    lite = _lightconv(64, seed=11)
    x = torch.randn(8, 64, 64, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    runs = [_run_depthwise(lite, x, with_sums=True) for _ in range(3)]
    torch.cuda.synchronize()
    for y, sums in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(sums, runs[0][1])


def _channel_gate(channels: int, seed: int) -> ChannelGate:
    generator = torch.Generator().manual_seed(seed)
    gate = ChannelGate(channels).eval()
    for conv in (gate.fc1, gate.fc2):
        conv.weight.data = torch.randn(conv.weight.shape, generator=generator) / math.sqrt(conv.weight.shape[1])
        conv.bias.data = 0.2 * torch.randn(conv.bias.shape, generator=generator)
    return gate.to(DEVICE)


def _gate_in_torch(gate: ChannelGate, streams: list[torch.Tensor]) -> torch.Tensor:
    """OSBlock's use of the gate (gate each stream, add the four), in float64."""
    module = ChannelGate(gate.fc1.in_channels).to(DEVICE).double().eval()
    module.load_state_dict(gate.state_dict())
    with torch.no_grad():
        return sum(module(s.double()) for s in streams)


def _gate_params(gate: ChannelGate) -> list[torch.Tensor]:
    hidden, channels = gate.fc1.weight.shape[:2]
    return [
        gate.fc1.weight.detach().reshape(hidden, channels).float().contiguous(),
        gate.fc1.bias.detach().float(),
        gate.fc2.weight.detach().reshape(channels, hidden).float().contiguous(),
        gate.fc2.bias.detach().float(),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gate_kernel_matches_pytorch(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    gate = _channel_gate(shape[1], seed=shape[1])
    generator = torch.Generator().manual_seed(sum(shape))
    scale = 0.2 + 2 * torch.rand(1, shape[1], 1, 1, generator=generator)
    streams = [(torch.randn(shape, generator=generator) * scale).relu().to(DEVICE, dtype) for _ in range(4)]
    sums = [s.double().sum(dim=(2, 3)).float() for s in streams]

    y = CudaFusedOps().gate(streams, sums, *_gate_params(gate))
    torch.cuda.synchronize()

    assert y.dtype == dtype and y.shape == shape
    assert _rel(y, _gate_in_torch(gate, streams)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_block_streams_and_gate_chain_matches_pytorch(dtype: torch.dtype) -> None:
    """Depthwise sums feeding the gate, as in a fused block: four 1-deep streams of stage-3 shape."""
    shape = (3, 96, 32, 16)
    lites = [_lightconv(96, seed=20 + t) for t in range(4)]
    gate = _channel_gate(96, seed=30)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    ops = CudaFusedOps()

    produced = [_run_depthwise(lite, x, with_sums=True) for lite in lites]
    y = ops.gate([p[0] for p in produced], [p[1] for p in produced], *_gate_params(gate))
    torch.cuda.synchronize()

    expected = _gate_in_torch(gate, [_depthwise_in_torch(lite, x) for lite in lites])
    assert _rel(y, expected) <= TOLERANCE[dtype] * (1 if dtype == torch.float32 else 2)


def _osnet(name: str, dtype: torch.dtype) -> torch.nn.Module:
    model = create_osnet(name)
    _randomise_batchnorm(model, torch.Generator().manual_seed(0))
    return model.eval().to(DEVICE, dtype)


@pytest.mark.parametrize(
    ("name", "dtype", "min_cosine"),
    [
        ("osnet_x1_0", torch.float32, 0.99999),
        ("osnet_x1_0", torch.float16, 0.999),
        ("osnet_ain_x1_0", torch.float32, 0.99999),
        ("osnet_ibn_x1_0", torch.float16, 0.999),
    ],
)
def test_fused_osnet_embeddings_match_unfused(name: str, dtype: torch.dtype, min_cosine: float) -> None:
    model = _osnet(name, dtype)
    fused = fuse_osnet(model)
    images = torch.randn(4, 3, 256, 128, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)

    with torch.no_grad():
        expected = model(images).float()
        actual = fused(images).float()

    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=1)
    assert cosine.min().item() >= min_cosine, cosine.tolist()


def test_fused_osnet_captures_and_replays_in_a_cuda_graph() -> None:
    model = _osnet("osnet_x1_0", torch.float16)
    fused = fuse_osnet(model)
    static_input = torch.randn(8, 3, 256, 128, device=DEVICE, dtype=torch.float16)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # warm-up outside the capture: cuDNN autotuning, allocator pools
            fused(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():  # capture_error_mode "global": a host sync would raise
        static_output = fused(static_input)

    replayed = []
    for seed in (6, 7):
        images = torch.randn(8, 3, 256, 128, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.float16)
        static_input.copy_(images)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = fused(images)
        assert _rel(static_output, eager) <= 1e-3, "a replay must compute what an eager run computes"
        replayed.append(static_output.clone())
    assert not torch.equal(replayed[0], replayed[1]), "the graph must recompute from the new input"


def test_kernels_follow_torchs_current_stream() -> None:
    """The launch must queue behind work on torch's current stream. Everything that could synchronise
    (folding the weights, compiling and loading the kernels) happens before the side stream is entered;
    a control launch on the legacy stream shows the sleep really leaves the input unready."""
    lite = _lightconv(64, seed=12)
    fused = FusedLiteConv(lite, CudaFusedOps())
    launch.prepare_kernels(torch.cuda.current_device())
    x = torch.randn(4, 64, 64, 32, device=DEVICE)
    raced = torch.empty_like(x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on `side`
        x.mul_(2)
        y, _ = fused.ops.depthwise(x, fused.weight, fused.bias, with_sums=False)
        launch.launch_depthwise_liteconv(  # the control: same kernel on stream 0, which does not wait for `side`
            x=x.data_ptr(), weight=fused.weight.data_ptr(), bias=fused.bias.data_ptr(), y=raced.data_ptr(), sums=None,
            n=4, c=64, h=64, w=32, dtype="float32", stream=0, device_id=torch.cuda.current_device(),
        )
    torch.cuda.synchronize()
    expected = _depthwise_in_torch(lite, x)
    assert _rel(y, expected) <= TOLERANCE[torch.float32]
    assert _rel(raced, expected) > 1e-2, "the control launch should have read x before the doubling"


def test_sanitizer_workload_passes_without_the_sanitizer() -> None:
    """kernels.sanitize_run (what compute-sanitizer runs) must itself be clean."""
    assert sanitize_run.run_all(cp) == []


def test_every_kernel_loads_with_its_compiled_resources() -> None:
    resources = launch.prepare_kernels(torch.cuda.current_device())
    assert set(resources) == set(launch.ENTRY_POINTS)
    assert all(r["local_bytes"] == 0 for r in resources.values()), resources  # no spills under NVRTC either
    assert all(r["registers"] <= 255 for r in resources.values())


def test_identity_filter_preserves_element_order_and_rounds_to_nearest_even() -> None:
    """Centre tap 1 and bias 2^-11 make the kernel y = relu(x + 2^-11): exact in FP32, a rounding tie in
    FP16 for x = 1 and x = 1 + 2^-10. Checks the order of elements inside the packed vectors (W = 8, the
    vector path) and that PTX cvt.rn.f16.f32 rounds ties to even like NumPy."""
    values = np.array([1.0, 1.0 + 2.0**-10, 2.0, 3.0, 0.5, -1.0, 1024.0, 7.0], dtype=np.float16)
    bias = np.float32(2.0**-11)
    fused = FusedLiteConv(_lightconv(1, seed=0), CudaFusedOps())
    fused.weight.zero_()
    fused.weight[0, 4] = 1.0
    fused.bias.fill_(float(bias))
    x16 = torch.from_numpy(values.reshape(1, 1, 1, -1)).to(DEVICE)

    y16, _ = fused.ops.depthwise(x16, fused.weight, fused.bias, with_sums=False)
    y32, _ = fused.ops.depthwise(x16.float(), fused.weight, fused.bias, with_sums=False)
    torch.cuda.synchronize()

    exact = np.maximum(values.astype(np.float32) + bias, 0)
    np.testing.assert_array_equal(y32.cpu().numpy().ravel(), exact)
    np.testing.assert_array_equal(y16.cpu().numpy().ravel(), exact.astype(np.float16))
    assert y16.cpu().numpy().ravel()[:2].tolist() == [1.0, 1.0 + 2.0**-9]  # both ties went to even


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorrt_plugin_enqueue_launches_what_the_references_compute(dtype: str) -> None:
    """The body of the class-based IPluginV3's enqueue (`launch_jit`), given buffers in the order TensorRT
    passes them (the spec's inputs, then outputs), as device pointers on a stream of its own."""
    from kernels.plugin_specs import AGGREGATION_GATE, DEPTHWISE_LITECONV_SUMS
    from kernels.tensorrt_plugins import launch_jit

    shape = (3, 48, 9, 7)
    n, c, h, w = shape
    hidden = c // 16
    x, weight, bias = sanitize_run.depthwise_inputs(shape, dtype)
    rng = np.random.default_rng(1)
    fc = [(rng.standard_normal(s) / 4).astype(np.float32) for s in ((hidden, c), (hidden,), (c, hidden), (c,))]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        device = [cp.asarray(a) for a in (x, weight, bias)]
        y, sums = cp.empty(shape, dtype=dtype), cp.empty((n, c), dtype=np.float32)
        launch_jit(DEPTHWISE_LITECONV_SUMS, [shape, (c, 9), (c,)], dtype, [a.data.ptr for a in device],
                   [y.data.ptr, sums.data.ptr], stream.ptr)
        params = [cp.asarray(p) for p in fc]
        gated = cp.empty(shape, dtype=dtype)
        dims = [shape] * 4 + [(n, c)] * 4 + [p.shape for p in fc]
        launch_jit(AGGREGATION_GATE, dims, dtype, [y.data.ptr] * 4 + [sums.data.ptr] * 4 + [p.data.ptr for p in params],
                   [gated.data.ptr], stream.ptr)
        y_host, sums_host, gated_host = (cp.asnumpy(a, stream=stream) for a in (y, sums, gated))
    stream.synchronize()
    assert reference.max_relative_error(y_host, reference.depthwise_liteconv(x, weight, bias)) <= TOLERANCE_BY_NAME[dtype]
    assert reference.max_relative_error(sums_host, y_host.astype(np.float64).sum(axis=(2, 3))) <= reference.fp32_sum_tolerance(h * w)
    expected = reference.aggregation_gate([y_host] * 4, *fc, stream_sums=[sums_host] * 4)
    assert reference.max_relative_error(gated_host, expected) <= TOLERANCE_BY_NAME[dtype]
