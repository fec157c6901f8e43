"""Finding and running a real `tritonserver`: NVIDIA's (on PATH in their container), else the
binary bundled in the nvidia-pytriton wheel, which runs the python backend on a CPU-only machine.

The server always runs under the supervisor (`osnet_base.supervisor`): private shared memory, the
administrative APIs behind a key, health from a real inference, a restart when a stub or the
server dies, and nothing left behind. Both ways to run it go through the supervisor:
- the `tritonserver` console script (`exec_tritonserver`), the documented way to serve by hand;
- `TritonServerProcess`, what the demo, the benchmarks, `osnet-build` and the tests use: a context
  manager that binds to 127.0.0.1 on free ports, waits until a real inference through the models
  is answered correctly, keeps a bounded log, dies with its parent, and on stop leaves no process
  and no shared-memory region behind.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from osnet_base.api_key import API_KEY_ENV, load_api_key
from osnet_base.errors import OsnetTritonError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SHM_DIR = Path("/dev/shm")
# glibc's defaults hand every freed 12.6 MB batch-32 tensor back to the kernel, and the next request
# page-faults it in again: on a VM that costs more CPU than copying it. Keep such buffers instead.
# 32 MiB is the largest mmap threshold glibc accepts.
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 32 << 20, 128 << 20
KEEP_LARGE_BUFFERS = f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD_BYTES}:glibc.malloc.trim_threshold={TRIM_THRESHOLD_BYTES}"


class TritonServerError(OsnetTritonError):
    """The server could not be found, did not start, or died."""


@dataclass(frozen=True)
class TritonInstall:
    """A runnable tritonserver: its binary, and what it needs to find its python backend."""

    binary: Path
    backend_directory: Path | None = None
    library_path: tuple[str, ...] = ()

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("GLIBC_TUNABLES", KEEP_LARGE_BUFFERS)  # the user's own tunables win
        if self.library_path:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*self.library_path, env.get("LD_LIBRARY_PATH", "")]).rstrip(
                os.pathsep
            )
        return env

    def command(self, flags: list[str]) -> list[str]:
        backend = [f"--backend-directory={self.backend_directory}"] if self.backend_directory else []
        return [str(self.binary), *backend, *flags]


def _is_executable_binary(path: Path) -> bool:
    # Our own `tritonserver` console script is on PATH too; only a real ELF binary counts.
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"\x7fELF" and os.access(path, os.X_OK)
    except OSError:
        return False


def locate_tritonserver() -> TritonInstall:
    """NVIDIA's tritonserver on PATH if there is one, else the one in the nvidia-pytriton wheel."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "tritonserver"
        if directory and _is_executable_binary(candidate):
            return TritonInstall(binary=candidate)
    try:
        import pytriton
    except ImportError:
        raise TritonServerError(
            "no tritonserver found: run inside NVIDIA's Triton container, or install nvidia-pytriton (make test does)"
        ) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    install_python_backend_stub(root)
    # The stub links libpython: make it load the very libpython of this interpreter.
    return TritonInstall(
        binary=root / "bin" / "tritonserver",
        backend_directory=root / "backends",
        library_path=(sysconfig.get_config_var("LIBDIR"),),
    )


def install_python_backend_stub(pytriton_server_root: Path) -> None:
    """The wheel ships one stub per Python; the backend runs the one beside it, so put ours there once."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pytriton_server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = pytriton_server_root / "backends" / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"nvidia-pytriton has no python backend stub for Python {version}")
    if not target.is_file() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# The python backend's regions of a supervised server are named <family><12 hex>_g<generation>_<uuid>.
REGION_FAMILY = "osnet_triton_"
SUPERVISED_REGION = re.compile(rf"{REGION_FAMILY}[0-9a-f]{{12}}_g[0-9]+_")


def new_region_prefix() -> str:
    return f"{REGION_FAMILY}{uuid.uuid4().hex[:12]}_"


@dataclass(kw_only=True)
class TritonServerConfig:
    """Server flags. Ports of `None` are chosen free at start; addresses default to loopback only."""

    model_repository: Path
    host: str = LOOPBACK
    grpc_port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None
    exit_timeout_s: int = 3
    log_verbose: int = 0
    # Every region the server's python backend creates is named <prefix>g<generation>_<uuid>.
    shm_region_prefix: str = field(default_factory=new_region_prefix)
    # What callers of the restricted APIs must send (see osnet_base.api_key): by default this user's key.
    api_key: str = field(default_factory=lambda: load_api_key(create=True), repr=False)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} does not exist: run osnet-build first")

    def to_cli_flags(self) -> list[str]:
        """tritonserver's flags; the supervisor adds the region prefix and the API restrictions."""
        return [
            f"--model-repository={self.model_repository}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            "--disable-auto-complete-config",
        ]


