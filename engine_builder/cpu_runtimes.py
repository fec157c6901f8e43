"""CPU runtimes for the served tensor model, and choosing among them by measurement.

Where there is no GPU a user compares us with what they would run instead, so the tensor model runs
on the fastest runtime and precision this CPU has, within the agreed precision floor:

| runtime | graph | served by |
| --- | --- | --- |
| `onnxruntime-fp32` | FP32 ONNX | ONNX Runtime |
| `openvino-fp32` | FP32 ONNX | OpenVINO, `INFERENCE_PRECISION_HINT` f32 |
| `openvino-bf16` | FP32 ONNX | OpenVINO, `INFERENCE_PRECISION_HINT` bf16: only where the CPU has BF16 |
| `onnxruntime-int8` | INT8 Q/DQ ONNX | ONNX Runtime |
| `openvino-int8` | INT8 Q/DQ ONNX | OpenVINO |

Every one is served by `triton_repo/cpu_embedder.py` with the session `cpu_sessions.open_session`
builds; `auto` measures that very session code in-process, with the config parameters and instance
count the served model gets, at the served batch size, and picks the fastest one whose embeddings stay within the floor
(`choose_runtime`, a pure function); `write_runtime_choice` records why beside the served model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from engine_builder.cpu_sessions import ONNXRUNTIME_PART_IMAGES, OPENVINO_CHUNK, open_session
from engine_builder.precision import CALIBRATION_METHODS, CPU_CALIBRATION_METHOD, PrecisionFloor, compare_with_fp32
from osnet_base.contract import DEFAULT_RUNTIME, EMBEDDING_NAME
from osnet_base.errors import OsnetTritonError

logger = logging.getLogger(__name__)

# What every served CPU model must keep of PyTorch FP32, whichever runtime serves it. BF16 keeps it
# (mean cosine 0.99994 with the reference checkpoint, 0.99999 with random weights); the CPU INT8 graph
# keeps it with random weights (~0.9995) but not with the reference checkpoint (0.9975), where `auto`
# rightly passes it over. The cosines carry the judgement; top-1 agreement only catches a broken
# graph: with random weights a generated person's nearest neighbour leads the next one by ~0.001
# cosine, so any reduced precision reorders some of them (INT8 keeps 75-90%) without being less faithful.
SERVING_FLOOR = PrecisionFloor(min_mean_cosine=0.999, min_cosine=0.995, min_top1_agreement=0.5)
# Measurements on 2 cores move by a few percent between runs: a less precise candidate must beat a
# more precise one by more than this to be chosen over it.
PRECISION_MARGIN = 0.05
PRECISION_ORDER = ("fp32", "bf16", "int8")  # most precise first


class RuntimeUnavailableError(OsnetTritonError):
    """A requested CPU runtime that this machine cannot run (not installed, or no BF16)."""


class RuntimeSelectionError(OsnetTritonError):
    """No candidate runtime ran within the precision floor, or an explicit one fell below it."""


@dataclass(frozen=True, kw_only=True)
class CpuRuntime:
    """One way to serve the tensor model on a CPU."""

    name: str
    engine: str  # "onnxruntime" | "openvino"
    precision: str  # the served model is `<variant>_<precision>`
    openvino_precision_hint: str | None = None
    required_capability: str | None = None  # as OpenVINO's OPTIMIZATION_CAPABILITIES names it

    def __post_init__(self) -> None:
        if self.engine not in ("onnxruntime", "openvino"):
            raise ValueError(f"unknown engine {self.engine!r}")
        if self.precision not in PRECISION_ORDER:
            raise ValueError(f"unknown precision {self.precision!r}: choose from {PRECISION_ORDER}")
        if (self.engine == "openvino") != (self.openvino_precision_hint is not None):
            raise ValueError("an OpenVINO runtime needs a precision hint, and only OpenVINO takes one")

    @property
    def graph(self) -> str:
        """Which ONNX graph it runs: the INT8 Q/DQ graph, or the FP32 one (BF16 is the runtime's choice)."""
        return "int8" if self.precision == "int8" else "fp32"

    def config_parameters(self, threads: int | None, streams: int | None) -> dict[str, str]:
        """The python-backend model's config parameters; the in-process measurement uses the same.

        `threads`: the instance's threads (None: a thread per core). `streams`: the parts a batch is cut
        into and run at once, the threads shared out between them. None: for ONNX Runtime a session per
        thread; for OpenVINO as many streams as its THROUGHPUT hint picks for this CPU (2 on 2 cores, one
        thread each). On 2 cores that measured 5-10% above one 2-thread stream in-process for OpenVINO
        BF16, 2-18% for ONNX Runtime, and under concurrent load it loses less to the load generator: a
        preempted thread stalls its own stream, not every layer. OpenVINO runs fixed chunks of
        `OPENVINO_CHUNK` images, ONNX Runtime parts of `ONNXRUNTIME_PART_IMAGES` (see cpu_sessions).
        """
        if self.engine == "onnxruntime":
            parameters = {"ENGINE": self.engine, "PART_IMAGES": str(ONNXRUNTIME_PART_IMAGES)}
            if threads is not None:
                parameters["INTRA_OP_THREADS"] = str(threads)
            if streams is not None:
                parameters["STREAMS"] = str(streams)
            return parameters
        # LATENCY gives one request all the threads; THROUGHPUT splits them over the streams.
        parameters = {"ENGINE": self.engine, "INFERENCE_PRECISION_HINT": self.openvino_precision_hint,
                      "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT", "CHUNK": str(OPENVINO_CHUNK)}
        if streams is not None:
            parameters["NUM_STREAMS"] = str(streams)
        if threads is not None:
            parameters["INFERENCE_NUM_THREADS"] = str(threads)
        return parameters


_RUNTIMES = (
    CpuRuntime(name="onnxruntime-fp32", engine="onnxruntime", precision="fp32"),
    CpuRuntime(name="openvino-fp32", engine="openvino", precision="fp32", openvino_precision_hint="f32"),
    CpuRuntime(name="openvino-bf16", engine="openvino", precision="bf16",
               openvino_precision_hint="bf16", required_capability="BF16"),
    CpuRuntime(name="onnxruntime-int8", engine="onnxruntime", precision="int8"),
    # f32, not bf16, for what stays in float: with every convolution quantized, a bf16 hint adds
    # conversions around each quantized layer and measured ~30% slower on the reference CPU.
    CpuRuntime(name="openvino-int8", engine="openvino", precision="int8",
               openvino_precision_hint="f32"),
)
RUNTIMES: dict[str, CpuRuntime] = {runtime.name: runtime for runtime in _RUNTIMES}
RUNTIME_CHOICES = ("auto", *RUNTIMES)
BASELINE_RUNTIME = "onnxruntime-fp32"


def get_runtime(name: str) -> CpuRuntime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown CPU runtime {name!r}: choose from {', '.join(RUNTIME_CHOICES)}") from None


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def cpu_capabilities() -> frozenset[str]:
    """What OpenVINO's CPU plugin says this CPU can do (FP32, BF16, INT8, ...); empty without OpenVINO."""
    if not openvino_installed():
        return frozenset()
    import openvino as ov

    return frozenset(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def unavailable_reason(runtime: CpuRuntime, capabilities: frozenset[str], has_openvino: bool) -> str | None:
    if runtime.engine == "openvino" and not has_openvino:
        return "OpenVINO is not installed"
    if runtime.required_capability is not None and runtime.required_capability not in capabilities:
        # OpenVINO would quietly run f32 instead: that is openvino-fp32 under another name.
        return f"this CPU has no {runtime.required_capability} (OpenVINO reports {sorted(capabilities) or 'nothing'})"
    return None


def available_runtimes(capabilities: frozenset[str], has_openvino: bool) -> list[CpuRuntime]:
    return [r for r in _RUNTIMES if unavailable_reason(r, capabilities, has_openvino) is None]


Embedder = Callable[[np.ndarray], np.ndarray]  # INPUT uint8 pixels [N,256,128,3] -> EMBEDDING [N,512]


def open_embedder(runtime: CpuRuntime, model_path: Path, parameters: Mapping[str, str], instances: int) -> tuple[Embedder, dict]:
    """`runtime` in this process, built by the code the served model runs with the parameters it gets;
    also the session's properties, which the served model logs."""
    session = open_session(runtime.engine, model_path, parameters, instances)
    return (lambda images: session.run([images], [EMBEDDING_NAME])[0]), dict(session.properties)


@dataclass(frozen=True, kw_only=True)
class RuntimeMeasurement:
    """One candidate measured in-process: throughput at the served batch, embeddings vs PyTorch FP32."""

    runtime: str
    precision: str
    images_per_s: float | None  # None: not measured (an explicit runtime), or it failed
    batch_size: int
    mean_cosine: float | None
    min_cosine: float | None
    top1_agreement: float | None
    within_floor: bool
    setup_s: float = 0.0  # compiling it and embedding the evaluation images
    error: str | None = None
    session_properties: dict = field(default_factory=dict)  # as the served model's log states them


def measure_candidates(
    runtimes: Sequence[CpuRuntime],
    graphs: Mapping[str, Path],
    evaluation_images: np.ndarray,
    reference_embeddings: np.ndarray,
    *,
    floor: PrecisionFloor,
    threads: int | None,
    streams: int | None,
    instances: int = 1,
    batch_size: int = 32,
    seconds_per_candidate: float = 2.0,
    rounds: int = 2,
) -> list[RuntimeMeasurement]:
    """Open every candidate, check its embeddings against `reference_embeddings` (PyTorch FP32), and
    measure images/s at `batch_size` in `rounds` interleaved rounds, keeping each one's best round:
    load from elsewhere only ever slows a round down. `seconds_per_candidate` 0 skips the timing."""
    if len(evaluation_images) < 2:
        raise ValueError("need >= 2 evaluation images")
    batch = np.resize(evaluation_images, (batch_size, *evaluation_images.shape[1:]))
    opened: dict[str, Embedder] = {}
    results: dict[str, RuntimeMeasurement] = {}
    for runtime in runtimes:
        started = time.perf_counter()
        try:
            embedder, properties = open_embedder(runtime, graphs[runtime.graph], runtime.config_parameters(threads, streams), instances)
            embeddings = np.concatenate([embedder(evaluation_images[i : i + batch_size])
                                         for i in range(0, len(evaluation_images), batch_size)])
        except Exception as exc:  # a runtime that cannot run this graph here is a measurement, not a crash
            logger.warning("%s failed: %s", runtime.name, exc)
            results[runtime.name] = RuntimeMeasurement(
                runtime=runtime.name, precision=runtime.precision, images_per_s=None, batch_size=batch_size,
                mean_cosine=None, min_cosine=None, top1_agreement=None, within_floor=False, error=str(exc))
            continue
        agreement = compare_with_fp32(runtime.precision, reference_embeddings, embeddings, floor)
        opened[runtime.name] = embedder
        results[runtime.name] = RuntimeMeasurement(
            runtime=runtime.name, precision=runtime.precision, images_per_s=None, batch_size=batch_size,
            mean_cosine=agreement.mean_cosine, min_cosine=agreement.min_cosine, top1_agreement=agreement.top1_agreement,
            within_floor=agreement.passed, setup_s=time.perf_counter() - started, session_properties=properties)
    if seconds_per_candidate > 0:
        best: dict[str, float] = {name: 0.0 for name in opened}
        for _ in range(rounds):
            for name, embedder in opened.items():
                best[name] = max(best[name], images_per_second(embedder, batch, seconds_per_candidate / rounds))
        for name, rate in best.items():
            measured = results[name]
            results[name] = replace(measured, images_per_s=rate)
            logger.info("%s: %.1f img/s at batch %d, mean cosine %.6f vs PyTorch FP32", name, rate, batch_size,
                        measured.mean_cosine)
    return [results[runtime.name] for runtime in runtimes]


def images_per_second(embedder: Embedder, batch: np.ndarray, seconds: float) -> float:
    embedder(batch)  # warm-up: first-call allocations and shape specialisation are not throughput
    done, started = 0, time.perf_counter()
    while True:
        embedder(batch)
        done += len(batch)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


@dataclass(frozen=True, kw_only=True)
class RuntimeChoice:
    """What a build serves on the CPU, and why."""

    runtime: str
    precision: str
    reason: str
    floor: PrecisionFloor
    measurements: tuple[RuntimeMeasurement, ...]
    cpu_capabilities: tuple[str, ...] = ()
    threads: int | None = None
    streams: int | None = None
    instances: int = 1
    load_average_1min: float | None = None  # of the build machine while it measured


def choose_runtime(measurements: Sequence[RuntimeMeasurement], floor: PrecisionFloor, margin: float = PRECISION_MARGIN) -> tuple[str, str]:
    """(runtime name, reason): the fastest candidate within the floor, except that a more precise
    one within `margin` of the fastest is preferred. Never slower than the baseline by more than noise
    allows: the baseline itself is a candidate, and anything chosen over it is at least as fast."""
    timed = [m for m in measurements if m.images_per_s is not None]
    eligible = [m for m in timed if m.within_floor]
    if not eligible:
        details = "; ".join(_describe(m) for m in measurements)
        raise RuntimeSelectionError(
            f"no CPU runtime ran within the precision floor (mean cosine >= {floor.min_mean_cosine}, "
            f"min >= {floor.min_cosine}, top-1 agreement >= {floor.min_top1_agreement}): {details}")
    fastest = max(eligible, key=lambda m: m.images_per_s)
    close = [m for m in eligible if m.images_per_s >= (1 - margin) * fastest.images_per_s]
    chosen = min(close, key=lambda m: (PRECISION_ORDER.index(m.precision), -m.images_per_s))
    baseline = next((m for m in timed if m.runtime == BASELINE_RUNTIME), None)
    reason = [f"{chosen.runtime}: {chosen.images_per_s:.1f} img/s in-process at batch {chosen.batch_size}, "
              f"mean cosine {chosen.mean_cosine:.6f} vs PyTorch FP32"]
    if baseline is not None and baseline.images_per_s:
        reason.append(f"{chosen.images_per_s / baseline.images_per_s:.2f}x {BASELINE_RUNTIME}")
    if chosen is fastest:
        reason.append(f"the fastest of {len(eligible)} candidates within the floor")
    else:
        reason.append(f"{fastest.runtime} was {fastest.images_per_s / chosen.images_per_s - 1:.1%} faster, within the "
                      f"{margin:.0%} margin in which the more precise {chosen.precision} is kept")
    excluded = [_describe(m) for m in measurements if m not in eligible]
    if excluded:
        reason.append("not eligible: " + "; ".join(excluded))
    return chosen.runtime, "; ".join(reason)


def _describe(measurement: RuntimeMeasurement) -> str:
    if measurement.error is not None:
        return f"{measurement.runtime} failed ({measurement.error.splitlines()[0][:200]})"
    if not measurement.within_floor:
        return (f"{measurement.runtime} below the floor (mean cosine {measurement.mean_cosine:.6f}, "
                f"min {measurement.min_cosine:.6f}, top-1 {measurement.top1_agreement:.3f})")
    return f"{measurement.runtime} not timed"


def load_average_1min() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


RUNTIME_CHOICE_JSON = "runtime_choice.json"


def write_runtime_choice(directory: Path, choice: RuntimeChoice) -> tuple[Path, Path]:
    """`runtime_choice.json` and a short `runtime_choice.md` in the served model's directory."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = directory / RUNTIME_CHOICE_JSON, directory / "runtime_choice.md"
    json_path.write_text(json.dumps(asdict(choice), indent=2) + "\n")
    load = "" if choice.load_average_1min is None else f", 1-min load average {choice.load_average_1min:.2f} while measuring"
    lines = [
        f"# CPU runtime: {choice.runtime}",
        "",
        choice.reason + ".",
        "",
        f"CPU capabilities (OpenVINO): {', '.join(choice.cpu_capabilities) or 'unknown'}; "
        f"threads {choice.threads or 'runtime default'}, streams {choice.streams or 'runtime default'}{load}.",
        f"Floor against PyTorch FP32: mean cosine >= {choice.floor.min_mean_cosine}, min >= {choice.floor.min_cosine}, "
        f"top-1 agreement >= {choice.floor.min_top1_agreement}.",
        "",
        "| runtime | img/s (in-process) | batch | mean cosine | min cosine | top-1 | within floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in choice.measurements:
        rate = "failed" if m.error else "-" if m.images_per_s is None else f"{m.images_per_s:.1f}"
        cosines = ("-", "-", "-") if m.mean_cosine is None else (f"{m.mean_cosine:.6f}", f"{m.min_cosine:.6f}", f"{m.top1_agreement:.3f}")
        lines.append(f"| {m.runtime} | {rate} | {m.batch_size} | {' | '.join(cosines)} | {'yes' if m.within_floor else 'no'} |")
    markdown_path.write_text("\n".join(lines) + "\n")
    return json_path, markdown_path


def read_runtime_choice(directory: Path) -> dict:
    return json.loads((directory / RUNTIME_CHOICE_JSON).read_text())


@dataclass(kw_only=True)
class RuntimeSelection:
    """How a CPU build picks its runtime. `candidates` None: every runtime this machine can run."""

    runtime: str = DEFAULT_RUNTIME  # a name from RUNTIMES, or "auto"
    candidates: tuple[str, ...] | None = None
    floor: PrecisionFloor = SERVING_FLOOR
    batch_size: int = 32  # at most: a build measures at min(this, the served max batch size)
    seconds_per_candidate: float = 2.0
    evaluation_images: int = 32
    calibration_images: int = 32
    calibration_method: str = CPU_CALIBRATION_METHOD
    eval_dir: Path | None = None
    calib_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.runtime != "auto":
            get_runtime(self.runtime)
        for name in self.candidates or ():
            get_runtime(name)
        if self.candidates is not None and not self.candidates:
            raise ValueError("an empty candidate list cannot choose anything")
        if self.batch_size < 1 or self.evaluation_images < 2 or self.calibration_images < 1:
            raise ValueError("need batch_size >= 1, >= 2 evaluation images and >= 1 calibration image")
        if self.seconds_per_candidate < 0:
            raise ValueError(f"seconds_per_candidate must be >= 0, got {self.seconds_per_candidate}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.calibration_method!r}")


def resolve_candidates(selection: RuntimeSelection, capabilities: frozenset[str], has_openvino: bool) -> list[CpuRuntime]:
    """The auto candidates this machine can run, or the explicit runtime. An explicit runtime that
    cannot run here is an error; an auto candidate that cannot is skipped with the reason logged."""
    if selection.runtime != "auto":
        runtime = get_runtime(selection.runtime)
        reason = unavailable_reason(runtime, capabilities, has_openvino)
        if reason is not None:
            raise RuntimeUnavailableError(f"{runtime.name} cannot run here: {reason}")
        return [runtime]
    named = selection.candidates or tuple(RUNTIMES)
    candidates = []
    for name in named:
        reason = unavailable_reason(RUNTIMES[name], capabilities, has_openvino)
        if reason is None:
            candidates.append(RUNTIMES[name])
        else:
            logger.info("auto: skipping %s: %s", name, reason)
    if not candidates:
        raise RuntimeUnavailableError(f"none of the candidates {', '.join(named)} can run on this machine")
    return candidates
