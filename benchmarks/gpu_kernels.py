"""GPU benchmark of the fused OSNet kernels and of whole-model FP16 inference, printed as one report.

Kernels (osnet_x1_0's three stage shapes at batch 1, 32, 256; FP16 and FP32): time per launch, achieved
GB/s over the compulsory bytes (read inputs once, write outputs once) and the fraction of the device's
DRAM bandwidth, both the measured device-to-device copy and the nominal figure, next to the PyTorch
modules each kernel replaces. Every kernel and baseline is timed inside a CUDA graph of 20 launches, so
host overhead is excluded on both sides. Rows marked L2 move less than the L2 cache holds and are
cache-bound, not DRAM-bound.

Whole model (FP16, 256x128 input): batch-1 latency and images/s at a large batch for PyTorch eager
(cuDNN), eager + CUDA graphs, torch.compile(mode="max-autotune") (which uses CUDA graphs), the fused
kernels + CUDA graphs, and torchvision ResNet-50 at the same input, eager and compiled the same way.
torch.compile runs in a subprocess per model, after everything else, each under a time limit and all
of them under --compile-budget-s, so a slow autotune cannot eat the run; --skip-compile leaves them out
and --only-compile runs nothing else. The report (report.md, report.json under --out) is rewritten
after every table and every model row, so a run cut short keeps what it measured.

    PYTHONPATH=. python benchmarks/gpu_kernels.py --out "$OUT" --skip-compile
    PYTHONPATH=. python benchmarks/gpu_kernels.py --out "$OUT/compile" --only-compile
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_builder.models import create_osnet  # noqa: E402
from osnet_base.contract import INPUT_HEIGHT, INPUT_WIDTH  # noqa: E402
from engine_builder.osnet import ChannelGate, LightConv3x3  # noqa: E402
from kernels import launch  # noqa: E402
from kernels.reference import fold_batchnorm  # noqa: E402
from engine_builder.fused_osnet import fuse_osnet  # noqa: E402

logger = logging.getLogger("benchmarks.gpu_kernels")

# osnet_x1_0 at 256x128: (stage, mid channels, H, W) of the blocks' depthwise convs and gates.
STAGES = (("conv2", 64, 64, 32), ("conv3", 96, 32, 16), ("conv4", 128, 16, 8))
KERNEL_BATCHES = (1, 32, 256)
GRAPH_CALLS = 20
RESULT_PREFIX = "RESULT "
# Nominal DRAM bandwidth by device name, used only when the driver does not report clock and bus width.
NOMINAL_DRAM_GBPS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}


@dataclass(kw_only=True)
class DeviceInfo:
    name: str
    sm_count: int
    l2_bytes: int
    copy_gbps: float
    nominal_gbps: float | None


@dataclass(kw_only=True)
class KernelRow:
    op: str
    dtype: str
    stage: str
    shape: tuple[int, int, int, int]
    bytes_moved: int
    fused_us: float
    torch_us: float
    l2_resident: bool
    registers: int = 0

    def gbps(self, seconds_us: float) -> float:
        return self.bytes_moved / (seconds_us * 1e-6) / 1e9


@dataclass(kw_only=True)
class ModelRow:
    label: str
    latency_ms: float | None = None
    images_per_s: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _sync() -> None:
    torch.cuda.synchronize()


def measure_copy_gbps(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth counting read + write: the practical DRAM ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) * 1e-3) / 1e9


def nominal_dram_gbps(device_id: int, name: str) -> float | None:
    """2 (DDR) x memory clock x bus width from the driver; else a known figure by name; else None."""
    try:
        import cupy

        clock_khz = cupy.cuda.runtime.deviceGetAttribute(36, device_id)  # cudaDevAttrMemoryClockRate
        bus_bits = cupy.cuda.runtime.deviceGetAttribute(37, device_id)  # cudaDevAttrGlobalMemoryBusWidth
        if clock_khz > 0 and bus_bits > 0:
            return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    except Exception as exc:  # attribute dropped by the driver/toolkit: fall back to the table
        logger.info("memory clock not reported (%s); using the table of nominal bandwidths", exc)
    return next((gbps for key, gbps in NOMINAL_DRAM_GBPS.items() if key in name), None)


def device_info() -> DeviceInfo:
    device_id = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device_id)
    return DeviceInfo(
        name=props.name,
        sm_count=props.multi_processor_count,
        l2_bytes=int(getattr(props, "L2_cache_size", 0)),
        copy_gbps=measure_copy_gbps(),
        nominal_gbps=nominal_dram_gbps(device_id, props.name),
    )


def time_in_graph(fn: Callable[[], object], *, calls: int = GRAPH_CALLS, replays: int = 10) -> float:
    """Seconds per call of `fn`, captured `calls` times back to back in one CUDA graph (no host overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        for _ in range(calls):
            fn()
    graph.replay()
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) * 1e-3 / (replays * calls)
    del graph
    return seconds


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream  # the capture stream while a graph is being captured


