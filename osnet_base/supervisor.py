"""The supervisor of tritonserver: the parent that keeps its health honest and cleans up after it.

Triton 2.51 alone, as operators and hostile local users found it:
- a python-backend stub killed under load leaves the server READY while it fails every request,
  and nothing restarts the stub;
- any loopback client may register the backend's own /dev/shm regions as shared memory (the
  server then aborts) or change the log level; the regions themselves are created 0644;
- `kill -9 tritonserver` orphans its stubs (~100 MB each) and leaks their regions;
- a python model whose model.py is missing makes the server wait forever, ports closed.

So the supervisor runs the server as its child, under umask 077 (every region 0600), with shared
memory, the model repository, logging and tracing restricted to holders of the API key
(`osnet_base.api_key`), and each server generation's regions named `<prefix>g<N>_...`. It is the
subreaper of the server's descendants. It watches the server and every stub (a death is seen within
`watch_interval_s`) and probes with a real inference through the `osnet` ensemble (a wedged stub
is seen after `probe_failures` failed probes); then it kills the generation, every process that
carries its prefix, every orphan it inherited, removes the generation's regions, and starts the
next generation, at once after a stable one, with back-off in a crash loop. The first start is
bounded: a model that never loads ends it with the offending log line and status 1.

Run it as `tritonserver [--supervisor-* options] [tritonserver flags]` (the venv's console script)
or `python -m osnet_base.supervisor ...`; SIGTERM, SIGINT or SIGHUP stop it cleanly.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import logging
import os
import secrets
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osnet_base.api_key import API_KEY_ENV, api_key_file, load_api_key, restriction_flags
from osnet_base.arguments import add_dataclass_arguments, dataclass_from_arguments
from osnet_base.contract import ENSEMBLE_MODEL
from osnet_base.health import PROBE_CHANNEL_ARGS, InferenceCheck, check_inference
from osnet_base.triton_server import (
    LOOPBACK,
    REGION_FAMILY,
    SERVER_COMMAND_ENV,
    SHM_DIR,
    SUPERVISOR_FLAG_PREFIX,
    SUPERVISOR_SERVING,
    SUPERVISOR_START_FAILURE,
    SUPERVISED_REGION,
    SupervisionPolicy,
    TritonServerError,
    _die_with_parent,
    children_of,
    locate_tritonserver,
    new_region_prefix,
    process_arguments,
    process_status,
    processes_mentioning,
    remove_regions,
    shm_regions,
)

logger = logging.getLogger("osnet_base.supervisor")  # also when run as __main__

PR_SET_CHILD_SUBREAPER = 36
STUB_BINARY = "triton_python_backend_stub"
DEFAULT_GRPC_PORT = 8001
DEFAULT_EXIT_TIMEOUT_S = 30  # tritonserver's own default
ADDRESS_FLAGS = ("--grpc-address", "--http-address", "--metrics-address")
# Log lines that explain a failed start, the most telling first. After the first kind the server
# neither loads the model nor exits: it waits for the stub forever.
FAIL_FAST_MARKERS = ("Failed to preinitialize Python stub",)
OFFENDING_MARKERS = (*FAIL_FAST_MARKERS, "failed to load '", "Failed to create instance", "error: creating server")
# Beyond the server's exit timeout, what a clean stop may take before the server is killed.
STOP_GRACE_S = 3.0


def offending_line(lines: Iterable[str]) -> str | None:
    """The log line that best explains why a server did not start."""
    lines = list(lines)
    for marker in OFFENDING_MARKERS:
        for line in lines:
            if marker in line:
                return line.strip()
    return None


def probe_server(url: str, model: str | None, timeout_s: float, reference: Any = None) -> InferenceCheck:
    """A real inference through `model` (the ensemble); for a repository without one, Triton's own
    readiness (strict: every model loaded) is the best there is."""
    if model is not None:
        return check_inference(url, timeout_s, model, reference)
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    try:
        with grpcclient.InferenceServerClient(url, channel_args=PROBE_CHANNEL_ARGS) as client:
            ready = client.is_server_ready(client_timeout=timeout_s)
    except InferenceServerException as exc:
        return InferenceCheck(False, f"{exc.status() or 'error'}: {exc.message() or exc}", time.monotonic() - started)
    return InferenceCheck(ready, "server ready (no ensemble to infer through)" if ready else "server not ready",
                          time.monotonic() - started)


def hide_argument(pid: int, secret: str) -> bool:
    """Overwrite `secret` in the argument memory of `pid`, which /proc/PID/cmdline shows to every local
    user. Triton reads its restricted-API key only from its command line; once it parsed its flags
    the copy in argv is dead. Needs ptrace rights over the child (a parent has them unless
    kernel.yama.ptrace_scope >= 2)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49 of proc(5)
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as memory:
            memory.seek(start)
            arguments = memory.read(end - start)
            hidden = arguments.replace(secret.encode(), b"*" * len(secret.encode()))
            if hidden != arguments:
                memory.seek(start)
                memory.write(hidden)
        return True
    except (OSError, ValueError, IndexError) as exc:
        logger.warning("could not hide the API key from tritonserver's command line (%s): local users can read "
                       "it in /proc/%d/cmdline", exc, pid)
        return False


