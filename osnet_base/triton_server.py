"""Finding and running a real `tritonserver`: NVIDIA's (on PATH in their container), else the
binary bundled in the nvidia-pytriton wheel, which runs the python backend on a CPU-only machine.

`TritonServerProcess` is what the demo, the benchmarks and the tests use: a context manager that
binds to 127.0.0.1 on free ports, waits until the server and its models are ready, keeps a bounded
log, dies with its parent, and on stop leaves no process and no shared-memory region behind.
The `tritonserver` console script (`exec_tritonserver`) makes the same binary usable by hand.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

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
    shm_region_prefix: str = field(default_factory=lambda: f"osnet_triton_{uuid.uuid4().hex[:12]}")

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} does not exist: run osnet-build first")

    def to_cli_flags(self) -> list[str]:
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
            f"--backend-config=python,shm-region-prefix-name={self.shm_region_prefix}",
        ]


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TritonServerProcess:
    """A tritonserver child process: `with TritonServerProcess(config) as server: server.grpc_url`."""

    def __init__(self, config: TritonServerConfig, install: TritonInstall | None = None, log_lines: int = 4000):
        self.config = config
        self.install = install or locate_tritonserver()
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._process: subprocess.Popen[str] | None = None
        self._log_reader: threading.Thread | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(list(self._log)[-lines:])

    def start(self, timeout_s: float = 120.0) -> TritonServerProcess:
        if self._process is not None:
            raise TritonServerError("this server was already started")
        for name in ("grpc_port", "http_port", "metrics_port"):
            if getattr(self.config, name) is None:
                setattr(self.config, name, find_free_port())
        command = self.install.command(self.config.to_cli_flags())
        logger.info("starting %s", " ".join(command))
        self._process = subprocess.Popen(
            command,
            env=self.install.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._log_reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._log_reader.start()
        try:
            self._wait_until_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._log.append(line.rstrip("\n"))

    def _wait_until_ready(self, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout_s
        with grpcclient.InferenceServerClient(self.grpc_url) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise TritonServerError(
                        f"tritonserver exited with status {self._process.returncode} while starting:\n{self.log_tail()}"
                    )
                try:
                    if client.is_server_live() and client.is_server_ready():
                        index = client.get_model_repository_index(as_json=True).get("models", [])
                        failed = [m for m in index if m.get("state") == "UNAVAILABLE"]
                        if failed:
                            reasons = "; ".join(f"{m['name']}: {m.get('reason', '?')}" for m in failed)
                            raise TritonServerError(f"models failed to load: {reasons}\n{self.log_tail()}")
                        if index and all(m.get("state") == "READY" for m in index):
                            logger.info("tritonserver ready on %s with %d models", self.grpc_url, len(index))
                            return
                except InferenceServerException:
                    pass
                time.sleep(0.1)
        raise TritonServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGINT, wait for a clean exit, then SIGKILL the whole process group; idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                # Triton gives models exit_timeout_s to unload; a server still up a little after
                # that is stuck (seen with clients still connected), and is killed below.
                process.wait(timeout=self.config.exit_timeout_s + 3)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not exit on SIGINT; killing it")
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # python backend stubs share the server's group
            except ProcessLookupError:
                pass
            process.wait()
            if self._log_reader is not None:
                self._log_reader.join(timeout=5)
        for region in SHM_DIR.glob(f"{self.config.shm_region_prefix}*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServerProcess:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


DEFAULT_ADDRESS_FLAGS = ("--grpc-address", "--http-address", "--metrics-address")


def exec_tritonserver() -> None:
    """The `tritonserver` command of the project's venv: the real server, bound to 127.0.0.1 unless told otherwise."""
    install = locate_tritonserver()
    flags = sys.argv[1:]
    flags += [f"{flag}={LOOPBACK}" for flag in DEFAULT_ADDRESS_FLAGS if not any(f.startswith(flag) for f in flags)]
    command = install.command(flags)
    os.execve(command[0], command, install.environment())
