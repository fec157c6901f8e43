"""nginx as a per-request gRPC balancer in front of several Triton servers: its config, written from the server list.

A gRPC client keeps one HTTP/2 connection, and a TCP balancer would pin all its requests to one server
(triton-inference-server/server#6177). nginx terminates HTTP/2 and balances each request (`grpc_pass`):
- round robin over the upstream (`balance="least_conn"` for servers that differ), keepalive connections to each;
- a server whose connection fails is out for `fail_timeout_s` (`max_fails=1`), then tried again;
- `grpc_next_upstream`: a request whose server could not be reached is passed to the next one.
  nginx re-sends a POST (every gRPC call is one) that already reached a server only with
  `non_idempotent`, and only while it still holds the whole body; inference is safe to send twice, so
  ModelInfer gets it, the rest (repository, shared-memory registration) does not. nginx streams gRPC
  bodies, so in practice a request in flight on a server that dies fails (502); measured: 1 or 2 when
  one of three servers under 4 users is killed (tests/test_multi_server.py).

    python -m deploy.nginx --server 10.0.0.1:8001 --server 10.0.0.2:8001 --listen 0.0.0.0:8001 -o nginx.conf
    nginx -c $PWD/nginx.conf

`NginxBalancer` runs Debian's nginx with such a config, for the tests and the benchmark.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from osnet_base.errors import OsnetTritonError
from osnet_base.triton_server import LOOPBACK, find_free_port

logger = logging.getLogger(__name__)

# Triton's gRPC method that is safe to send twice; the others change server state or are cheap to redo by hand.
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


class BalancerError(OsnetTritonError):
    """nginx is missing, refused its config, or did not start."""


@dataclass(kw_only=True)
class NginxBalancerConfig:
    """What the config says. `runtime_dir` holds the pid file, logs and temp files (nginx needs them writable)."""

    servers: Sequence[str]  # Triton gRPC host:port, one per server
    # Identical replicas get a third each by turns; least_conn follows whichever server the CPU scheduler
    # favours at the moment (586/782/573 requests on three equal servers sharing 2 cores here).
    balance: str = "round_robin"  # or "least_conn"
    listen: str = f"{LOOPBACK}:8001"
    runtime_dir: Path = Path("/var/lib/osnet-nginx")
    max_fails: int = 1
    fail_timeout_s: int = 5  # a failed server gets no request for this long, then is tried again
    connect_timeout_s: float = 1.0
    request_timeout_s: int = 60  # longest a request may wait for its answer
    tries: int | None = None  # servers one request may be sent to; None: every server once
    max_request_mb: int = 64  # a batch-32 tensor request is 12.6 MB
    keepalive_connections: int = 32
    worker_processes: int = 1
    access_log: bool = False

    def __post_init__(self) -> None:
        self.servers = list(self.servers)
        self.runtime_dir = Path(self.runtime_dir)
        if not self.servers:
            raise ValueError("the balancer needs at least one server")
        for address in [*self.servers, self.listen]:
            host, _, port = address.rpartition(":")
            if "://" in address or not host or not port.isdigit():
                raise ValueError(f"expected host:port, got {address!r}")
        if len(set(self.servers)) != len(self.servers):
            raise ValueError(f"a server is listed twice: {self.servers}")
        if self.balance not in ("round_robin", "least_conn"):
            raise ValueError(f"balance must be round_robin or least_conn, got {self.balance!r}")
        if self.tries is None:
            self.tries = len(self.servers)
        for name in ("max_fails", "fail_timeout_s", "request_timeout_s", "tries", "max_request_mb", "worker_processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")


def render_nginx_config(config: NginxBalancerConfig) -> str:
    """The whole nginx.conf: one upstream of the servers, one HTTP/2 listener passing gRPC to it."""
    run = config.runtime_dir
    servers = "\n".join(
        f"        server {server} max_fails={config.max_fails} fail_timeout={config.fail_timeout_s}s;"
        for server in config.servers
    )
    connect = f"{config.connect_timeout_s:g}s"
    timeouts = f"""
            grpc_connect_timeout {connect};
            grpc_send_timeout {config.request_timeout_s}s;
            grpc_read_timeout {config.request_timeout_s}s;
            grpc_next_upstream_tries {config.tries};"""
    access_log = f"access_log {run}/access.log;" if config.access_log else "access_log off;"
    balance = "\n        least_conn;" if config.balance == "least_conn" else ""
    return f"""# Written by deploy/nginx.py for {len(config.servers)} Triton servers; regenerate rather than edit.