def _dtype_name(dtype: torch.dtype) -> launch.KernelDtype:
    return "float16" if dtype == torch.float16 else "float32"


def bench_depthwise(n: int, c: int, h: int, w: int, dtype: torch.dtype, *, with_sums: bool) -> tuple[float, float]:
    """(fused, PyTorch) microseconds per launch of the depthwise LiteConv stage."""
    device_id = torch.cuda.current_device()
    lite = LightConv3x3(c, c).eval().to("cuda", dtype)
    bn = lite.bn
    weight, bias = fold_batchnorm(
        lite.conv2.weight.detach().float().cpu().numpy(),
        bn.weight.detach().float().cpu().numpy(),
        bn.bias.detach().float().cpu().numpy(),
        bn.running_mean.float().cpu().numpy(),
        bn.running_var.float().cpu().numpy(),
        bn.eps,
    )
    weight_t = torch.from_numpy(weight.reshape(c, 9)).cuda()
    bias_t = torch.from_numpy(bias).cuda()
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
    y = torch.empty_like(x)
    sums = torch.empty(n, c, device="cuda", dtype=torch.float32) if with_sums else None

    def fused() -> None:
        launch.launch_depthwise_liteconv(
            x=x.data_ptr(),
            weight=weight_t.data_ptr(),
            bias=bias_t.data_ptr(),
            y=y.data_ptr(),
            sums=None if sums is None else sums.data_ptr(),
            n=n,
            c=c,
            h=h,
            w=w,
            dtype=_dtype_name(dtype),
            stream=_stream(),
            device_id=device_id,
        )

    def eager() -> torch.Tensor:
        out = lite.relu(lite.bn(lite.conv2(x)))
        return out.sum(dim=(2, 3)) if with_sums else out  # the sums the gate's pooling would need

    return time_in_graph(fused) * 1e6, time_in_graph(eager) * 1e6


def bench_gate(n: int, c: int, h: int, w: int, dtype: torch.dtype) -> tuple[float, float]:
    """(fused, PyTorch) microseconds per aggregation gate over four streams."""
    device_id = torch.cuda.current_device()
    gate = ChannelGate(c).eval().to("cuda", dtype)
    hidden = gate.fc1.weight.shape[0]
    params = [
        gate.fc1.weight.detach().reshape(hidden, c).float().contiguous(),
        gate.fc1.bias.detach().float(),
        gate.fc2.weight.detach().reshape(c, hidden).float().contiguous(),
        gate.fc2.bias.detach().float(),
    ]
    streams = [torch.randn(n, c, h, w, device="cuda", dtype=dtype).relu_() for _ in range(4)]
    sums = [s.float().sum(dim=(2, 3)) for s in streams]
    y = torch.empty_like(streams[0])

    def fused() -> None:
        launch.launch_aggregation_gate(
            streams=tuple(s.data_ptr() for s in streams),
            stream_sums=tuple(s.data_ptr() for s in sums),
            fc1_weight=params[0].data_ptr(),
            fc1_bias=params[1].data_ptr(),
            fc2_weight=params[2].data_ptr(),
            fc2_bias=params[3].data_ptr(),
            y=y.data_ptr(),
            n=n,
            c=c,
            hidden=hidden,
            h=h,
            w=w,
            dtype=_dtype_name(dtype),
            stream=_stream(),
            device_id=device_id,
        )

    def eager() -> torch.Tensor:
        return gate(streams[0]) + gate(streams[1]) + gate(streams[2]) + gate(streams[3])

    return time_in_graph(fused) * 1e6, time_in_graph(eager) * 1e6


