"""locust User for the served models: gRPC to Triton through tritonclient, one request event per call.

Run through `osnet-loadtest` (which bounds the run and writes the reports), or by hand:

    python -m locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 20s --host 127.0.0.1:8001 \
        --osnet-scenario ensemble --osnet-batch-size 1

Each user is a closed loop: it sends its next request as soon as the last one is answered, so
`users` is the number of requests in flight. Every response is checked (shape, finite, unit-norm
`EMBEDDING`); a wrong answer is a failure, reported like a transport error.

With several servers in `--host` (comma-separated) each process routes its users' requests through one
`client.server_pool.ServerPool`: least-loaded healthy server, one retry elsewhere on UNAVAILABLE; the
run record then says how many requests each server answered.
"""
# Order matters. Importing locust monkey-patches the standard library with gevent; gRPC must then be
# switched to gevent's event loop before any channel exists, or every call blocks the loop and N
# users give the throughput of one.
import locust  # noqa: F401  (imported first for its gevent monkey-patching)
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import collections  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from client.server_pool import ServerPool  # noqa: E402
from osnet_base.contract import DEFAULT_URL, EMBEDDING_NAME  # noqa: E402
from loadtest.workload import (  # noqa: E402
    SCENARIOS,
    ResponseCheckError,
    TritonCallError,
    check_against_reference,
    Workload,
    build_workload,
    check_embedding,
    default_model,
)

logger = logging.getLogger(__name__)

# After a failed call a user pauses briefly: against a dead server, gRPC fails in microseconds and a
# closed loop would spin the generator's CPU (shared with the server) and flood the stats.
FAILURE_PAUSE_S = 0.1
RUN_RECORD_SUFFIX = "_run.json"


@events.init_command_line_parser.add_listener
def add_osnet_arguments(parser) -> None:
    # Custom arguments, unlike environment variables, reach distributed workers: the master sends them.
    group = parser.add_argument_group("osnet-triton workload")
    group.add_argument("--osnet-scenario", choices=SCENARIOS, default="ensemble", help="ensemble: JPEG bytes to the `osnet` ensemble; tensor: uint8 pixels to the tensor model")
    group.add_argument("--osnet-model", default=None, help="model to call (default: `osnet` for ensemble; required for tensor, e.g. osnet_x1_0_fp32)")
    group.add_argument("--osnet-batch-size", type=int, default=1, help="images per request")
    group.add_argument("--osnet-image-pool", type=int, default=64, help="distinct images cycled through")
    group.add_argument("--osnet-request-timeout-s", type=float, default=10.0, help="client-side deadline of one call")
    group.add_argument("--osnet-reference", default=None, help="a .npy of the expected answers [requests, batch, 512]: every answer is compared with it")


class PreparedRequests:
    """A process's requests, serialised once: building a 3 MB tensor request per call would load the generator."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self.name = f"{workload.model} batch {workload.batch_size}"
        self.inputs = []
        for batch in workload.batches:
            request_input = grpcclient.InferInput(workload.input_name, list(batch.shape), workload.datatype)
            request_input.set_data_from_numpy(batch)
            self.inputs.append(request_input)
        self.outputs = [grpcclient.InferRequestedOutput(EMBEDDING_NAME)]


_prepared: dict[tuple, PreparedRequests] = {}
_pools: dict[str, ServerPool] = {}
_pools_lock = threading.Lock()
_reported_by_server: collections.Counter[str] = collections.Counter()


def server_pool(host: str) -> ServerPool | None:
    """This process's pool over the servers in `host`, or None for a single server."""
    if "," not in host:
        return None
    # Users start concurrently and a new pool probes its servers (yielding to the others): one at a time.
    with _pools_lock:
        if host not in _pools:
            _pools[host] = ServerPool(host, grpcclient.InferenceServerClient)
    return _pools[host]


_references: dict[str, np.ndarray] = {}


def reference_answers(path: str | None) -> np.ndarray | None:
    if path and path not in _references:
        _references[path] = np.load(path)
    return _references.get(path) if path else None


def answered_by_server() -> collections.Counter[str]:
    return collections.Counter({s.url: s.answered for pool in _pools.values() for s in pool.stats()})


def prepared_requests(options) -> PreparedRequests:
    """One PreparedRequests per process and setting: users share it (InferInput is only read by infer)."""
    model = options.osnet_model or default_model(options.osnet_scenario)
    if model is None:
        raise ValueError("--osnet-model is required for the tensor scenario (e.g. osnet_x1_0_fp32)")
    key = (options.osnet_scenario, model, options.osnet_batch_size, options.osnet_image_pool)
    if key not in _prepared:
        workload = build_workload(
            scenario=options.osnet_scenario,
            model=model,
            batch_size=options.osnet_batch_size,
            image_pool=options.osnet_image_pool,
        )
        _prepared[key] = PreparedRequests(workload)
        logger.info("prepared %d requests of %d images for %s", len(workload.batches), workload.batch_size, model)
    return _prepared[key]