def make_private(region: Path) -> bool:
    """chmod `region` 0600 if it is still ours and a regular file (never through a planted symlink)."""
    try:
        descriptor = os.open(region, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_uid != os.getuid() or stat.S_IMODE(status.st_mode) == 0o600:
            return False
        os.fchmod(descriptor, 0o600)
        return True
    finally:
        os.close(descriptor)


class PrivateRegions:
    """Makes every /dev/shm region named `prefix`... mode 0600 the moment it appears.

    The umask is not enough: the python backend creates its regions with boost.interprocess, which
    fchmods each new one to 0644 whatever the umask. So a thread watches /dev/shm (inotify, else a
    10 ms poll) and chmods them. Between the backend's creation and this chmod (well under a
    millisecond with inotify) another local user who opens the region keeps their descriptor:
    only the backend creating its regions 0600 itself would close that gap.
    """

    IN_ATTRIB, IN_CREATE = 0x004, 0x100
    EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="private-regions", daemon=True)

    def start(self) -> PrivateRegions:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def sweep(self) -> None:
        for region in shm_regions(self.prefix):
            make_private(region)

    def _run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        descriptor = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if descriptor < 0 or libc.inotify_add_watch(descriptor, str(SHM_DIR).encode(), self.IN_CREATE | self.IN_ATTRIB) < 0:
            if descriptor >= 0:
                os.close(descriptor)
            logger.warning("inotify unavailable (errno %d): polling %s for new regions", ctypes.get_errno(), SHM_DIR)
            while not self._stop.wait(0.01):
                self.sweep()
            return
        try:
            self.sweep()  # regions made before the watch began
            while not self._stop.is_set():
                if not select.select([descriptor], [], [], 0.25)[0]:
                    continue
                events = os.read(descriptor, 64 * 1024)
                offset = 0
                while offset < len(events):
                    _, _, _, length = self.EVENT_HEADER.unpack_from(events, offset)
                    offset += self.EVENT_HEADER.size
                    name = events[offset : offset + length].rstrip(b"\0").decode(errors="replace")
                    offset += length
                    if name.startswith(self.prefix):
                        make_private(SHM_DIR / name)
        finally:
            os.close(descriptor)


def sweep_orphaned_stubs() -> int:
    """Kill this user's python-backend stubs of supervised servers (regions named
    `osnet_triton_<id>_g<N>_...`) whose tritonserver is gone, and remove the regions named on their
    command lines. Only a supervisor killed with SIGKILL leaves such orphans (its server dies with it,
    the stubs do not); the next supervisor cleans up after it."""
    swept = 0
    for pid in processes_mentioning(REGION_FAMILY):
        arguments = process_arguments(pid)
        status = process_status(pid)
        regions = [argument for argument in arguments if SUPERVISED_REGION.match(argument)]
        if not regions or Path(arguments[0]).name != STUB_BINARY or status is None:
            continue
        parent = process_arguments(status[1])
        if parent and Path(parent[0]).name == "tritonserver":
            continue  # a live server's stub
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        swept += 1
        remove_regions(path for region in regions for path in shm_regions(region))
        logger.warning("killed stub %d, orphaned by a server that died with its supervisor", pid)
    return swept


def _set_child_subreaper() -> None:
    # Orphans of the server (its stubs, after `kill -9 tritonserver`) become our children, not init's.
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        logger.warning("could not become a subreaper (errno %d): stubs orphaned by a dead server are found by "
                       "their region prefix only", ctypes.get_errno())


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _describe_exit(status: int) -> str:
    return f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"