SUPERVISOR_FLAG_PREFIX = "supervisor-"


@dataclass(kw_only=True)
class SupervisionPolicy:
    """How the supervisor judges and heals the server. Detection bounds: a dead stub or server is seen
    within `watch_interval_s`; a wedged one after `probe_failures` probes in a row failed, at most
    probe_failures * (probe_interval_s + probe_timeout_s) after it stopped answering."""

    start_timeout_s: float = 120.0  # a model that never loads fails the start, with the offending log line
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 5.0  # generous: a probe queues behind the load like any request
    probe_failures: int = 2
    watch_interval_s: float = 0.25
    restart: bool = True
    # Restart at once after a server that ran `stable_after_s`; a crash loop waits 1, 2, 4 ... up to 30 s.
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    stable_after_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("start_timeout_s", "probe_interval_s", "probe_timeout_s", "watch_interval_s", "backoff_initial_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.probe_failures < 1:
            raise ValueError(f"probe_failures must be >= 1, got {self.probe_failures}")
        if self.backoff_max_s < self.backoff_initial_s or self.stable_after_s < 0:
            raise ValueError("backoff_max_s must be >= backoff_initial_s and stable_after_s >= 0")

    def backoff_s(self, failures_in_a_row: int) -> float:
        """The wait before the next start after `failures_in_a_row` generations that never became stable."""
        if failures_in_a_row == 0:
            return 0.0
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures_in_a_row - 1))

    def to_cli_flags(self) -> list[str]:
        """The supervisor's flags for this policy (`osnet_base.supervisor` generates them from the fields)."""
        flags = []
        for name, value in vars(self).items():
            flag = f"--{SUPERVISOR_FLAG_PREFIX}{name.replace('_', '-')}"
            flags.append(flag if value is True else flag.replace("--", "--no-", 1) if value is False else f"{flag}={value}")
        return flags