def kernel_rows(
    info: DeviceInfo, batches: Sequence[int], dtypes: Sequence[torch.dtype], done: Callable[[KernelRow], None]
) -> None:
    """Every kernel at every stage shape and batch; `done` gets each row as it is measured."""
    resources = launch.prepare_kernels(torch.cuda.current_device())
    for dtype in dtypes:
        name = _dtype_name(dtype)
        for stage, c, h, w in STAGES:
            for n in batches:
                shape = (n, c, h, w)
                for with_sums in (False, True):
                    fused_us, torch_us = bench_depthwise(n, c, h, w, dtype, with_sums=with_sums)
                    moved = launch.bytes_moved_depthwise(n, c, h, w, name, with_sums=with_sums)
                    entry = launch.depthwise_entry_point(name, with_sums=with_sums)
                    done(
                        KernelRow(
                            op=entry,
                            dtype=name,
                            stage=stage,
                            shape=shape,
                            bytes_moved=moved,
                            fused_us=fused_us,
                            torch_us=torch_us,
                            l2_resident=moved < info.l2_bytes,
                            registers=resources[entry]["registers"],
                        )
                    )
                    logger.info("%s %s: %.1f us (torch %.1f us)", entry, shape, fused_us, torch_us)
                fused_us, torch_us = bench_gate(n, c, h, w, dtype)
                moved = launch.bytes_moved_gate(n, c, h, w, name)
                entry = launch.gate_entry_point(name)
                done(
                    KernelRow(
                        op=entry,
                        dtype=name,
                        stage=stage,
                        shape=shape,
                        bytes_moved=moved,
                        fused_us=fused_us,
                        torch_us=torch_us,
                        l2_resident=moved < info.l2_bytes,
                        registers=resources[entry]["registers"],
                    )
                )
                logger.info("%s %s: %.1f us (torch %.1f us)", entry, shape, fused_us, torch_us)
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Whole models.


def build_model(name: str, dtype: torch.dtype = torch.float16) -> nn.Module:
    if name == "resnet50":
        import torchvision

        model: nn.Module = torchvision.models.resnet50(weights=None)
    else:
        model = create_osnet(name)
    return model.eval().to("cuda", dtype)