class TritonGrpcUser(User):
    """One closed-loop gRPC client of Triton."""

    host = DEFAULT_URL  # loopback unless --host names another server

    def wait_time(self) -> float:
        return self._pause_s

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self._requests = prepared_requests(options)
        self._timeout_s = options.osnet_request_timeout_s
        # Users start at different points of the cycle, so concurrent requests carry different images.
        self._next = random.randrange(len(self._requests.inputs))
        self._pause_s = 0.0
        self._reference = reference_answers(options.osnet_reference)
        self._pool = server_pool(self.host)
        self._client = None if self._pool is not None else grpcclient.InferenceServerClient(self.host)

    def on_stop(self) -> None:
        # Closed here, not left to the channel's __del__, which has hung locust at exit.
        if self._client is not None:
            self._client.close()

    def _send(self, client: grpcclient.InferenceServerClient, request_input):
        requests = self._requests
        return client.infer(requests.workload.model, [request_input], outputs=requests.outputs, client_timeout=self._timeout_s)

    @task
    def infer(self) -> None:
        requests = self._requests
        index = self._next
        request_input = requests.inputs[index]
        self._next = (self._next + 1) % len(requests.inputs)
        exception: Exception | None = None
        response_length = 0
        start = time.perf_counter()
        try:
            if self._pool is None:
                result = self._send(self._client, request_input)
            else:
                result = self._pool.call(lambda client: self._send(client, request_input))
        except InferenceServerException as exc:
            result, exception = None, TritonCallError.from_exception(exc)
        # The latency is the call as a client sees it; checking the answer is the generator's own work.
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if result is not None:
            embedding = result.as_numpy(EMBEDDING_NAME)
            try:
                check_embedding(embedding, requests.workload.batch_size)
                if self._reference is not None:
                    check_against_reference(embedding, self._reference[index])
                response_length = embedding.nbytes
            except ResponseCheckError as exc:
                exception = exc
        self._pause_s = FAILURE_PAUSE_S if exception is not None else 0.0
        self.environment.events.request.fire(
            request_type="grpc",
            name=requests.name,
            response_time=elapsed_ms,
            response_length=response_length,
            exception=exception,
            context={"batch_size": requests.workload.batch_size},
        )


SERVER_COUNTS_KEY = "osnet_answered_by_server"


def report_servers_to_master(client_id: str, data: dict, **_kw) -> None:
    # Like locust's own stats, a worker reports what changed since its last report.
    current = answered_by_server()
    data[SERVER_COUNTS_KEY] = dict(current - _reported_by_server)
    _reported_by_server.update(current - _reported_by_server)


@events.init.add_listener
def finish_reports_at_quit(environment, **_kwargs) -> None:
    """Make locust's files hold the final numbers, and add what they lack in `<csv prefix>_run.json`."""
    options = environment.parsed_options
    prefix = options.csv_prefix if options is not None else None
    if isinstance(environment.runner, WorkerRunner):
        environment.events.report_to_master.add_listener(report_servers_to_master)
        return
    if not prefix:
        return
    counts: collections.Counter[str] = collections.Counter()
    by_server: collections.Counter[str] = collections.Counter()

    def on_worker_report(client_id: str, data: dict, **_kw) -> None:
        # Workers send what they measured since their last report, so the sum is the whole run.
        counts[client_id] += int(data.get("stats_total", {}).get("num_requests", 0))
        by_server.update(data.get(SERVER_COUNTS_KEY, {}))

    def on_quit(**_kw) -> None:
        # `quit` fires after the last requests (and, on a master, the workers' final reports) were counted.
        runner = environment.runner
        total = runner.stats.total
        record = {
            # Exact counts per second of completion, merged from every worker: the history CSV has only
            # running totals, which a master updates in 3 s lumps as worker reports arrive.
            "per_second": {"requests": dict(total.num_reqs_per_sec), "failures": dict(total.num_fail_per_sec)},
            "requests_by_worker": dict(counts),
            "answered_by_server": dict(by_server if isinstance(runner, MasterRunner) else answered_by_server()),
            # A generator above 90% CPU measures itself as much as the server.
            "generator_cpu_warning": bool(runner.cpu_warning_emitted or getattr(runner, "worker_cpu_warning_emitted", False)),
        }
        Path(prefix + RUN_RECORD_SUFFIX).write_text(json.dumps(record, indent=1, sort_keys=True))
        # locust's CSV writer rewrites the files once per interval and does not write again at exit, so
        # without one more turn the CSV misses the last second (and the workers' final reports).
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)

    if isinstance(environment.runner, MasterRunner):
        environment.events.worker_report.add_listener(on_worker_report)
    environment.events.quit.add_listener(on_quit)