@dataclass
class _Generation:
    """One tritonserver process, its stubs and its regions (all named `prefix`...)."""

    number: int
    prefix: str
    process: subprocess.Popen
    log: collections.deque
    reader: threading.Thread | None = None
    private_regions: PrivateRegions | None = None
    fatal_line: str | None = None
    stubs: dict[int, str] = field(default_factory=dict)  # pid -> model
    ready_at: float | None = None
    reference: Any = None  # the first correct embedding of the probe image: later answers must match it


class TritonSupervisor:
    """Runs tritonserver generation after generation until asked to stop; see the module docstring."""

    def __init__(self, server_command: list[str], server_environment: dict[str, str], flags: list[str], *, api_key: str,
                 region_prefix: str, probe_url: str, probe_model: str | None, exit_timeout_s: float,
                 policy: SupervisionPolicy, log_lines: int = 2000):
        self.server_command, self.server_environment = server_command, server_environment
        self.flags, self.api_key = flags, api_key
        self.region_prefix, self.probe_url, self.probe_model = region_prefix, probe_url, probe_model
        self.exit_timeout_s, self.policy, self.log_lines = exit_timeout_s, policy, log_lines
        self._stopping = threading.Event()
        self._probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")

    def request_stop(self, *_signal_args: object) -> None:
        self._stopping.set()

    def run(self) -> int:
        """0 after a requested stop; 1 if the first server never served, or failed with restarts off."""
        _set_child_subreaper()
        sweep_orphaned_stubs()
        failures_in_a_row = 0
        number = 0
        while True:
            number += 1
            generation = self._start(number)
            try:
                problem = self._wait_until_serving(generation)
                if problem is None:
                    problem = self._watch(generation)
            except BaseException:
                self._stop(generation, graceful=False)  # a bug of ours must not orphan the server's stubs
                raise
            stopping = self._stopping.is_set()
            self._stop(generation, graceful=stopping)
            if stopping:
                return 0
            if generation.ready_at is None and number == 1:
                logger.error("%s %s", SUPERVISOR_START_FAILURE, problem)
                return 1
            if not self.policy.restart:
                logger.error("tritonserver failed and restarts are off: %s", problem)
                return 1
            stable = generation.ready_at is not None and time.monotonic() - generation.ready_at >= self.policy.stable_after_s
            failures_in_a_row = 0 if stable else failures_in_a_row + 1
            delay = self.policy.backoff_s(failures_in_a_row)
            logger.warning("restarting tritonserver%s: %s", f" in {delay:.0f} s" if delay else "", problem)
            if self._stopping.wait(delay):
                return 0

    def _start(self, number: int) -> _Generation:
        prefix = f"{self.region_prefix}g{number}_"
        private_regions = PrivateRegions(prefix).start()  # watching before the server can create any
        command = [*self.server_command, *self.flags, f"--backend-config=python,shm-region-prefix-name={prefix}",
                   *restriction_flags(self.api_key)]
        process = subprocess.Popen(
            command,
            env=self.server_environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            umask=0o077,  # for whatever the server creates itself; its regions need PrivateRegions too
            preexec_fn=_die_with_parent,  # the server stays in our process group: whoever kills it kills all
        )
        generation = _Generation(number, prefix, process, collections.deque(maxlen=self.log_lines), private_regions=private_regions)
        generation.reader = threading.Thread(target=self._forward_log, args=(generation,), name="tritonserver-log", daemon=True)
        generation.reader.start()
        logger.info("started tritonserver %d (generation %d, regions %s*)", process.pid, number, prefix)
        return generation

    def _forward_log(self, generation: _Generation) -> None:
        hidden = False
        for line in generation.process.stdout:
            if not hidden:  # the server prints only after it parsed its flags
                hide_argument(generation.process.pid, self.api_key)
                hidden = True
            if generation.fatal_line is None and any(marker in line for marker in FAIL_FAST_MARKERS):
                generation.fatal_line = line.strip()
            generation.log.append(line.rstrip("\n"))
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (OSError, ValueError):
                pass  # nobody reads our output any more; keep draining the server's, or it blocks on its log

    def _wait_until_serving(self, generation: _Generation) -> str | None:
        """None once a probe is answered correctly; else why the generation never served."""
        deadline = time.monotonic() + self.policy.start_timeout_s
        last = "no probe answered yet"
        while not self._stopping.is_set():
            status = generation.process.poll()
            if status is not None:
                generation.reader.join(timeout=5)
                return f"tritonserver {_describe_exit(status)}: {offending_line(generation.log) or 'see its log above'}"
            if generation.fatal_line is not None:
                return f"{generation.fatal_line} (the server would wait for it forever)"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"not serving after {self.policy.start_timeout_s:.0f} s: {offending_line(generation.log) or last}"
            check = probe_server(self.probe_url, self.probe_model, min(self.policy.probe_timeout_s, remaining))
            if check.ok:
                generation.ready_at = time.monotonic()
                generation.reference = check.embedding
                generation.stubs = self._stubs(generation)
                logger.info("%s generation %d on %s (tritonserver %d; stubs %s): %s", SUPERVISOR_SERVING,
                            generation.number, self.probe_url, generation.process.pid,
                            ", ".join(f"{pid} {model}" for pid, model in generation.stubs.items()) or "none", check.detail)
                return None
            last = check.detail
            self._stopping.wait(0.2)
        return "stop requested"

    @staticmethod
    def _stubs(generation: _Generation) -> dict[int, str]:
        stubs = {}
        for pid in processes_mentioning(generation.prefix):
            arguments = process_arguments(pid)
            if arguments and Path(arguments[0]).name == STUB_BINARY:
                # The stub's first argument is <repository>/<model>/<version>/model.py.
                stubs[pid] = Path(arguments[1]).parent.parent.name if len(arguments) > 1 else "?"
        return stubs

    def _watch(self, generation: _Generation) -> str:
        """Wait until the generation fails; return how."""
        policy, server = self.policy, generation.process
        failures = 0
        probe: Future | None = None
        next_probe = time.monotonic() + policy.probe_interval_s
        while not self._stopping.wait(policy.watch_interval_s):
            status = server.poll()
            if status is not None:
                return f"tritonserver {server.pid} {_describe_exit(status)}"
            for pid, model in generation.stubs.items():
                state = process_status(pid)
                if state is None or state[0] in "ZX" or state[1] != server.pid:
                    return f"python backend stub {pid} ({model}) died"
            if probe is not None and probe.done():
                check, probe = probe.result(), None
                next_probe = time.monotonic() + policy.probe_interval_s
                failures = 0 if check.ok else failures + 1
                if not check.ok:
                    logger.warning("probe %d of %d failed: %s", failures, policy.probe_failures, check.detail)
                if failures >= policy.probe_failures:
                    return f"{failures} probes in a row failed, the last: {check.detail}"
            if probe is None and time.monotonic() >= next_probe:
                probe = self._probes.submit(probe_server, self.probe_url, self.probe_model, policy.probe_timeout_s,
                                            generation.reference)
        return "stop requested"

    def _stop(self, generation: _Generation, graceful: bool) -> None:
        """End the generation: the server (cleanly if `graceful`), then every process and region it left."""
        server = generation.process
        if graceful and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=self.exit_timeout_s + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver %d did not exit on SIGINT; killing it", server.pid)
        if server.poll() is None:
            server.kill()  # unhealthy: a clean shutdown would wait the exit timeout for the dead stub
        server.wait()
        killed = self._kill_leftovers(generation.prefix)
        generation.reader.join(timeout=5)  # only now: surviving stubs held the server's log pipe open
        generation.private_regions.stop()
        removed = remove_regions(shm_regions(generation.prefix))
        logger.info("generation %d stopped: %d leftover processes killed, %d shared-memory regions removed",
                    generation.number, killed, removed)

    @staticmethod
    def _kill_leftovers(prefix: str, timeout_s: float = 10.0) -> int:
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while True:
            # The server is reaped, so any child of ours is one of its orphans.
            leftovers = set(processes_mentioning(prefix)) | set(children_of(os.getpid()))
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            _reap_children()
            if not leftovers:
                return len(killed)
            if time.monotonic() > deadline:
                logger.error("processes %s outlived their server", sorted(leftovers))
                return len(killed)
            time.sleep(0.05)


