"""Compile every kernels/*.cu with nvcc, warnings as errors, and report registers and spills per kernel.

For each source and each SASS architecture (sm_80 and sm_90 by default) nvcc builds a cubin with
`-Werror all-warnings -Xptxas -v,--warning-as-error`; the ptxas report gives registers, spills, stack
and shared memory per entry point. Each source is also compiled to compute_90 PTX, the form NVRTC
hands a TensorRT AOT plugin, and every `extern "C"` entry point must appear in it unmangled.
Sources must be header-free (no #include): NVRTC then compiles them with no include path.

    python -m kernels.compile_check [--arch sm_80 --arch sm_90] [--nvcc PATH] [--allow-spills]

Exit status: 0 when everything compiles with no spills, 1 otherwise, 2 when nvcc is missing.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kernels.launch import ENTRY_POINTS, KERNEL_DIR, KERNEL_SOURCES

logger = logging.getLogger(__name__)

DEFAULT_ARCHS = ("sm_80", "sm_90")
PTX_ARCH = "compute_90"
NVCC_FLAGS = ("-std=c++17", "-Werror", "all-warnings")
PTXAS_FLAGS = "-v,--warning-as-error"
COMPILE_TIMEOUT_S = 300

_ENTRY_RE = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>[^']+)'")
_PROPERTIES_RE = re.compile(r"Function properties for (?P<name>\S+)")
_FRAME_RE = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_USED_RE = re.compile(r"Used (?P<registers>\d+) registers")
_BARRIERS_RE = re.compile(r"used (?P<barriers>\d+) barriers")
_SMEM_RE = re.compile(r"(?P<smem>\d+) bytes smem")
_INCLUDE_RE = re.compile(r"^\s*#\s*include\b", re.MULTILINE)


@dataclass(kw_only=True)
class KernelResources:
    """What ptxas reports for one entry point on one architecture."""

    kernel: str
    arch: str
    source: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    barriers: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass(kw_only=True)
class CompileResult:
    """One nvcc invocation: a source for one architecture (SASS) or for PTX."""

    source: str
    arch: str
    ok: bool
    log: str
    seconds: float
    kernels: list[KernelResources] = field(default_factory=list)
    missing_entry_points: list[str] = field(default_factory=list)


def parse_ptxas_report(log: str, *, source: str = "") -> list[KernelResources]:
    """The per-kernel resources in `nvcc -Xptxas -v` output (CUDA 12/13 formats)."""
    kernels: dict[str, KernelResources] = {}
    current: KernelResources | None = None
    for line in log.splitlines():
        if match := _ENTRY_RE.search(line):
            current = kernels.setdefault(
                match["name"], KernelResources(kernel=match["name"], arch=match["arch"], source=source)
            )
        elif match := _PROPERTIES_RE.search(line):
            current = kernels.get(match["name"], current)
        elif current is not None and (match := _FRAME_RE.search(line)):
            current.stack_bytes = int(match["stack"])
            current.spill_stores = int(match["stores"])
            current.spill_loads = int(match["loads"])
        elif current is not None and (match := _USED_RE.search(line)):
            current.registers = int(match["registers"])
            if barriers := _BARRIERS_RE.search(line):
                current.barriers = int(barriers["barriers"])
            if smem := _SMEM_RE.search(line):
                current.shared_bytes = int(smem["smem"])
    return list(kernels.values())


def ptx_entry_points(ptx: str) -> set[str]:
    return set(re.findall(r"\.entry\s+([A-Za-z_]\w*)\s*\(", ptx))


def expected_entry_points(source: str) -> list[str]:
    return [name for name, defined_in in ENTRY_POINTS.items() if defined_in == source]


def find_includes(source_text: str) -> list[str]:
    """#include lines: kernels must stay header-free so NVRTC needs no include path."""
    return [line.strip() for line in source_text.splitlines() if _INCLUDE_RE.match(line)]


def sass_command(nvcc: str, source: Path, arch: str, output: Path) -> list[str]:
    return [nvcc, *NVCC_FLAGS, "-cubin", f"-arch={arch}", "-Xptxas", PTXAS_FLAGS, "-o", str(output), str(source)]


def ptx_command(nvcc: str, source: Path, output: Path) -> list[str]:
    return [nvcc, *NVCC_FLAGS, "-ptx", f"-arch={PTX_ARCH}", "-o", str(output), str(source)]


def _run(command: list[str]) -> tuple[bool, str, float]:
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {COMPILE_TIMEOUT_S} s: {' '.join(command)}", time.perf_counter() - start
    log = completed.stdout + completed.stderr
    return completed.returncode == 0, log, time.perf_counter() - start


