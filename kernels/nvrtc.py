"""NVRTC through cuda-bindings: the PTX a TensorRT AOT plugin embeds, compiled as CI compiles it.

Two paths compile the same header-free `.cu` files at run time, with different options:
- AOT plugins (`kernels/tensorrt_plugins.py`): `AOT_OPTIONS` for `AOT_ARCH`, PTX that the driver of
  the serving machine JIT-compiles. The pinned NVRTC (13.0) writes PTX ISA 9.0, which every CUDA 13
  driver accepts; a newer NVRTC would write a newer ISA that older drivers refuse.
- CuPy's RawModule (`kernels/launch.py`, JIT plugins and the fused PyTorch model): our
  `launch.NVRTC_OPTIONS`, to which CuPy 14 adds `CUPY_RAWMODULE_ADDED_OPTIONS` (and include paths the
  sources do not need) and `-arch=sm_XX` for the device at hand.
AOT_OPTIONS carries CuPy's `-ftz=true` too, so an AOT engine and a JIT one compute the same bits.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kernels.launch import KERNEL_DIR, NVRTC_OPTIONS
from osnet_base.errors import OsnetTritonError

logger = logging.getLogger(__name__)

AOT_ARCH = "compute_90"
AOT_OPTIONS = (*NVRTC_OPTIONS, "-ftz=true")
# cupy/cuda/compiler.py (_compile_with_cache_cuda, _compile_using_nvrtc) appends these to ours.
CUPY_RAWMODULE_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
CUPY_RAWMODULE_OPTIONS = (*NVRTC_OPTIONS, *CUPY_RAWMODULE_ADDED_OPTIONS)


class NvrtcError(OsnetTritonError):
    """NVRTC is missing, or refused a source; the message holds its log."""


@dataclass(frozen=True, kw_only=True)
class CompiledSource:
    source: str
    arch: str  # compute_XX gives PTX, sm_XX a cubin
    options: tuple[str, ...]
    code: bytes  # PTX text or cubin
    log: str  # NVRTC's messages: empty when it had nothing to say (no warnings)
    seconds: float

    @property
    def ptx(self) -> str:
        if not self.arch.startswith("compute_"):
            raise ValueError(f"{self.arch} gives a cubin, not PTX")
        return self.code.decode()


def _bindings():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise NvrtcError("cuda-bindings is not installed (pip install -e .[nvrtc]): NVRTC compiles the AOT plugins' PTX") from None
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _bindings()
    error, major, minor = nvrtc.nvrtcVersion()
    if error != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcError(f"NVRTC is not usable: {error!r} (is nvidia-cuda-nvrtc installed?)")
    return major, minor


def _checked(nvrtc, result):
    error, *values = result
    if error != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcError(f"NVRTC call failed: {error!r}")
    return values[0] if len(values) == 1 else values


def compile_source(source: str, arch: str, options: Sequence[str]) -> CompiledSource:
    """Compile kernels/<source> with NVRTC for `arch` (compute_XX -> PTX, sm_XX -> cubin)."""
    nvrtc = _bindings()
    code = (KERNEL_DIR / source).read_bytes()
    arguments = [option.encode() for option in (*options, f"-arch={arch}")]
    started = time.perf_counter()
    program = _checked(nvrtc, nvrtc.nvrtcCreateProgram(code, source.encode(), 0, [], []))
    try:
        (status,) = nvrtc.nvrtcCompileProgram(program, len(arguments), arguments)
        log = bytearray(_checked(nvrtc, nvrtc.nvrtcGetProgramLogSize(program)))
        _checked(nvrtc, nvrtc.nvrtcGetProgramLog(program, log))
        text = bytes(log).rstrip(b"\0").decode(errors="replace").strip()
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise NvrtcError(f"NVRTC failed on {source} ({arch}, {' '.join(options)}):\n{text}")
        if arch.startswith("compute_"):
            size, getter = nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX
        else:
            size, getter = nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN
        output = bytearray(_checked(nvrtc, size(program)))
        _checked(nvrtc, getter(program, output))
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    seconds = time.perf_counter() - started
    logger.info("NVRTC %s for %s in %.2f s", source, arch, seconds)
    return CompiledSource(source=source, arch=arch, options=tuple(options), code=bytes(output).rstrip(b"\0"),
                          log=text, seconds=seconds)


@functools.cache
def aot_ptx(source: str) -> str:
    """The PTX of one `.cu` that TensorRT AOT plugins embed (compiled once per process)."""
    return compile_source(source, AOT_ARCH, AOT_OPTIONS).ptx
