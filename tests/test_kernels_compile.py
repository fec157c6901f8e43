"""The CUDA sources build with nvcc for sm_80 and sm_90 (warnings as errors, no spills) and compile to
compute_90 PTX with every extern "C" entry point; the ptxas report parser reads CUDA 12/13 output."""

from __future__ import annotations

import shutil

import pytest

from kernels import compile_check
from kernels.launch import ENTRY_POINTS, KERNEL_DIR, KERNEL_SOURCES

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile the CUDA kernels")

# Verbatim nvcc 13.0 -Xptxas -v output (sm_80 shows cmem; sm_90 shows a cumulative stack size on spills).
PTXAS_SAMPLE = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'aggregation_gate_f16' for 'sm_90'
ptxas info    : Function properties for aggregation_gate_f16
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 8 bytes cumulative stack size, 3072 bytes smem
ptxas info    : Compile time = 31.656 ms
ptxas info    : Compiling entry function 'depthwise_liteconv_f32' for 'sm_80'
ptxas info    : Function properties for depthwise_liteconv_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 79 registers, used 0 barriers, 416 bytes cmem[0]
"""


def test_ptxas_report_parser() -> None:
    kernels = {k.kernel: k for k in compile_check.parse_ptxas_report(PTXAS_SAMPLE, source="x.cu")}

    gate = kernels["aggregation_gate_f16"]
    assert (gate.arch, gate.registers, gate.barriers, gate.shared_bytes) == ("sm_90", 32, 1, 3072)
    assert (gate.stack_bytes, gate.spill_stores, gate.spill_loads, gate.spills) == (8, 4, 4, True)
    depthwise = kernels["depthwise_liteconv_f32"]
    assert (depthwise.arch, depthwise.registers, depthwise.shared_bytes, depthwise.spills) == ("sm_80", 79, 0, False)


def test_spills_and_missing_entry_points_are_reported_as_problems() -> None:
    spilling = compile_check.parse_ptxas_report(PTXAS_SAMPLE)
    result = compile_check.CompileResult(
        source="aggregation_gate.cu",
        arch="sm_90",
        ok=True,
        log="",
        seconds=0.0,
        kernels=spilling,
        missing_entry_points=["aggregation_gate_f32"],
    )
    strict = compile_check.CheckReport(results=[result], include_violations={})
    problems = "\n".join(strict.problems)
    assert "spills" in problems and "aggregation_gate_f32" in problems
    relaxed = compile_check.CheckReport(results=[result], include_violations={}, allow_spills=True)
    assert not any("spills" in p for p in relaxed.problems)


def test_sources_are_header_free() -> None:
    assert compile_check.find_includes('#include <cuda_fp16.h>\n  # include "x.h"\nint a;') == [
        "#include <cuda_fp16.h>",
        '# include "x.h"',
    ]
    for source in KERNEL_SOURCES:
        assert compile_check.find_includes((KERNEL_DIR / source).read_text()) == [], source


def test_every_source_is_in_the_build() -> None:
    assert sorted(p.name for p in KERNEL_DIR.glob("*.cu")) == sorted(KERNEL_SOURCES)
    assert set(ENTRY_POINTS.values()) == set(KERNEL_SOURCES)


@pytest.fixture
def report(kernel_compile_report) -> compile_check.CheckReport:
    return kernel_compile_report  # conftest compiles once per session and prints the register table


@needs_nvcc
def test_every_kernel_compiles_for_sm80_and_sm90_without_warnings_or_spills(report: compile_check.CheckReport) -> None:
    assert report.problems == []
    built = {(k.kernel, k.arch) for k in report.kernels}
    assert built == {(entry, arch) for entry in ENTRY_POINTS for arch in compile_check.DEFAULT_ARCHS}


@needs_nvcc
def test_ptx_for_aot_plugins_has_every_entry_point(report: compile_check.CheckReport) -> None:
    ptx = [r for r in report.results if r.arch == compile_check.PTX_ARCH]
    assert sorted(r.source for r in ptx) == sorted(KERNEL_SOURCES)
    assert all(r.ok and not r.missing_entry_points for r in ptx)


@needs_nvcc
def test_resource_table_lists_every_kernel(report: compile_check.CheckReport) -> None:
    table = compile_check.format_table(report.kernels)
    for entry in ENTRY_POINTS:
        assert table.count(entry + " ") == len(compile_check.DEFAULT_ARCHS)
    assert "registers" in table.splitlines()[0]


@needs_nvcc
def test_a_warning_fails_the_build(tmp_path) -> None:
    source = tmp_path / "warns.cu"
    source.write_text(
        'extern "C" __global__ void k(float* y) { int unused_but_set = 0; unused_but_set = 1; y[0] = 1.0f; }\n'
    )
    ok, log, _ = compile_check._run(compile_check.sass_command(NVCC, source, "sm_90", tmp_path / "warns.cubin"))
    assert not ok and "unused_but_set" in log
