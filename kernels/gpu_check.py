"""`make gpu-check`: every GPU check of the fused kernels in one command that fits a short GPU lease.

Steps, in order, each under its own time limit (and all of them under --budget-s), each one's log
written to --out the moment it ends, and `summary.json` rewritten after every step, so a late
failure or a killed run keeps what was measured before it:

1. preflight: the imports and the device the rest needs (CuPy, PyTorch with CUDA, a GPU,
   compute-sanitizer). On a machine without them the check stops here, exit status 2.
2. gpu-tests: `pytest --noconftest -m gpu tests/test_kernels_gpu.py` (the project's conftest needs
   tritonserver and friends, which the GPU machine lacks).
3. memcheck, racecheck: compute-sanitizer on `python -m kernels.sanitize_run`, with CuPy's memory
   pool off (sanitize_run turns it off) so every buffer is its own allocation and an out-of-bounds
   access is seen.
4. benchmark: `benchmarks/gpu_kernels.py` without torch.compile.
5. benchmark-compile: the torch.compile rows alone, last, in what time is left.

    PYTHONPATH=. python3 -m kernels.gpu_check --out "$OUT"

Exit status: 0 when every step passed, 1 when one failed or ran out of time, 2 when the preflight
stopped it. Only the standard library is imported here: the preflight itself says what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540  # one device command may run 10 minutes: leave a margin for the machine's own overhead
PREFLIGHT_EXIT = 2

# What the later steps import, checked first: (module, what needs it).
PREFLIGHT_IMPORTS = (
    ("numpy", "every step"),
    ("torch", "GPU tests and the benchmark"),
    ("cupy", "kernel launches (RawModule, NVRTC)"),
    ("pytest", "GPU tests"),
)
PREFLIGHT_SCRIPT = """
import json, sys
found, missing = {}, {}
for module, why in json.loads(sys.argv[1]):
    try:
        found[module] = getattr(__import__(module), "__version__", "?")
    except Exception as exc:
        missing[module] = f"{why}: {type(exc).__name__}: {exc}"
device = None
if "torch" in found:
    import torch
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB"
if "cupy" in found and device is not None:
    import cupy
    found["cupy devices"] = cupy.cuda.runtime.getDeviceCount()