def process_status(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def process_arguments(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [argument.decode(errors="replace") for argument in cmdline.read().split(b"\0") if argument]
    except OSError:
        return []


def _owned_by_us(path: str | Path) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_uid == os.getuid()
    except OSError:
        return False


def processes_mentioning(text: str) -> list[int]:
    """This user's live processes with `text` in an argument: python-backend stubs carry their region prefix there."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and any(text in argument for argument in process_arguments(int(entry.name))):
            status = process_status(int(entry.name))
            if status is not None and status[0] not in "ZX" and _owned_by_us(entry.path):
                found.append(int(entry.name))
    return found


def children_of(parent: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            status = process_status(int(entry.name))
            if status is not None and status[1] == parent:
                found.append(int(entry.name))
    return found


def shm_regions(prefix: str) -> list[Path]:
    """This user's /dev/shm regions whose names start with `prefix`."""
    return sorted(path for path in SHM_DIR.glob(f"{prefix}*") if _owned_by_us(path))


def remove_regions(regions: Iterable[Path]) -> int:
    removed = 0
    for region in regions:
        try:
            region.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _die_with_parent(signal_number: int = signal.SIGKILL) -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal_number)


def _terminate_with_parent() -> None:
    # SIGTERM, not SIGKILL: the supervisor then still stops the server and removes its stubs and regions.
    _die_with_parent(signal.SIGTERM)


# How TritonServerProcess hands its TritonInstall's command (JSON argv, the flags follow) to the supervisor.
SERVER_COMMAND_ENV = "OSNET_TRITON_SERVER_COMMAND"
# What the supervisor logs when a generation serves, and when the first one never did.
SUPERVISOR_SERVING = "tritonserver serving:"
SUPERVISOR_START_FAILURE = "tritonserver did not start:"


class TritonServerProcess:
    """A supervised tritonserver: `with TritonServerProcess(config) as server: server.grpc_url`.

    `pid` is the supervisor's: it leads a process group holding the server and its stubs.
    """

    def __init__(self, config: TritonServerConfig, install: TritonInstall | None = None, log_lines: int = 4000,
                 policy: SupervisionPolicy | None = None):
        self.config = config
        self.policy = policy or SupervisionPolicy()
        self.install = install or locate_tritonserver()
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._process: subprocess.Popen[str] | None = None
        self._log_reader: threading.Thread | None = None
        self._serving = threading.Event()
        self._start_failure: str | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def api_key(self) -> str:
        return self.config.api_key

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def server_pid(self) -> int | None:
        """The tritonserver the supervisor runs now (it changes when the supervisor restarts it)."""
        if self._process is None:
            return None
        for child in children_of(self._process.pid):
            arguments = process_arguments(child)
            if arguments and Path(arguments[0]).name == "tritonserver":
                return child
        return None

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(list(self._log)[-lines:])

    def start(self, timeout_s: float | None = None) -> TritonServerProcess:
        """Start the supervisor and wait until it serves, at most `timeout_s` (default: the policy's
        start timeout); a server that cannot start fails with its offending log line."""
        if self._process is not None:
            raise TritonServerError("this server was already started")
        for name in ("grpc_port", "http_port", "metrics_port"):
            if getattr(self.config, name) is None:
                setattr(self.config, name, find_free_port())
        timeout_s = self.policy.start_timeout_s if timeout_s is None else timeout_s
        policy = dataclasses.replace(self.policy, start_timeout_s=timeout_s)
        command = [sys.executable, "-m", "osnet_base.supervisor", *policy.to_cli_flags(),
                   f"--{SUPERVISOR_FLAG_PREFIX}region-prefix={self.config.shm_region_prefix}", *self.config.to_cli_flags()]
        logger.info("starting %s", " ".join(command))
        self._process = subprocess.Popen(
            command,
            # The environment, unlike the arguments, is private: the key and the server's command go there.
            env={**self.install.environment(), API_KEY_ENV: self.config.api_key,
                 SERVER_COMMAND_ENV: json.dumps(self.install.command([]))},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        self._log_reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._log_reader.start()
        try:
            self._wait_until_serving(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._log.append(line.rstrip("\n"))
            if SUPERVISOR_SERVING in line:
                self._serving.set()
            elif SUPERVISOR_START_FAILURE in line:
                self._start_failure = line.split(SUPERVISOR_START_FAILURE, 1)[1].strip()

    def _wait_until_serving(self, timeout_s: float) -> None:
        # The supervisor bounds the start itself and says when its own probe was answered; waiting
        # for its word (not a probe of ours) means it watches the stubs before anyone uses them.
        deadline = time.monotonic() + timeout_s + 15
        while not self._serving.wait(0.05):
            if self._process.poll() is not None:
                self._log_reader.join(timeout=5)
                reason = self._start_failure or f"its supervisor exited with status {self._process.returncode}"
                raise TritonServerError(f"tritonserver did not start: {reason}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TritonServerError(f"tritonserver not serving after {timeout_s:.0f} s:\n{self.log_tail()}")
        logger.info("tritonserver serving on %s", self.grpc_url)

    def stop(self) -> None:
        """SIGTERM the supervisor (it stops the server and cleans up), then SIGKILL whatever is left; idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.config.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                logger.warning("the tritonserver supervisor did not exit on SIGTERM; killing its process group")
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the server and its stubs share the supervisor's group
            except ProcessLookupError:
                pass
            process.wait()
            if self._log_reader is not None:
                self._log_reader.join(timeout=5)
        for pid in processes_mentioning(self.config.shm_region_prefix):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_regions(shm_regions(self.config.shm_region_prefix))

    def __enter__(self) -> TritonServerProcess:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def exec_tritonserver() -> None:
    """The `tritonserver` command of the project's venv: the real server under the supervisor, bound
    to 127.0.0.1 unless told otherwise (`tritonserver --help` lists the supervisor's options too)."""
    from osnet_base.supervisor import main

    sys.exit(main(sys.argv[1:]))
