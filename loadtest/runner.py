"""Running locust against Triton: bounded in time, loopback unless told otherwise, reports written.

    summary = run_load_test(LoadTestSettings(url="127.0.0.1:8001", users=4, duration_s=20, output_dir=Path("out")))
    print(format_summary(summary))

locust runs as subprocesses (`python -m locust -f loadtest/locustfile.py --headless ...`): its import
monkey-patches the standard library with gevent, which must not happen to the caller. With
`workers=N` it runs distributed: one master and N local worker processes, for when one generator
process is the bottleneck. Every process gets its own process group; whatever happens (success,
failure, timeout, Ctrl-C) all of them are gone when `run_load_test` returns or raises.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from osnet_base.contract import DEFAULT_URL
from osnet_base.errors import OsnetTritonError
from loadtest.report import (
    LoadTestSummary,
    find_knee,
    format_summary,
    plot_run,
    plot_sweep,
    read_failure_messages,
    read_run_record,
    read_totals,
    sweep_table,
)
from loadtest.workload import SCENARIOS, default_model

__all__ = [
    "LoadTestError",
    "LoadTestSettings",
    "LoadTestSummary",
    "SweepResult",
    "SweepSettings",
    "format_summary",
    "format_sweep",
    "run_load_test",
    "run_sweep",
]

logger = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
PROJECT_ROOT = LOCUSTFILE.parent.parent
CSV_PREFIX = "locust"
HTML_REPORT = "report.html"
SUMMARY_JSON = "summary.json"
REFERENCE_ANSWERS = "reference_answers.npy"
RUN_PLOT = "throughput_latency.png"
MASTER_LOG = "locust.log"
SWEEP_JSON = "sweep.json"
SWEEP_TABLE = "sweep.md"
SWEEP_PLOT = "sweep.png"
STOP_WAIT_S = 5.0


class LoadTestError(OsnetTritonError):
    """A load test that could not run: no server or model at the target, or locust failed to start."""


@dataclass(kw_only=True)
class LoadTestSettings:
    """One headless locust run. `model=None`: `osnet` for the ensemble scenario, the served tensor model for `tensor`."""

    output_dir: Path
    url: str = DEFAULT_URL  # gRPC host:port, or several comma-separated; loopback unless the caller names a host
    scenario: str = "ensemble"
    model: str | None = None
    batch_size: int = 1  # images per request
    users: int = 4  # closed-loop users = requests in flight
    spawn_rate: float | None = None  # users started per second; None: all within the first second
    duration_s: int = 20
    workers: int = 0  # 0: one locust process; N: a master and N local worker processes
    image_pool: int = 64  # distinct images cycled through
    request_timeout_s: float = 10.0
    # Time allowed beyond duration_s for locust to start (workers included), stop and write its
    # reports; past it every process is killed and the run counts as failed.
    grace_s: float = 30.0
    check_target: bool = True  # one real request before the run, for a clear error instead of a run of failures
    # Ask the first server once for every request's answer before the run; locust then checks each answer
    # against it, so a server that answers well-formed but wrong embeddings fails the run.
    check_answers: bool = True

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        for url in self.urls:
            host, _, port = url.rpartition(":")
            if "://" in url or not host or not port.isdigit():
                raise ValueError(f"url must be gRPC host:port such as {DEFAULT_URL}, or several comma-separated, got {self.url!r}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        for name in ("batch_size", "users", "duration_s"):
            value = getattr(self, name)
            # Whole numbers: locust's --run-time takes whole seconds.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.spawn_rate is not None and self.spawn_rate <= 0:
            raise ValueError(f"spawn_rate must be > 0, got {self.spawn_rate}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.workers > self.users:
            raise ValueError(f"workers ({self.workers}) must not exceed users ({self.users}): a worker without users sends nothing")
        if self.image_pool < self.batch_size:
            raise ValueError(f"image_pool ({self.image_pool}) must hold at least one batch ({self.batch_size})")
        if self.request_timeout_s <= 0 or self.grace_s <= 0:
            raise ValueError("request_timeout_s and grace_s must be > 0")

    @property
    def urls(self) -> list[str]:
        return [url.strip() for url in self.url.split(",")]

    @property
    def deadline_s(self) -> float:
        """How long locust may run before it is stopped: SIGTERM, then SIGKILL 5 s later."""
        return self.duration_s + self.grace_s


def _die_with_parent() -> None:
    # A locust left behind by a killed caller would keep loading the server until its run time ends.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_environment() -> dict[str, str]:
    # LOCUST_* variables would silently change the run (users, host, run time); drop them. The
    # project root goes first on the path so the locustfile imports the same code as this process.
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOCUST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    return env


def _launch(command: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    logger.debug("starting %s", " ".join(command))
    with log.open("wb") as handle:
        return subprocess.Popen(
            command,
            cwd=cwd,  # locust reads locust.conf and pyproject.toml from its working directory: keep ours out
            env=_child_environment(),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _stop(process: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM the process's group (locust then writes its CSVs), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        # Only while unreaped: the group id is the child's pid, which cannot be reused before wait().
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _find_port() -> int:
    from osnet_base.triton_server import find_free_port

    return find_free_port()


def resolve_target(settings: LoadTestSettings) -> str:
    """Check every server answers one request of the scenario correctly; return the model to load-test.

    A wrong URL, an unserved model or a batch above the model's limit then fails here, in one clear
    message, rather than as thousands of identical failures in a report.
    """
    models = {url: _resolve_one_target(replace(settings, url=url)) for url in settings.urls}
    if len(set(models.values())) > 1:
        raise LoadTestError(f"the servers serve different models: {models}; name one with model=")
    return next(iter(models.values()))


def _resolve_one_target(settings: LoadTestSettings) -> str:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from osnet_base.api_key import grpc_headers, load_api_key
    from osnet_base.contract import EMBEDDING_NAME
    from loadtest.workload import ResponseCheckError, build_workload, check_embedding

    client = grpcclient.InferenceServerClient(settings.url)
    headers = grpc_headers(load_api_key())  # the model index is restricted to holders of the server's key
    try:
        if not client.is_server_ready(client_timeout=settings.request_timeout_s):
            raise LoadTestError(f"the Triton server at {settings.url} is not ready")
        model = settings.model or default_model(settings.scenario) or _find_tensor_model(client, settings.url, headers)
        if not client.is_model_ready(model, client_timeout=settings.request_timeout_s):
            ready = [m["name"] for m in client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
                     if m.get("state") == "READY"]
            raise LoadTestError(f"the server at {settings.url} does not serve model {model!r} (ready: {', '.join(ready) or 'none'})")
        workload = build_workload(scenario=settings.scenario, model=model, batch_size=settings.batch_size, image_pool=settings.batch_size)
        request_input = grpcclient.InferInput(workload.input_name, list(workload.batches[0].shape), workload.datatype)
        request_input.set_data_from_numpy(workload.batches[0])
        result = client.infer(
            model, [request_input], outputs=[grpcclient.InferRequestedOutput(EMBEDDING_NAME)],
            client_timeout=settings.request_timeout_s,
        )
        check_embedding(result.as_numpy(EMBEDDING_NAME), settings.batch_size)
    except InferenceServerException as exc:
        raise LoadTestError(f"{settings.scenario} request to {settings.url} failed before the load test: {exc.message() or exc}") from None
    except ResponseCheckError as exc:
        raise LoadTestError(f"{settings.url} answered a wrong embedding before the load test: {exc}") from None
    finally:
        client.close()
    return model


def write_reference_answers(settings: LoadTestSettings, model: str, path: Path) -> Path:
    """The first server's answer to each request of the workload (same images, same order as locust's),
    [requests, batch, 512], saved to `path`."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from osnet_base.contract import EMBEDDING_NAME
    from loadtest.workload import ResponseCheckError, build_workload, check_embedding

    workload = build_workload(scenario=settings.scenario, model=model, batch_size=settings.batch_size,
                              image_pool=settings.image_pool)
    answers = []
    url = settings.urls[0]
    with grpcclient.InferenceServerClient(url) as client:
        try:
            for batch in workload.batches:
                request_input = grpcclient.InferInput(workload.input_name, list(batch.shape), workload.datatype)
                request_input.set_data_from_numpy(batch)
                result = client.infer(model, [request_input], outputs=[grpcclient.InferRequestedOutput(EMBEDDING_NAME)],
                                      client_timeout=settings.request_timeout_s)
                answers.append(result.as_numpy(EMBEDDING_NAME))
                check_embedding(answers[-1], settings.batch_size)
        except InferenceServerException as exc:
            raise LoadTestError(f"reference answers from {url} failed before the load test: {exc.message() or exc}") from None
        except ResponseCheckError as exc:
            raise LoadTestError(f"{url} answered a wrong reference embedding before the load test: {exc}") from None
    np.save(path, np.stack(answers))
    return path


