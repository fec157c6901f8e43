"""Launch arithmetic of the fused kernels on CPU: the plans cover every plane with whole planes per CTA
and fill the GPU, the constants mirror the CUDA sources, and the CuPy launchers pass exactly each
kernel's C signature (checked with a recording stand-in for CuPy's launch API)."""

from __future__ import annotations

import math
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from kernels import launch

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

        class Kernel:
            num_regs, local_size_bytes, shared_size_bytes = 72, 0, 0

            def __init__(self, name: str) -> None:
                self.name = name

            def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0, stream=None) -> None:
                # CuPy launches on `stream.ptr`, or on its current stream when stream is None.
                recorder.launches.append(
                    {
                        "name": self.name,
                        "grid": grid,
                        "block": block,
                        "args": args,
                        "shared_mem": shared_mem,
                        "stream": None if stream is None else stream.ptr,
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
            UnownedMemory=Memory, MemoryPointer=MemoryPointer, Device=Device
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
