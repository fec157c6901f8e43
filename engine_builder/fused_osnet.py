"""Run an eval-mode OSNet with the fused kernels: `fuse_osnet(model)`.

Every omni-scale block (`OSBlock`, `OSBlockAIN`) is replaced by a `FusedOSBlock` that keeps the 1x1
convolutions as they are (cuDNN, tensor cores) and runs
- each Lite 3x3's depthwise conv + BatchNorm + ReLU as one `depthwise_liteconv` launch, the last one of
  each stream also writing the per-channel sums the gate needs;
- the four gate applications and the three adds as one `aggregation_gate` launch.

On CUDA the kernels run on torch's current stream with tensors passed by pointer (zero-copy; no
`__cuda_array_interface__`, whose consumers may synchronise the stream), so a fused model can be
captured with `torch.cuda.graph`. On CPU the same rewrite runs the NumPy references instead, which is
how CI checks the rewrite without a GPU.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from osnet_base.errors import OsnetTritonError
from engine_builder.osnet import ChannelGate, LightConv3x3, OSBlock
from engine_builder.osnet_ain import LightConvStream, OSBlockAIN
from kernels import launch, reference

logger = logging.getLogger(__name__)

Backend = Literal["auto", "cuda", "reference"]

_KERNEL_DTYPES: dict[torch.dtype, launch.KernelDtype] = {torch.float32: "float32", torch.float16: "float16"}


class FusionError(OsnetTritonError):
    """A model, block or tensor the fused OSNet path cannot handle."""


class FusedOps(Protocol):
    """The two fused ops, on torch tensors."""

    def depthwise(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, with_sums: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def gate(
        self,
        streams: Sequence[torch.Tensor],
        stream_sums: Sequence[torch.Tensor],
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor,
    ) -> torch.Tensor: ...


def _kernel_dtype(x: torch.Tensor) -> launch.KernelDtype:
    try:
        return _KERNEL_DTYPES[x.dtype]
    except KeyError:
        raise FusionError(f"fused kernels take float32 or float16 activations, got {x.dtype}") from None


def _nchw(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        raise FusionError(f"fused kernels take NCHW activations, got shape {tuple(x.shape)}")
    return x.contiguous()  # no-op for the conv outputs that feed the kernels


class CudaFusedOps:
    """The CUDA kernels, launched through CuPy on torch's current stream."""

    def depthwise(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, with_sums: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = _nchw(x)
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        sums = torch.empty((n, c), dtype=torch.float32, device=x.device) if with_sums else None
        launch.launch_depthwise_liteconv(
            x=x.data_ptr(),
            weight=weight.data_ptr(),
            bias=bias.data_ptr(),
            y=y.data_ptr(),
            sums=None if sums is None else sums.data_ptr(),
            n=n,
            c=c,
            h=h,
            w=w,
            dtype=_kernel_dtype(x),
            stream=torch.cuda.current_stream(x.device).cuda_stream,
            device_id=x.device.index,
        )
        return y, sums

    def gate(
        self,
        streams: Sequence[torch.Tensor],
        stream_sums: Sequence[torch.Tensor],
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor,
    ) -> torch.Tensor:
        streams = [_nchw(s) for s in streams]
        n, c, h, w = streams[0].shape
        y = torch.empty_like(streams[0])
        launch.launch_aggregation_gate(
            streams=tuple(s.data_ptr() for s in streams),
            stream_sums=tuple(s.data_ptr() for s in stream_sums),
            fc1_weight=fc1_weight.data_ptr(),
            fc1_bias=fc1_bias.data_ptr(),
            fc2_weight=fc2_weight.data_ptr(),
            fc2_bias=fc2_bias.data_ptr(),
            y=y.data_ptr(),
            n=n,
            c=c,
            hidden=fc1_weight.shape[0],
            h=h,
            w=w,
            dtype=_kernel_dtype(streams[0]),
            stream=torch.cuda.current_stream(y.device).cuda_stream,
            device_id=y.device.index,
        )
        return y


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class ReferenceFusedOps:
    """The NumPy references (any device, slow): checks the rewrite where no GPU is available."""

    def depthwise(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, with_sums: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _kernel_dtype(x)
        y, sums = reference.depthwise_liteconv(_numpy(_nchw(x)), _numpy(weight), _numpy(bias), with_sums=True)
        return torch.from_numpy(y).to(x.device), torch.from_numpy(sums).to(x.device) if with_sums else None

    def gate(
        self,
        streams: Sequence[torch.Tensor],
        stream_sums: Sequence[torch.Tensor],
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor,
    ) -> torch.Tensor:
        y = reference.aggregation_gate(
            [_numpy(_nchw(s)) for s in streams],
            _numpy(fc1_weight),
            _numpy(fc1_bias),
            _numpy(fc2_weight),
            _numpy(fc2_bias),
            stream_sums=[_numpy(s) for s in stream_sums],
        )
        return torch.from_numpy(y).to(streams[0].device)


def _fp32_buffer(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32)).to(device)


class FusedLiteConv(nn.Module):
    """A Lite 3x3 whose depthwise conv + BN + ReLU is one kernel; the 1x1 pointwise stays a Conv2d."""

    def __init__(self, lite: LightConv3x3, ops: FusedOps):
        super().__init__()
        bn = lite.bn
        if bn.running_mean is None or bn.running_var is None:
            raise FusionError("a BatchNorm without running statistics cannot be folded into the kernel")
        weight, bias = reference.fold_batchnorm(
            _numpy(lite.conv2.weight),
            None if bn.weight is None else _numpy(bn.weight),
            None if bn.bias is None else _numpy(bn.bias),
            _numpy(bn.running_mean),
            _numpy(bn.running_var),
            bn.eps,
        )
        device = lite.conv2.weight.device
        self.pointwise = lite.conv1
        # FP32 whatever the activations' dtype: they feed the kernels' FP32 accumulation.
        self.register_buffer("weight", _fp32_buffer(weight.reshape(-1, 9), device))
        self.register_buffer("bias", _fp32_buffer(bias, device))
        self.ops = ops

    def forward(self, x: torch.Tensor, with_sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.ops.depthwise(self.pointwise(x), self.weight, self.bias, with_sums=with_sums)


def _check_fp32(*buffers: torch.Tensor) -> None:
    if any(b.dtype != torch.float32 for b in buffers):
        raise FusionError(
            "the fused model keeps its folded weights in FP32; convert the model (.half(), .cuda()) before "
            "fuse_osnet, not after"
        )


def _lite_convs(stream: nn.Module) -> list[LightConv3x3]:
    """The Lite 3x3 chain of a stream: a LightConv3x3, a Sequential of them, or osnet_ain's LightConvStream."""
    lites = [m for m in stream.modules() if isinstance(m, LightConv3x3)]
    inside_lites = {id(sub) for lite in lites for sub in lite.modules()}
    unexpected = [
        type(m).__name__
        for m in stream.modules()
        if id(m) not in inside_lites and not isinstance(m, nn.Sequential | LightConvStream)
    ]
    if not lites or unexpected:
        raise FusionError(f"stream {type(stream).__name__} is not a plain chain of LightConv3x3: {unexpected}")
    return lites


class FusedOSBlock(nn.Module):
    """An omni-scale block whose four streams' depthwise stages and aggregation gate run fused."""

    def __init__(self, block: OSBlock | OSBlockAIN, ops: FusedOps):
        super().__init__()
        gate: ChannelGate = block.gate
        self.conv1 = block.conv1
        self.streams = nn.ModuleList(
            nn.ModuleList(FusedLiteConv(lite, ops) for lite in _lite_convs(stream)) for stream in block.streams()
        )
        if len(self.streams) != reference.NUM_STREAMS:
            raise FusionError(f"the aggregation gate kernel takes 4 streams, block has {len(self.streams)}")
        device = gate.fc1.weight.device
        hidden, channels = gate.fc1.weight.shape[:2]
        self.register_buffer("fc1_weight", _fp32_buffer(_numpy(gate.fc1.weight).reshape(hidden, channels), device))
        self.register_buffer("fc1_bias", _fp32_buffer(_numpy(gate.fc1.bias), device))
        self.register_buffer("fc2_weight", _fp32_buffer(_numpy(gate.fc2.weight).reshape(channels, hidden), device))
        self.register_buffer("fc2_bias", _fp32_buffer(_numpy(gate.fc2.bias), device))
        self.conv3 = block.conv3
        self.downsample = block.downsample
        self.IN = block.IN
        # The block's own tail (OSBlock and OSBlockAIN place instance norm differently), run on our
        # conv3 / downsample / IN, which are the block's modules.
        self._residual_output = type(block).residual_output
        self.ops = ops

    def aggregate(self, x1: torch.Tensor) -> torch.Tensor:
        """sum_t gate(stream_t(x1)), fused: what the unfused block computes as `x2`."""
        outputs: list[torch.Tensor] = []
        stream_sums: list[torch.Tensor] = []
        for stream in self.streams:
            h, sums = x1, None
            for index, lite in enumerate(stream):
                h, sums = lite(h, with_sums=index == len(stream) - 1)
            assert sums is not None  # the last Lite 3x3 of a stream always writes sums
            outputs.append(h)
            stream_sums.append(sums)
        return self.ops.gate(outputs, stream_sums, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_fp32(*self.buffers(recurse=False), *(b for s in self.streams for lite in s for b in lite.buffers()))
        return self._residual_output(self, x, self.aggregate(self.conv1(x)))


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _make_ops(backend: Backend, device: torch.device) -> FusedOps:
    if backend == "auto":
        backend = "cuda" if device.type == "cuda" else "reference"
    if backend == "reference":
        return ReferenceFusedOps()
    if backend != "cuda":
        raise FusionError(f"unknown backend {backend!r}; choose auto, cuda or reference")
    if device.type != "cuda":
        raise FusionError("the cuda backend needs the model on a CUDA device; move it there before fusing")
    launch.prepare_kernels(device.index if device.index is not None else torch.cuda.current_device())
    return CudaFusedOps()


def fuse_osnet(model: nn.Module, *, backend: Backend = "auto") -> nn.Module:
    """A copy of eval-mode `model` (any OSNet / OSNet-AIN variant) whose blocks run the fused kernels.

    Convert the model to its final device and dtype first (`.cuda().half()`): the BatchNorms are folded
    from the parameters as they are now. `backend="auto"` uses the CUDA kernels for a CUDA model and the
    NumPy references otherwise. The copy is for inference only (parameters do not require grad) and
    can be captured in a CUDA graph after one warm-up call, as any model.
    """
    if model.training:
        raise FusionError("fuse_osnet folds BatchNorm running statistics: call model.eval() first")
    ops = _make_ops(backend, _model_device(model))
    fused = copy.deepcopy(model)
    replaced = 0
    for parent in list(fused.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, OSBlock | OSBlockAIN):
                setattr(parent, name, FusedOSBlock(child, ops))
                replaced += 1
    if replaced == 0:
        raise FusionError(f"{type(model).__name__} has no OSBlock to fuse")
    fused.requires_grad_(False)
    logger.info("fused %d omni-scale blocks of %s (%s ops)", replaced, type(model).__name__, type(ops).__name__)
    return fused.eval()