def _find_tensor_model(client, url: str, headers: dict[str, str] | None) -> str:
    """The one ready model taking a single INPUT of uint8 pixels [N,256,128,3]."""
    from osnet_base.contract import INPUT_DATATYPE, INPUT_NAME, INPUT_SHAPE

    found = []
    for entry in client.get_model_repository_index(headers=headers, as_json=True).get("models", []):
        if entry.get("state") != "READY":
            continue
        inputs = client.get_model_metadata(entry["name"], as_json=True).get("inputs", [])
        if len(inputs) == 1 and inputs[0]["name"] == INPUT_NAME and inputs[0]["datatype"] == INPUT_DATATYPE and tuple(
            int(d) for d in inputs[0]["shape"][1:]
        ) == INPUT_SHAPE:
            found.append(entry["name"])
    if len(found) != 1:
        what = f"several ({', '.join(found)})" if found else "none"
        raise LoadTestError(f"the tensor scenario needs one tensor model at {url}, found {what}: name it with model=")
    return found[0]


def _locust_command(settings: LoadTestSettings, model: str, prefix: Path) -> list[str]:
    spawn_rate = settings.spawn_rate if settings.spawn_rate is not None else float(settings.users)
    return [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "--only-summary",  # the periodic console table costs generator CPU and nobody reads it in a log
        "--host", settings.url,
        "--users", str(settings.users),
        "--spawn-rate", f"{spawn_rate:g}",
        "--run-time", f"{settings.duration_s}s",
        "--stop-timeout", "0",
        "--csv", str(prefix),
        "--html", str(settings.output_dir / HTML_REPORT),
        "--osnet-scenario", settings.scenario,
        "--osnet-model", model,
        "--osnet-batch-size", str(settings.batch_size),
        "--osnet-image-pool", str(settings.image_pool),
        "--osnet-request-timeout-s", f"{settings.request_timeout_s:g}",
    ]  # fmt: skip