worker_processes {config.worker_processes};
pid {run}/nginx.pid;
error_log {run}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    {access_log}
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    client_max_body_size {config.max_request_mb}m;
    # A whole request body in memory: nginx streams it to the server, no temp file per request.
    client_body_buffer_size {config.max_request_mb}m;
    keepalive_requests 1000000;  # client connections live long: never close one for its request count

    upstream triton_grpc {{{balance}
{servers}
        keepalive {config.keepalive_connections};
    }}

    server {{
        listen {config.listen} http2;

        location = {INFER_METHOD} {{
            grpc_pass grpc://triton_grpc;{timeouts}
            # The server died or closed before answering: send the request to another (safe: no side effect).
            grpc_next_upstream error timeout non_idempotent;
        }}

        location / {{
            grpc_pass grpc://triton_grpc;{timeouts}
            # Only when the request never reached a server.
            grpc_next_upstream error timeout;
        }}
    }}
}}
"""


def find_nginx() -> Path:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise BalancerError("nginx not found: install Debian's package (apt-get install nginx)")


def _wait_for_port(address: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BalancerError(f"nginx exited with status {process.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BalancerError(f"nginx not listening on {address} after {timeout_s:g} s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class NginxBalancer:
    """nginx in the foreground with a written config: `with NginxBalancer(servers, runtime_dir=d) as lb: lb.url`.

    Listens on a free loopback port unless `listen` is given; stops (SIGQUIT, then SIGKILL) on exit.
    """

    def __init__(self, servers: Sequence[str], runtime_dir: Path, listen: str | None = None, **settings):
        self.config = NginxBalancerConfig(servers=servers, runtime_dir=runtime_dir,
                                          listen=listen or f"{LOOPBACK}:{find_free_port()}", **settings)
        self.config_path = self.config.runtime_dir / "nginx.conf"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.config.listen

    @property
    def pid(self) -> int | None:
        """The nginx master's; its workers share its process group."""
        return None if self._process is None else self._process.pid

    def start(self, timeout_s: float = 10.0) -> NginxBalancer:
        if self._process is not None:
            raise BalancerError("this balancer was already started")
        nginx = find_nginx()
        run = self.config.runtime_dir
        run.mkdir(parents=True, exist_ok=True)
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            # Started as root, nginx's workers run as an unprivileged user, who must write these.
            (run / name).mkdir(exist_ok=True)
            os.chmod(run / name, 0o1777)
        self.config_path.write_text(render_nginx_config(self.config))
        log = run / "error.log"
        # -e: nginx opens its default error log before reading the config; keep it in our folder.
        command = [str(nginx), "-e", str(log), "-p", str(run), "-c", str(self.config_path), "-g", "daemon off;"]
        checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise BalancerError(f"nginx refused {self.config_path}: {checked.stderr.strip()}")
        logger.info("starting %s", " ".join(command))
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for_port(self.url, self._process, timeout_s, log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the master's workers share its group
        except ProcessLookupError:
            pass
        process.wait()

    def __enter__(self) -> NginxBalancer:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.nginx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", required=True, help="a Triton gRPC host:port; repeat for each server")
    parser.add_argument("--listen", default=f"{LOOPBACK}:8001", help="address nginx listens on (default: %(default)s)")
    parser.add_argument("--runtime-dir", type=Path, default=Path("/var/lib/osnet-nginx"),
                        help="pid file, logs, temp files (default: %(default)s)")
    parser.add_argument("--fail-timeout-s", type=int, default=5, help="how long a failed server is left out (default: %(default)s)")
    parser.add_argument("-o", "--output", type=Path, help="write the config here (default: print it)")
    args = parser.parse_args(argv)
    servers = [server.strip() for group in args.server for server in group.split(",") if server.strip()]
    try:
        text = render_nginx_config(NginxBalancerConfig(servers=servers, listen=args.listen, runtime_dir=args.runtime_dir,
                                                       fail_timeout_s=args.fail_timeout_s))
    except ValueError as exc:
        print(f"deploy.nginx: error: {exc}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