POLICY_HELP = {
    "start_timeout_s": "a first start not serving by then fails, naming the offending log line",
    "probe_interval_s": "seconds between health probes, each a real inference through the osnet ensemble",
    "probe_timeout_s": "a probe unanswered this long failed",
    "probe_failures": "failed probes in a row that end the server",
    "watch_interval_s": "seconds between looks at the server's and the stubs' processes",
    "restart": "restart the server when it fails (else exit with status 1)",
    "backoff_initial_s": "the first wait in a crash loop, doubled each time",
    "backoff_max_s": "the longest wait in a crash loop",
    "stable_after_s": "a server that served this long is restarted at once; sooner failures back off",
}


def supervisor_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritonserver", add_help=False, allow_abbrev=False,
        description="tritonserver under the osnet-triton supervisor. Every other flag goes to tritonserver; "
        "--grpc-address, --http-address and --metrics-address default to 127.0.0.1.",
    )
    group = parser.add_argument_group("supervisor")
    add_dataclass_arguments(group, SupervisionPolicy, help=POLICY_HELP, prefix=SUPERVISOR_FLAG_PREFIX)
    group.add_argument(f"--{SUPERVISOR_FLAG_PREFIX}region-prefix", dest="region_prefix", default=None,
                       help=f"name prefix of the python backend's /dev/shm regions (default: {REGION_FAMILY}<random>_)")
    return parser