def _clear_previous_results(output_dir: Path) -> None:
    # A stale file from an earlier run in the same folder must not be read as this run's.
    names = [SUMMARY_JSON, HTML_REPORT, RUN_PLOT, MASTER_LOG, REFERENCE_ANSWERS]
    names += [f"{CSV_PREFIX}_{kind}" for kind in ("stats.csv", "stats_history.csv", "failures.csv", "exceptions.csv", "run.json")]
    for name in names:
        (output_dir / name).unlink(missing_ok=True)
    for log in output_dir.glob("locust-worker-*.log"):
        log.unlink()


def run_load_test(settings: LoadTestSettings) -> LoadTestSummary:
    """Run locust headless for `settings.duration_s`, write its CSV and HTML, `summary.json` and the plot.

    Returns the summary whether or not the run passed (see `LoadTestSummary.passed`); raises
    `LoadTestError` when no run could happen (no server, no model, locust did not start).
    """
    output_dir = settings.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = replace(settings, output_dir=output_dir)
    _clear_previous_results(output_dir)
    model = resolve_target(settings) if settings.check_target else (settings.model or default_model(settings.scenario))
    if model is None:
        raise LoadTestError("the tensor scenario needs a model name when check_target is off")
    prefix = output_dir / CSV_PREFIX
    command = _locust_command(settings, model, prefix)
    if settings.check_answers:
        command += ["--osnet-reference", str(write_reference_answers(settings, model, output_dir / REFERENCE_ANSWERS))]
    worker_command: list[str] = []
    if settings.workers:
        port = _find_port()
        command += [
            "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
            "--expect-workers", str(settings.workers),
            "--expect-workers-max-wait", str(max(1, int(settings.grace_s / 2))),
        ]  # fmt: skip
        worker_command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE),
            "--worker", "--master-host", "127.0.0.1", "--master-port", str(port),
        ]  # fmt: skip
    logger.info(
        "load test: %d users%s on %s (%s, batch %d) at %s for %d s -> %s",
        settings.users, f" over {settings.workers} workers" if settings.workers else "", model,
        settings.scenario, settings.batch_size, settings.url, settings.duration_s, output_dir,
    )  # fmt: skip

    processes: list[subprocess.Popen] = []
    timed_out = False
    started = time.monotonic()
    try:
        master = _launch(command, output_dir / MASTER_LOG, output_dir)
        processes.append(master)
        for index in range(settings.workers):
            processes.append(_launch(worker_command, output_dir / f"locust-worker-{index}.log", output_dir))
        try:
            master.wait(timeout=settings.deadline_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            logger.error("locust still running %.0f s after start; stopping it", settings.deadline_s)
            _stop(master)
        # Workers quit when the master tells them; give them a moment before stopping them.
        worker_deadline = time.monotonic() + STOP_WAIT_S
        for process in processes[1:]:
            try:
                process.wait(timeout=max(0.1, worker_deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for process in processes:
            _stop(process)
    exit_code = None if timed_out else master.returncode
    logger.info("locust finished in %.1f s with status %s", time.monotonic() - started, exit_code)

    stats_csv = Path(f"{prefix}_stats.csv")
    if not stats_csv.is_file():
        raise LoadTestError(f"locust wrote no statistics (status {exit_code}); its log ends:\n{_log_tail(output_dir / MASTER_LOG)}")
    summary = summarize(settings, model=model, exit_code=exit_code, timed_out=timed_out)
    (output_dir / SUMMARY_JSON).write_text(summary.to_json())
    if not summary.passed:
        logger.warning(
            "load test failed: %d of %d requests failed%s; see %s",
            summary.failures, summary.requests, ", locust was killed" if timed_out else "", output_dir / SUMMARY_JSON,
        )  # fmt: skip
    return summary


def summarize(settings: LoadTestSettings, *, model: str, exit_code: int | None, timed_out: bool) -> LoadTestSummary:
    """Build the summary from the files locust left in `settings.output_dir`, and draw the run's plot."""
    output_dir = settings.output_dir
    prefix = output_dir / CSV_PREFIX
    totals = read_totals(Path(f"{prefix}_stats.csv"))
    record = read_run_record(Path(f"{prefix}_run.json"))
    elapsed_s = totals.requests / totals.requests_per_s if totals.requests_per_s > 0 else 0.0
    answered = totals.requests - totals.failures
    images_per_s = answered * settings.batch_size / elapsed_s if elapsed_s > 0 else 0.0
    plot = plot_run(
        Path(f"{prefix}_stats_history.csv"),
        Path(f"{prefix}_run.json"),
        output_dir / RUN_PLOT,
        batch_size=settings.batch_size,
        title=f"{model} ({settings.scenario}, batch {settings.batch_size}), {settings.users} users, {settings.url}",
    )
    files = {
        "summary": str(output_dir / SUMMARY_JSON),
        "html": str(output_dir / HTML_REPORT),
        "stats_csv": f"{prefix}_stats.csv",
        "history_csv": f"{prefix}_stats_history.csv",
        "failures_csv": f"{prefix}_failures.csv",
        "run_record": f"{prefix}_run.json",
        "plot": str(plot),
        "log": str(output_dir / MASTER_LOG),
    }
    return LoadTestSummary(
        scenario=settings.scenario,
        model=model,
        url=settings.url,
        batch_size=settings.batch_size,
        users=settings.users,
        workers=settings.workers,
        duration_s=settings.duration_s,
        elapsed_s=round(elapsed_s, 3),
        requests=totals.requests,
        failures=totals.failures,
        requests_per_s=round(totals.requests_per_s, 3),
        images_per_s=round(images_per_s, 3),
        p50_ms=totals.p50_ms,
        p90_ms=totals.p90_ms,
        p99_ms=totals.p99_ms,
        mean_ms=None if totals.mean_ms is None else round(totals.mean_ms, 3),
        max_ms=None if totals.max_ms is None else round(totals.max_ms, 3),
        failure_messages=read_failure_messages(Path(f"{prefix}_failures.csv")),
        requests_by_worker=record.requests_by_worker,
        answered_by_server=record.answered_by_server,
        generator_cpu_warning=record.generator_cpu_warning,
        exit_code=exit_code,
        timed_out=timed_out,
        output_dir=str(output_dir),
        files=files,
    )


@dataclass(kw_only=True)
class SweepSettings:
    """Step the user count; each step is `base` with that many users, written to `<output_dir>/users-<n>`."""

    base: LoadTestSettings
    user_counts: Sequence[int] = (1, 2, 4, 8)
    p99_objective_ms: float = 100.0

    def __post_init__(self) -> None:
        self.user_counts = tuple(self.user_counts)
        if not self.user_counts or any(n < 1 for n in self.user_counts):
            raise ValueError(f"user_counts must be one or more counts >= 1, got {self.user_counts}")
        if self.p99_objective_ms <= 0:
            raise ValueError(f"p99_objective_ms must be > 0, got {self.p99_objective_ms}")


@dataclass(frozen=True, kw_only=True)
class SweepResult:
    p99_objective_ms: float
    steps: tuple[LoadTestSummary, ...]
    knee: LoadTestSummary | None  # most images/s with p99 under the objective and no failures
    files: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.knee is not None and all(step.passed for step in self.steps)


def run_sweep(settings: SweepSettings) -> SweepResult:
    """Run one load test per user count (in the order given) and report the knee."""
    import json

    base = settings.base
    output_dir = base.output_dir.resolve()
    steps = []
    for users in settings.user_counts:
        # A distributed step cannot have more workers than users; one worker per user at most.
        step = replace(base, users=users, workers=min(base.workers, users), output_dir=output_dir / f"users-{users}")
        summary = run_load_test(step)
        logger.info("users %d: %.1f images/s, p99 %s ms, %d failures", users, summary.images_per_s, summary.p99_ms, summary.failures)
        steps.append(summary)
    knee = find_knee(steps, settings.p99_objective_ms)
    model = steps[0].model
    files = {
        "json": str(output_dir / SWEEP_JSON),
        "table": str(output_dir / SWEEP_TABLE),
        "plot": str(plot_sweep(
            steps, output_dir / SWEEP_PLOT, p99_objective_ms=settings.p99_objective_ms, knee=knee,
            title=f"{model} ({base.scenario}, batch {base.batch_size}) at {base.url}, {base.duration_s} s per step",
        )),
    }  # fmt: skip
    result = SweepResult(p99_objective_ms=settings.p99_objective_ms, steps=tuple(steps), knee=knee, files=files)
    (output_dir / SWEEP_TABLE).write_text(format_sweep(result) + "\n")
    (output_dir / SWEEP_JSON).write_text(
        json.dumps(
            {
                "p99_objective_ms": settings.p99_objective_ms,
                "knee_users": None if knee is None else knee.users,
                "knee_images_per_s": None if knee is None else knee.images_per_s,
                "passed": result.passed,
                "steps": [json.loads(step.to_json()) for step in steps],
            },
            indent=2,
        )
    )
    return result


def format_sweep(result: SweepResult) -> str:
    """The steps as a markdown table, then the knee in one line."""
    if result.knee is None:
        verdict = f"no step kept p99 under {result.p99_objective_ms:g} ms without failures"
    else:
        knee = result.knee
        verdict = (
            f"knee: {knee.users} user{'s' if knee.users > 1 else ''}, {knee.images_per_s:.1f} images/s at p99 {knee.p99_ms:.0f} ms "
            f"(objective {result.p99_objective_ms:g} ms)"
        )
    return f"{sweep_table(result.steps)}\n\n{verdict}"
