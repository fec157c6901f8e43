"""Several Triton servers behind one client: least-loaded healthy routing, health-based rotation, one retry.

gRPC keeps a connection on the server it first reached (triton-inference-server/server#6177), so a
long-lived client in front of several servers must choose one per request. `ServerPool` does that for
clients that reach the servers themselves; nginx (`deploy.nginx`) does it for everyone else.

- A request goes to the healthy server with the fewest requests in flight from this process; ties go
  round the servers in turn, so sequential requests still spread.
- A server leaves the rotation when a request to it fails with UNAVAILABLE or its health probe fails.
  A probe thread checks every server every `check_interval_s`; a server comes back when its probe passes.
- Healthy is `check_server`: a tiny real inference through the image model comes back as a correct
  embedding (Triton stays ready while a dead python-backend stub fails every request).
- A request that fails with UNAVAILABLE (server gone, unreachable, shutting down) is sent once more,
  to another server: an embedding has no side effect, so sending it twice is safe.
- `stats()` says where the requests went.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from tritonclient.utils import InferenceServerException

from client.embedding_client import ClientError, EmbeddingClient, ServerUnavailableError, check_grpc_url
from osnet_base.contract import DEFAULT_URL, ENSEMBLE_MODEL
from osnet_base.health import check_inference, probe_image_png

logger = logging.getLogger(__name__)

Connection = TypeVar("Connection")
Result = TypeVar("Result")

DEFAULT_CHECK_INTERVAL_S = 2.0


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """`host:port` endpoints from one comma-separated string or several; order kept, repeats refused."""
    parts = [urls] if isinstance(urls, str) else list(urls)
    found = [check_grpc_url(url.strip()) for part in parts for url in part.split(",") if url.strip()]
    if not found:
        raise ClientError(f"no server given: pass host:port, e.g. {DEFAULT_URL}, or several separated by commas")
    repeated = sorted({url for url in found if found.count(url) > 1})
    if repeated:
        raise ClientError(f"server given twice: {', '.join(repeated)}")
    return found


def probe_image() -> bytes:
    """The small PNG of the health probes: any image the ensemble can decode would do."""
    return probe_image_png()


def check_server(url: str, timeout_s: float = 5.0, model: str = ENSEMBLE_MODEL) -> str | None:
    """None when the server at `url` answers the probe image through `model` with a correct embedding
    (`osnet_base.health.check_inference`, the supervisor's probe too); otherwise why not. Never
    raises for the server's sake."""
    check = check_inference(url, timeout_s, model)
    return None if check.ok else f"{url}: {check.detail}"


def is_unavailable(exc: BaseException) -> bool:
    """The server is gone or unreachable, so another server may answer the same request."""
    if isinstance(exc, ServerUnavailableError):
        return True
    return isinstance(exc, InferenceServerException) and "UNAVAILABLE" in (exc.status() or "")


@dataclass(frozen=True)
class ServerStats:
    url: str
    healthy: bool
    in_flight: int
    answered: int  # requests this server answered
    failed: int  # requests that failed here, retried ones included
    retried_elsewhere: int  # failed here with UNAVAILABLE, then sent to another server
    left_rotation: int  # times it was taken out
    problem: str | None  # why it is out, or the last reason it was


class _Server(Generic[Connection]):
    def __init__(self, url: str, connection: Connection):
        self.url, self.connection = url, connection
        self.healthy = True
        self.in_flight = self.answered = self.failed = self.retried_elsewhere = self.left_rotation = 0
        self.problem: str | None = None


class ServerPool(Generic[Connection]):
    """Servers, one `connect(url)` connection each, and the routing above; safe to share between threads.

    `call(send)` runs `send(connection)` on the chosen server and returns what it returns.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        connect: Callable[[str], Connection],
        *,
        probe: Callable[[str], str | None] = check_server,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        disconnect: Callable[[Connection], None] = lambda connection: connection.close(),
    ):
        if check_interval_s <= 0:
            raise ValueError(f"check_interval_s must be > 0, got {check_interval_s}")
        self.urls = split_urls(urls)
        self._connect, self._probe, self._disconnect = connect, probe, disconnect
        self._servers = [_Server(url, connect(url)) for url in self.urls]
        self._retired: list[Connection] = []
        self._turn = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._check_interval_s = check_interval_s
        self.check_health()  # the first requests already avoid a server that is down
        self._checker = threading.Thread(target=self._check_periodically, name="server-pool-health", daemon=True)
        self._checker.start()

    def call(self, send: Callable[[Connection], Result]) -> Result:
        server = self._choose()
        try:
            return self._send(server, send)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            other = self._choose(avoid=server)
            if other is None:
                raise
            with self._lock:
                server.retried_elsewhere += 1
            logger.info("%s unavailable; sending the request to %s", server.url, other.url)
            return self._send(other, send)

    def _choose(self, avoid: _Server | None = None) -> _Server | None:
        """The server for the next request (None when `avoid` is the only one), counted in flight."""
        with self._lock:
            candidates = [s for s in self._servers if s is not avoid]
            if not candidates:
                return None
            # With none healthy, try them all: a probe may be up to check_interval_s behind a recovery.
            healthy = [s for s in candidates if s.healthy] or candidates
            count = len(self._servers)
            chosen = min(healthy, key=lambda s: (s.in_flight, (self._servers.index(s) - self._turn) % count))
            self._turn = (self._servers.index(chosen) + 1) % count
            chosen.in_flight += 1
            return chosen

    def _send(self, server: _Server, send: Callable[[Connection], Result]) -> Result:
        try:
            result = send(server.connection)
        except Exception as exc:
            with self._lock:
                server.in_flight -= 1
                server.failed += 1
            if is_unavailable(exc):
                self._take_out(server, f"a request failed: {exc}")
            raise
        with self._lock:
            server.in_flight -= 1
            server.answered += 1
        return result

    def _take_out(self, server: _Server, problem: str) -> None:
        with self._lock:
            was_healthy, server.healthy, server.problem = server.healthy, False, problem
            if was_healthy:
                server.left_rotation += 1
        if was_healthy:
            logger.warning("%s leaves the rotation: %s", server.url, problem)

    def check_health(self) -> None:
        """Probe every server now (in parallel) and update the rotation."""
        results: dict[str, str | None] = {}

        def probe(server: _Server) -> None:
            try:
                results[server.url] = self._probe(server.url)
            except Exception as exc:  # a probe bug must not stop the checker thread
                results[server.url] = f"health probe raised {exc!r}"

        threads = [threading.Thread(target=probe, args=(server,), daemon=True) for server in self._servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for server in self._servers:
            problem = results.get(server.url, "no probe result")
            if problem is not None:
                self._take_out(server, problem)
                continue
            if server.healthy:
                continue
            # A fresh connection: the old one may sit in gRPC's reconnect backoff (up to minutes) long after
            # the server is back. Requests still on the old one finish there; it is closed with the pool.
            fresh = self._connect(server.url)
            with self._lock:
                self._retired.append(server.connection)
                server.connection, server.healthy = fresh, True
            logger.info("%s passes its health probe and rejoins the rotation", server.url)

    def _check_periodically(self) -> None:
        while not self._closed.wait(self._check_interval_s):
            self.check_health()

    def stats(self) -> list[ServerStats]:
        with self._lock:
            return [
                ServerStats(url=s.url, healthy=s.healthy, in_flight=s.in_flight, answered=s.answered, failed=s.failed,
                            retried_elsewhere=s.retried_elsewhere, left_rotation=s.left_rotation, problem=s.problem)
                for s in self._servers
            ]

    def close(self) -> None:
        self._closed.set()
        self._checker.join(timeout=30)
        for connection in [*self._retired, *(server.connection for server in self._servers)]:
            self._disconnect(connection)


def format_stats(stats: Sequence[ServerStats]) -> str:
    """Where the requests went, one line per server."""
    lines = [f"{'server':<24} {'answered':>8} {'failed':>6} {'retried':>7} {'out':>4}  state"]
    for s in stats:
        state = "healthy" if s.healthy else f"out: {s.problem}"
        lines.append(f"{s.url:<24} {s.answered:>8} {s.failed:>6} {s.retried_elsewhere:>7} {s.left_rotation:>4}  {state}")
    return "\n".join(lines)


class PooledEmbeddingClient(EmbeddingClient):
    """`EmbeddingClient` over several servers; `EmbeddingClient("a:8001,b:8001")` returns one of these.

    The same calls as one server's client, routed by a `ServerPool` of per-server clients;
    `pool.stats()` says where the requests went.
    """

    def __init__(self, url: str | Sequence[str] = DEFAULT_URL, model: str = ENSEMBLE_MODEL, timeout_s: float = 60.0,
                 shared_memory: bool = False, api_key: str | None = None, check_interval_s: float = DEFAULT_CHECK_INTERVAL_S):
        if shared_memory:
            raise ClientError("shared memory needs one server on this host: give a single URL with it")
        self.model, self.timeout_s = model, timeout_s
        self._shared_inputs = None
        probe_timeout_s = min(timeout_s, 5.0)
        self.pool: ServerPool[EmbeddingClient] = ServerPool(
            url, lambda one: EmbeddingClient(one, model, timeout_s=timeout_s, api_key=api_key),
            probe=lambda one: check_server(one, probe_timeout_s, model), check_interval_s=check_interval_s,
        )
        self.url = ",".join(self.pool.urls)

    def _infer(self, model, request, output):
        return self.pool.call(lambda server: server._infer(model, request, output))

    def health(self):
        raise ClientError("several servers: ask each one (`servers_health`)")

    def servers_health(self) -> list[tuple[str, str | None]]:
        """(url, None if it passes the real-inference check else why not) for every server, probed now."""
        self.pool.check_health()
        return [(s.url, None if s.healthy else s.problem) for s in self.pool.stats()]

    def close(self) -> None:
        self.pool.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m client.server_pool --check HOST:PORT...`: exit 0 only if every server passes
    `check_server` (the readiness and liveness probe of deploy/kubernetes)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m client.server_pool", description=main.__doc__)
    parser.add_argument("--check", nargs="+", required=True, metavar="HOST:PORT", help="servers to probe")
    parser.add_argument("--model", default=ENSEMBLE_MODEL, help="image-input model (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="per-probe timeout (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        urls = split_urls(args.check)
    except ClientError as exc:
        parser.error(str(exc))
    failed = 0
    for url in urls:
        problem = check_server(url, args.timeout_s, args.model)
        print(f"{url}: {'healthy' if problem is None else problem}", file=sys.stdout if problem is None else sys.stderr)
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
