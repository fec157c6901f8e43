"""Which TensorRT this process builds engines with: the one place that chooses the Python module.

The project's build code runs unchanged on either library; where they differ, the difference is a
field of `TensorRTLibrary` and the code asks for it by name:

- TensorRT (`import tensorrt`, 10.9+ or 11.x). Builds on a GPU; its plans are what Triton's
  `tensorrt_plan` backend serves; it has `tensorrt.plugin` (Quickly Deployable Plugins), the only
  way to put a plugin's kernel into the plan as PTX (AOT).
- TensorRT-RTX (`import tensorrt_rtx_bindings`, 1.7; the wheels are `tensorrt-rtx-cu13-libs` and
  `tensorrt-rtx-cu13-bindings`, with no `tensorrt_rtx` alias). Builds with no GPU at all, which is
  why CI builds through it. Its plans run only on the compute capabilities of its
  `ComputeCapability` enum (7.5, 8.0, 8.6, 8.9, 12.x in 1.7: not 9.0, so not on an H100/H200), and
  Triton does not load them. It has no `tensorrt.plugin`: the fused ops register as class-based
  IPluginV3 plugins, the same classes TensorRT uses for JIT plugins.

Both are strongly typed where this project uses them (precision comes from the ONNX graph).
TensorRT wins when both are importable.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from osnet_base.errors import OsnetTritonError

logger = logging.getLogger(__name__)

MIN_TENSORRT = (10, 9)
TENSORRT_MODULE = "tensorrt"
TENSORRT_RTX_MODULE = "tensorrt_rtx_bindings"
# TensorRT-RTX 1.7's ONNX parser dlopens the core library by this unversioned name to add a plugin
# layer, but the wheel ships only `libtensorrt_rtx.so.1`: without the link, the first plugin node
# of a graph aborts the process (std::terminate inside the parser).
RTX_PARSER_LOADS = "libtensorrt_rtx.so"
RTX_CORE_LIBRARY = "libtensorrt_rtx.so.1"


class TensorRTUnavailableError(OsnetTritonError):
    """No usable TensorRT or TensorRT-RTX here, or not for what was asked of it."""


@dataclass(frozen=True)
class TensorRTLibrary:
    """The imported TensorRT bindings and how this library differs from the other one."""

    name: str  # "TensorRT" or "TensorRT-RTX"
    module: ModuleType
    version: str
    quick_plugins: bool  # `tensorrt.plugin` importable: AOT plugins (PTX in the plan) can be built
    needs_gpu_to_build: bool
    timing_cache: bool  # tactics timed on the build GPU and cached; TensorRT-RTX's CPU build has no device to time on
    served_by_triton: bool  # Triton's tensorrt_plan backend loads these plans
    runs_on: str  # the GPUs its engines execute on, in words

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def network_flags(self) -> int:
        """Strongly typed network: precision from the graph. TensorRT 11 has no flag (it is always so)."""
        flag = getattr(self.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)

    def plugin_layers_unavailable_reason(self) -> str | None:
        """None when the ONNX parser can add plugin layers here, else why not and how to fix it."""
        if self.name != "TensorRT-RTX":
            return None
        libraries = rtx_library_dir()
        if (libraries / RTX_PARSER_LOADS).exists():
            return None
        return (f"TensorRT-RTX {self.version}'s ONNX parser loads {RTX_PARSER_LOADS}, which its wheel does not ship "
                f"(only {RTX_CORE_LIBRARY}, in {libraries}); without it every plugin node aborts the process. "
                f"Run `{Path(sys.executable).name} -m kernels.tensorrt_library --link-rtx-parser-library` "
                "(`make` does this when it installs the wheels)")


def rtx_library_dir() -> Path:
    """Where the tensorrt-rtx-*-libs wheel put its shared libraries."""
    import tensorrt_rtx_libs

    return Path(tensorrt_rtx_libs.__file__).resolve().parent


def link_rtx_parser_library() -> Path:
    """Give TensorRT-RTX's parser the unversioned name it dlopens, beside the wheel's library."""
    libraries = rtx_library_dir()
    link = libraries / RTX_PARSER_LOADS
    if not link.exists():
        link.symlink_to(RTX_CORE_LIBRARY)
        logger.info("linked %s -> %s (TensorRT-RTX's ONNX parser loads it to add plugin layers)", link, RTX_CORE_LIBRARY)
    return link


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def rtx_compute_capabilities(module: ModuleType) -> list[str]:
    """The compute capabilities TensorRT-RTX can build for, from its own enum (SM86 -> "8.6")."""
    names = [name for name in dir(module.ComputeCapability) if name.startswith("SM")]
    return [f"{name[2:-1]}.{name[-1]}" for name in sorted(names, key=lambda n: int(n[2:]))]


def _tensorrt(module: ModuleType) -> TensorRTLibrary:
    try:
        importlib.import_module(f"{TENSORRT_MODULE}.plugin")
        quick_plugins = True
    except ImportError:
        quick_plugins = False
    return TensorRTLibrary(name="TensorRT", module=module, version=module.__version__, quick_plugins=quick_plugins,
                           needs_gpu_to_build=True, timing_cache=True, served_by_triton=True, runs_on="the GPU model it was built on")


def _tensorrt_rtx(module: ModuleType) -> TensorRTLibrary:
    capabilities = rtx_compute_capabilities(module)
    return TensorRTLibrary(name="TensorRT-RTX", module=module, version=module.__version__, quick_plugins=False,
                           needs_gpu_to_build=False, timing_cache=False, served_by_triton=False,
                           runs_on=f"compute capability {', '.join(capabilities)} (7.5 only if built for it)")


@functools.cache
def load_tensorrt() -> TensorRTLibrary:
    """TensorRT if importable (and >= 10.9), else TensorRT-RTX; raises TensorRTUnavailableError."""
    try:
        module = importlib.import_module(TENSORRT_MODULE)
    except ImportError:
        module = None
    if module is not None:
        if _version_tuple(module.__version__) < MIN_TENSORRT:
            raise TensorRTUnavailableError(f"TensorRT {module.__version__} is too old: the fused plugins need >= 10.9")
        return _tensorrt(module)
    try:
        return _tensorrt_rtx(importlib.import_module(TENSORRT_RTX_MODULE))
    except ImportError:
        raise TensorRTUnavailableError(
            "neither TensorRT (>= 10.9) nor TensorRT-RTX is installed: `pip install -e .[tensorrt-rtx]` builds engines "
            "with no GPU; serving them needs TensorRT and an NVIDIA GPU") from None


def tensorrt_unavailable_reason() -> str | None:
    """None when some TensorRT library can be imported here, else why not."""
    try:
        load_tensorrt()
    except TensorRTUnavailableError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Report which TensorRT this environment builds with.")
    parser.add_argument("--link-rtx-parser-library", action="store_true",
                        help=f"create {RTX_PARSER_LOADS} beside TensorRT-RTX's {RTX_CORE_LIBRARY} (see the module docstring)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.link_rtx_parser_library:
        logger.info("%s", link_rtx_parser_library())
    try:
        library = load_tensorrt()
    except TensorRTUnavailableError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("%s: AOT plugins %s; builds %s; plans served by Triton: %s; engines run on %s", library.label,
                "yes" if library.quick_plugins else "no", "on a GPU only" if library.needs_gpu_to_build else "with no GPU",
                "yes" if library.served_by_triton else "no", library.runs_on)
    reason = library.plugin_layers_unavailable_reason()
    if reason:
        logger.error("%s", reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