def _images(batch: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.randn(batch, 3, INPUT_HEIGHT, INPUT_WIDTH, device="cuda", dtype=dtype)


def latency_ms(run: Callable[[], object], *, iters: int = 100, warmup: int = 10) -> float:
    """Median wall-clock milliseconds of one call, synchronised: the latency a caller sees."""
    for _ in range(warmup):
        run()
    _sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def images_per_s(run: Callable[[], object], batch: int, *, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    _sync()
    return batch * iters / (time.perf_counter() - start)


def graphed(model: nn.Module, batch: int) -> Callable[[], object]:
    """`model` captured in a CUDA graph for a static [batch, 3, 256, 128] input; returns the replay."""
    static_input = _images(batch)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(static_input)
    return graph.replay


def eager_run(model: nn.Module, batch: int) -> Callable[[], object]:
    images = _images(batch)

    def run() -> object:
        with torch.no_grad():
            return model(images)

    return run


def measure(label: str, make_run: Callable[[int], Callable[[], object]], large_batch: int) -> ModelRow:
    row = ModelRow(label=label)
    row.latency_ms = latency_ms(make_run(1))
    row.images_per_s = images_per_s(make_run(large_batch), large_batch)
    logger.info("%s: %.3f ms at batch 1, %.0f img/s at batch %d", label, row.latency_ms, row.images_per_s, large_batch)
    torch.cuda.empty_cache()
    return row


def compiled_row_in_subprocess(model_name: str, label: str, large_batch: int, mode: str, timeout_s: float) -> ModelRow:
    """torch.compile in a fresh process (clean compiler state, killable on a time limit)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker-compile",
        model_name,
        "--model-batch",
        str(large_batch),
        "--compile-mode",
        mode,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    # A session of its own: on timeout the inductor's compile workers go down with it.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return ModelRow(label=label, note=f"compile+measure exceeded {timeout_s:.0f} s")
    result = next((line[len(RESULT_PREFIX) :] for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)), None)
    if process.returncode != 0 or result is None:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return ModelRow(label=label, note=f"failed (rc {process.returncode}): {' | '.join(tail)}")
    data = json.loads(result)
    return ModelRow(
        label=label,
        latency_ms=data["latency_ms"],
        images_per_s=data["images_per_s"],
        note=f"compile {data['compile_s']:.0f} s, wall {time.perf_counter() - start:.0f} s",
    )


def compile_worker(model_name: str, large_batch: int, mode: str) -> int:
    """Child process: compile `model_name` (FP16) with `mode` for batch 1 and `large_batch`, print RESULT json."""
    model = build_model(model_name)
    compiled = torch.compile(model, mode=mode, dynamic=False)
    compile_s = 0.0

    def make_run(batch: int) -> Callable[[], object]:
        nonlocal compile_s
        images = _images(batch)

        def run() -> object:
            torch.compiler.cudagraph_mark_step_begin()  # outputs of earlier replays are not kept
            with torch.no_grad():
                return compiled(images)

        start = time.perf_counter()
        run()
        _sync()
        compile_s += time.perf_counter() - start
        return run

    latency = latency_ms(make_run(1))
    throughput = images_per_s(make_run(large_batch), large_batch)
    print(RESULT_PREFIX + json.dumps({"latency_ms": latency, "images_per_s": throughput, "compile_s": compile_s}))
    return 0


def model_rows(large_batch: int, done: Callable[[ModelRow], None]) -> None:
    """Eager, CUDA-graphed and fused osnet_x1_0, and eager ResNet-50; `done` gets each row as it is measured."""
    osnet = build_model("osnet_x1_0")
    done(measure("osnet_x1_0 PyTorch eager (cuDNN)", lambda b: eager_run(osnet, b), large_batch))
    done(measure("osnet_x1_0 PyTorch eager + CUDA graphs", lambda b: graphed(osnet, b), large_batch))
    fused = fuse_osnet(osnet)
    done(measure("osnet_x1_0 fused kernels + CUDA graphs", lambda b: graphed(fused, b), large_batch))
    osnet = fused = None
    resnet = build_model("resnet50")
    done(measure("resnet50 PyTorch eager (cuDNN)", lambda b: eager_run(resnet, b), large_batch))
    resnet = None  # free it before the compile subprocesses need the memory
    torch.cuda.empty_cache()


def compiled_rows(large_batch: int, mode: str, timeout_s: float, budget_s: float, done: Callable[[ModelRow], None]) -> None:
    """torch.compile of osnet_x1_0 and ResNet-50, one subprocess each, within `budget_s` in all."""
    deadline = time.monotonic() + budget_s
    for name in ("osnet_x1_0", "resnet50"):
        label = f"{name} torch.compile({mode})"
        limit = min(timeout_s, deadline - time.monotonic())
        if limit < 10:
            done(ModelRow(label=label, note=f"not run: the compile budget of {budget_s:.0f} s was spent"))
            continue
        logger.info("%s: compiling in a subprocess (limit %.0f s)", label, limit)
        done(compiled_row_in_subprocess(name, label, large_batch, mode, limit))


# ---------------------------------------------------------------------------------------------------
# Report.


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render(info: DeviceInfo, kernels: Sequence[KernelRow], models: Sequence[ModelRow], large_batch: int) -> str:
    nominal = f"{info.nominal_gbps:.0f} GB/s nominal" if info.nominal_gbps else "nominal DRAM bandwidth unknown"
    lines = [
        f"# osnet-triton fused kernels on {info.name} ({info.sm_count} SMs, L2 {info.l2_bytes / 2**20:.0f} MiB)",
        f"DRAM: {info.copy_gbps:.0f} GB/s measured device-to-device copy (read + write), {nominal}.",
        "",
        "| kernel | dtype | stage | N,C,H,W | regs | fused us | GB/s | % copy | % nominal | torch us | speedup | |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in kernels:
        gbps = row.gbps(row.fused_us)
        nominal_pct = 100 * gbps / info.nominal_gbps if info.nominal_gbps else None
        lines.append(
            f"| {row.op} | {row.dtype} | {row.stage} | {','.join(map(str, row.shape))} | {row.registers} | "
            f"{row.fused_us:.1f} | {gbps:.0f} | {100 * gbps / info.copy_gbps:.0f} | {_fmt(nominal_pct, '.0f')} | "
            f"{row.torch_us:.1f} | {row.torch_us / row.fused_us:.2f}x | {'L2' if row.l2_resident else ''} |"
        )
    lines += [
        "",
        f"| model (FP16, 256x128) | batch-1 latency ms | img/s at batch {large_batch} | note |",
        "|---|---:|---:|---|",
    ]
    lines += [
        f"| {row.label} | {_fmt(row.latency_ms, '.3f')} | {_fmt(row.images_per_s, '.0f')} | {row.note} |"
        for row in models
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for gpu_kernels_report.md and .json")
    parser.add_argument("--kernel-batches", type=int, nargs="+", default=list(KERNEL_BATCHES))
    parser.add_argument("--kernel-dtypes", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    parser.add_argument("--model-batch", type=int, default=256, help="batch of the img/s column")
    parser.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for the compiled rows")
    parser.add_argument("--compile-timeout-s", type=float, default=240.0, help="limit per compiled model")
    parser.add_argument("--compile-budget-s", type=float, default=360.0, help="limit for all compiled models together")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    which.add_argument("--only-compile", action="store_true", help="the torch.compile rows alone")
    parser.add_argument("--skip-models", action="store_true", help="kernel table only")
    parser.add_argument("--worker-compile", metavar="MODEL", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class Report:
    """The report so far, rewritten to --out after each table and each model row."""

    def __init__(self, info: DeviceInfo, out: Path | None, large_batch: int):
        self.info, self.out, self.large_batch = info, out, large_batch
        self.kernels: list[KernelRow] = []
        self.models: list[ModelRow] = []
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)

    def add_kernel(self, row: KernelRow) -> None:
        self.kernels.append(row)
        self.write()

    def add_model(self, row: ModelRow) -> None:
        self.models.append(row)
        self.write()

    def render(self) -> str:
        return render(self.info, self.kernels, self.models, self.large_batch)

    def write(self) -> None:
        if self.out is None:
            return
        (self.out / "gpu_kernels_report.md").write_text(self.render() + "\n")
        payload = {
            "device": asdict(self.info),
            "kernels": [asdict(k) for k in self.kernels],
            "models": [asdict(m) for m in self.models],
        }
        (self.out / "gpu_kernels_report.json").write_text(json.dumps(payload, indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not torch.cuda.is_available():
        logger.error("no CUDA device: this benchmark runs on the GPU machine")
        return 2
    torch.backends.cudnn.benchmark = True
    if args.worker_compile:
        return compile_worker(args.worker_compile, args.model_batch, args.compile_mode)

    info = device_info()
    logger.info("%s", info)
    report = Report(info, args.out, args.model_batch)
    report.write()
    if not args.only_compile:
        dtypes = [torch.float16 if d == "float16" else torch.float32 for d in args.kernel_dtypes]
        kernel_rows(info, args.kernel_batches, dtypes, report.add_kernel)
        if not args.skip_models:
            model_rows(args.model_batch, report.add_model)
    if not args.skip_compile:
        compiled_rows(args.model_batch, args.compile_mode, args.compile_timeout_s, args.compile_budget_s, report.add_model)
    print(report.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