def compile_sass(nvcc: str, source: str, arch: str, workdir: Path) -> CompileResult:
    output = workdir / f"{Path(source).stem}.{arch}.cubin"
    ok, log, seconds = _run(sass_command(nvcc, KERNEL_DIR / source, arch, output))
    kernels = parse_ptxas_report(log, source=source) if ok else []
    found = {k.kernel for k in kernels}
    missing = [name for name in expected_entry_points(source) if name not in found]
    return CompileResult(
        source=source, arch=arch, ok=ok, log=log, seconds=seconds, kernels=kernels, missing_entry_points=missing
    )


def compile_ptx(nvcc: str, source: str, workdir: Path) -> CompileResult:
    output = workdir / f"{Path(source).stem}.{PTX_ARCH}.ptx"
    ok, log, seconds = _run(ptx_command(nvcc, KERNEL_DIR / source, output))
    entries = ptx_entry_points(output.read_text(encoding="utf-8")) if ok and output.exists() else set()
    missing = [name for name in expected_entry_points(source) if name not in entries]
    return CompileResult(source=source, arch=PTX_ARCH, ok=ok, log=log, seconds=seconds, missing_entry_points=missing)


def compile_all(nvcc: str, archs: Sequence[str] = DEFAULT_ARCHS, *, jobs: int = 2) -> list[CompileResult]:
    """Every source for every SASS arch, plus compute_90 PTX; nvcc runs `jobs` at a time."""
    with tempfile.TemporaryDirectory(prefix="osnet-kernels-") as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
        workdir = Path(tmp)
        futures = [pool.submit(compile_sass, nvcc, s, a, workdir) for s in KERNEL_SOURCES for a in archs]
        futures += [pool.submit(compile_ptx, nvcc, s, workdir) for s in KERNEL_SOURCES]
        return [f.result() for f in futures]


@dataclass(kw_only=True)
class CheckReport:
    results: list[CompileResult]
    include_violations: dict[str, list[str]]
    allow_spills: bool = False

    @property
    def kernels(self) -> list[KernelResources]:
        return [k for r in self.results for k in r.kernels]

    @property
    def problems(self) -> list[str]:
        problems = [f"{src}: header-free sources only, found {lines}" for src, lines in self.include_violations.items()]
        for result in self.results:
            if not result.ok:
                problems.append(f"{result.source} ({result.arch}) failed to compile:\n{result.log.strip()}")
            if result.missing_entry_points:
                problems.append(
                    f"{result.source} ({result.arch}): entry points missing or mangled: {result.missing_entry_points}"
                )
        if not self.allow_spills:
            problems += [
                f"{k.kernel} ({k.arch}) spills: {k.spill_stores} B stored, {k.spill_loads} B loaded"
                for k in self.kernels
                if k.spills
            ]
        return problems


def check(nvcc: str, archs: Sequence[str] = DEFAULT_ARCHS, *, allow_spills: bool = False, jobs: int = 2) -> CheckReport:
    violations = {
        source: lines
        for source in KERNEL_SOURCES
        if (lines := find_includes((KERNEL_DIR / source).read_text(encoding="utf-8")))
    }
    return CheckReport(
        results=compile_all(nvcc, archs, jobs=jobs), include_violations=violations, allow_spills=allow_spills
    )


def format_table(kernels: Sequence[KernelResources]) -> str:
    header = ("kernel", "arch", "registers", "spill stores (B)", "spill loads (B)", "stack (B)", "smem (B)", "barriers")
    rows = [
        (k.kernel, k.arch, k.registers, k.spill_stores, k.spill_loads, k.stack_bytes, k.shared_bytes, k.barriers)
        for k in sorted(kernels, key=lambda k: (k.kernel, k.arch))
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            str(cell).ljust(width) if i < 2 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", dest="archs", help="SASS arch (repeatable); default sm_80 and sm_90")
    parser.add_argument("--nvcc", default=None, help="nvcc to use (default: the one on PATH)")
    parser.add_argument("--allow-spills", action="store_true", help="report register spills without failing")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc invocations")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    nvcc = args.nvcc or shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found on PATH: cannot compile the kernels", file=sys.stderr)
        return 2
    report = check(nvcc, tuple(args.archs or DEFAULT_ARCHS), allow_spills=args.allow_spills, jobs=args.jobs)
    print(format_table(report.kernels))
    seconds = sum(r.seconds for r in report.results)
    print(f"\n{len(report.results)} nvcc runs ({seconds:.1f} s of compile time); PTX {PTX_ARCH} entry points checked")
    for problem in report.problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