def _served_flags_parser() -> argparse.ArgumentParser:
    """The tritonserver flags the supervisor must read (they still go to the server as given)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model-repository", "--model-store", action="append", default=[])
    parser.add_argument("--grpc-address", default=LOOPBACK)
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--allow-grpc", default="true")
    parser.add_argument("--exit-timeout-secs", type=int, default=DEFAULT_EXIT_TIMEOUT_S)
    parser.add_argument("--backend-config", action="append", default=[])
    parser.add_argument("--grpc-restricted-protocol", action="append", default=[])
    parser.add_argument("--http-restricted-api", action="append", default=[])
    return parser


def _probe_host(address: str) -> str:
    if address in ("0.0.0.0", ""):
        return LOOPBACK
    if address in ("::", "[::]"):
        return "[::1]"
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _api_key() -> str:
    try:
        return load_api_key(create=True)
    except OSError as exc:
        # Locked to a key nobody else has is still safe: the server serves, its admin APIs answer no one.
        logger.warning("cannot keep an API key in %s (%s): the restricted APIs answer no one this run; "
                       "set %s to share one", api_key_file(), exc, API_KEY_ENV)
        return secrets.token_urlsafe(32)


def supervisor_from_flags(argv: list[str]) -> TritonSupervisor:
    options, triton_flags = supervisor_parser().parse_known_args(argv)
    served, _ = _served_flags_parser().parse_known_args(triton_flags)
    if served.grpc_restricted_protocol or served.http_restricted_api:
        raise TritonServerError("the supervisor restricts the administrative APIs itself, with the key of "
                                "osnet_base.api_key (set OSNET_TRITON_API_KEY to choose it): drop --grpc-restricted-protocol "
                                "and --http-restricted-api")
    if any("shm-region-prefix-name" in setting for setting in served.backend_config):
        raise TritonServerError("the supervisor names the python backend's regions itself: use --supervisor-region-prefix")
    if served.allow_grpc.lower() in ("false", "0", "off"):
        raise TritonServerError("the supervisor probes the server over gRPC: keep --allow-grpc on")
    flags = [*triton_flags, *(f"{flag}={LOOPBACK}" for flag in ADDRESS_FLAGS if not any(f.startswith(flag) for f in triton_flags))]
    has_ensemble = any((Path(repository) / ENSEMBLE_MODEL).is_dir() for repository in served.model_repository)
    if not has_ensemble:
        logger.warning("no %s ensemble in the repository: health is Triton's own readiness, not a real inference", ENSEMBLE_MODEL)
    policy = dataclass_from_arguments(SupervisionPolicy, options)
    environment = dict(os.environ)
    given = environment.pop(SERVER_COMMAND_ENV, None)  # TritonServerProcess's own install
    if given is not None:
        server_command = json.loads(given)
    else:
        install = locate_tritonserver()
        server_command, environment = install.command([]), install.environment()
    return TritonSupervisor(
        server_command, environment, flags, api_key=_api_key(),
        region_prefix=options.region_prefix or new_region_prefix(),
        probe_url=f"{_probe_host(served.grpc_address)}:{served.grpc_port}",
        probe_model=ENSEMBLE_MODEL if has_ensemble else None, exit_timeout_s=served.exit_timeout_secs, policy=policy,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        supervisor_parser().print_help()
        print("\ntritonserver's own flags:\n", flush=True)
        install = locate_tritonserver()
        return subprocess.run(install.command(["--help"]), env=install.environment()).returncode
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="osnet-supervisor: %(asctime)s %(levelname)s %(message)s")
    try:
        supervisor = supervisor_from_flags(argv)
    except (TritonServerError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, supervisor.request_stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