print(json.dumps({"found": found, "missing": missing, "device": device}))
"""


@dataclass(kw_only=True)
class StepResult:
    name: str
    command: list[str]
    status: str  # "passed", "failed", "timed out", "skipped"
    returncode: int | None
    seconds: float
    log: str  # file name under --out
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class Step:
    name: str
    command: list[str]
    limit_s: float
    env: dict[str, str] | None = None


def find_compute_sanitizer(sanitizer_wheel: Path | None, scratch: Path) -> Path | None:
    """compute-sanitizer on PATH, in the CUDA toolkit, in an installed nvidia-cuda-sanitizer-api wheel,
    or unpacked from a wheel file carried to the machine (it has no internet)."""
    on_path = shutil.which("compute-sanitizer")
    if on_path:
        return Path(on_path)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (candidate := Path(root) / "bin" / "compute-sanitizer").is_file():
            return candidate
    for entry in sys.path:
        if (candidate := Path(entry) / "nvidia" / "cu13" / "bin" / "compute-sanitizer").is_file():
            return candidate
    if sanitizer_wheel is not None and sanitizer_wheel.is_file():
        with zipfile.ZipFile(sanitizer_wheel) as wheel:
            wheel.extractall(scratch)
        binary = scratch / "nvidia" / "cu13" / "bin" / "compute-sanitizer"
        if binary.is_file():
            binary.chmod(0o755)
            return binary
    return None


def preflight(python: str, sanitizer: Path | None) -> tuple[bool, dict]:
    """Can the GPU steps run here? Runs the imports in `python` (the interpreter the steps use)."""
    completed = subprocess.run([python, "-c", PREFLIGHT_SCRIPT, json.dumps(PREFLIGHT_IMPORTS)], capture_output=True,
                               text=True, timeout=120, check=False, cwd=REPO, env=_env())
    try:
        report = json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"found": {}, "missing": {"python": completed.stderr.strip()[-500:]}, "device": None}
    problems = [f"{module} is not importable ({why})" for module, why in report["missing"].items()]
    if report["device"] is None:
        problems.append("no CUDA device is visible to PyTorch")
    if sanitizer is None:
        problems.append("compute-sanitizer was not found (PATH, CUDA_HOME, an installed nvidia-cuda-sanitizer-api, "
                        "or --sanitizer-wheel)")
    report["compute_sanitizer"] = str(sanitizer) if sanitizer else None
    report["problems"] = problems
    return not problems, report


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO), "PYTHONUNBUFFERED": "1",
            **(extra or {})}


PER_MODEL_S = "{per_model_s}"  # in a command: the time each torch.compile row gets, filled in when the step starts


def plan_steps(python: str, sanitizer: Path, out: Path) -> list[Step]:
    sanitize = [python, "-m", "kernels.sanitize_run"]
    benchmark = [python, str(REPO / "benchmarks" / "gpu_kernels.py")]
    return [
        Step(name="gpu-tests", limit_s=150,
             command=[python, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "-m", "gpu", "-rs", "-q",
                      str(REPO / "tests" / "test_kernels_gpu.py")]),
        Step(name="memcheck", limit_s=100,
             command=[str(sanitizer), "--tool", "memcheck", "--leak-check", "full", "--error-exitcode", "1", *sanitize]),
        Step(name="racecheck", limit_s=100,
             command=[str(sanitizer), "--tool", "racecheck", "--error-exitcode", "1", *sanitize]),
        Step(name="benchmark", limit_s=150, command=[*benchmark, "--out", str(out / "benchmark"), "--skip-compile"]),
        # Last, in whatever the budget has left: two models (osnet_x1_0, ResNet-50) share it.
        Step(name="benchmark-compile", limit_s=float("inf"),
             command=[*benchmark, "--out", str(out / "benchmark-compile"), "--only-compile",
                      "--compile-timeout-s", PER_MODEL_S]),
    ]


def run_step(step: Step, out: Path, limit_s: float) -> StepResult:
    """Run one step with its log going to out/<name>.log as it is written."""
    log = out / f"{step.name}.log"
    command = [part.replace(PER_MODEL_S, str(int(max(10.0, limit_s / 2 - 15)))) for part in step.command]
    started = time.perf_counter()
    with log.open("w") as handle:
        handle.write(f"$ {' '.join(command)}\n(limit {limit_s:.0f} s)\n\n")
        handle.flush()
        # A session of its own, so a timeout ends the step's children too (sanitizer, compile workers).
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=_env(step.env),
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=limit_s)
            status = "passed" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode, status = None, "timed out"
            handle.write(f"\n[gpu-check: killed after {limit_s:.0f} s]\n")
    seconds = time.perf_counter() - started
    return StepResult(name=step.name, command=command, status=status, returncode=returncode, seconds=seconds,
                      log=log.name)


def write_summary(out: Path, preflight_report: dict, results: list[StepResult]) -> None:
    payload = {"preflight": preflight_report, "steps": [asdict(result) for result in results]}
    (out / "summary.json").write_text(json.dumps(payload, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")),
                        help="where the logs and summary.json go (default: $OUT, else gpu_check_out)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="all steps together (default: %(default)s)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the steps run in")
    parser.add_argument("--sanitizer-wheel", type=Path, help="an nvidia-cuda-sanitizer-api wheel to take compute-sanitizer from")
    parser.add_argument("--skip", nargs="+", default=[], metavar="STEP", help="leave out these steps")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        sanitizer = find_compute_sanitizer(args.sanitizer_wheel, Path(scratch))
        ready, report = preflight(args.python, sanitizer)
        (args.out / "preflight.json").write_text(json.dumps(report, indent=2))
        print(f"preflight: {json.dumps(report['found'])}; device: {report['device']}", flush=True)
        if not ready:
            write_summary(args.out, report, [])
            print("gpu-check stopped at the preflight, nothing else ran:\n  " + "\n  ".join(report["problems"]),
                  file=sys.stderr)
            return PREFLIGHT_EXIT

        results: list[StepResult] = []
        for step in plan_steps(args.python, sanitizer, args.out):
            remaining = deadline - time.monotonic()
            if step.name in args.skip or remaining < 20:
                why = "left out (--skip)" if step.name in args.skip else "no time left in the budget"
                results.append(StepResult(name=step.name, command=step.command, status="skipped", returncode=None,
                                          seconds=0.0, log="", note=why))
            else:
                results.append(run_step(step, args.out, min(step.limit_s, remaining)))
            write_summary(args.out, report, results)
            result = results[-1]
            print(f"{result.name}: {result.status} ({result.seconds:.0f} s){' ' + result.note if result.note else ''}", flush=True)
    failed = [r.name for r in results if r.status in ("failed", "timed out")]
    print(f"gpu-check: {len(results) - len(failed)} of {len(results)} steps passed or skipped; logs in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
