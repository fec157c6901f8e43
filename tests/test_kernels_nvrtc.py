"""Both CUDA sources compile with NVRTC (cuda-bindings and the pinned NVRTC wheel, no GPU needed), with
the options of each run-time path, for compute_80 and compute_90: the AOT plugins' PTX
(`kernels.nvrtc.AOT_OPTIONS`) and CuPy's RawModule (`launch.NVRTC_OPTIONS` plus what CuPy 14 adds).
NVRTC must have nothing to say (no warnings), and every extern "C" entry point must be in the PTX
unmangled, since TensorRT and CuPy look the kernels up by name. Each combination compiles once."""

from __future__ import annotations

import re

import pytest

from kernels import launch, nvrtc
from kernels.compile_check import expected_entry_points, ptx_entry_points

ARCHS = ("compute_80", "compute_90")
OPTION_SETS = {"aot": nvrtc.AOT_OPTIONS, "cupy-rawmodule": nvrtc.CUPY_RAWMODULE_OPTIONS}


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str, str], nvrtc.CompiledSource]:
    return {
        (source, arch, path): nvrtc.compile_source(source, arch, options)
        for source in launch.KERNEL_SOURCES
        for arch in ARCHS
        for path, options in OPTION_SETS.items()
    }


def test_nvrtc_is_the_pinned_13_0() -> None:
    assert nvrtc.nvrtc_version() == (13, 0)  # PTX ISA 9.0: JIT-compiled by every CUDA 13 driver


@pytest.mark.parametrize("path", sorted(OPTION_SETS))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", launch.KERNEL_SOURCES)
def test_source_compiles_without_warnings_and_exports_every_entry_point(compiled, source, arch, path) -> None:
    result = compiled[source, arch, path]
    assert result.log == "", result.log
    ptx = result.ptx
    assert re.search(rf"^\.target sm_{arch.split('_')[1]}\b", ptx, re.MULTILINE)
    assert re.search(r"^\.version 9\.0$", ptx, re.MULTILINE)
    assert ptx_entry_points(ptx) == set(expected_entry_points(source))


def test_the_aot_path_compiles_what_tensorrt_embeds(compiled) -> None:
    for source in launch.KERNEL_SOURCES:
        assert nvrtc.aot_ptx(source) == compiled[source, nvrtc.AOT_ARCH, "aot"].ptx


def test_both_paths_flush_denormals_alike() -> None:
    """The AOT PTX and CuPy's JIT cubin must compute the same bits: same -ftz."""
    assert "-ftz=true" in nvrtc.AOT_OPTIONS and "-ftz=true" in nvrtc.CUPY_RAWMODULE_OPTIONS


def test_a_compile_error_carries_nvrtcs_log(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(nvrtc, "KERNEL_DIR", tmp_path)
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* y) { y[0] = undefined_name; }\n')
    with pytest.raises(nvrtc.NvrtcError, match="undefined_name"):
        nvrtc.compile_source("broken.cu", "compute_90", nvrtc.AOT_OPTIONS)
