"""Several servers on one machine: what the balancer costs, side by side in one run.

Rows (each the best of `--rounds`, the rows interleaved round by round so that other people's load
falls on all of them alike), `--concurrency` closed-loop client threads sending `--batch` JPEG crops per
request to the `osnet` ensemble:
- one server, direct; one server through nginx (`deploy.nginx`);
- three servers through the client's pool (`EmbeddingClient("a,b,c")`); three servers through nginx.
The three servers share this machine's cores, so "three vs one" measures what spreading costs here, not
scaling. The paper estimate of N servers on N machines is then N x the one-server figure, times the
through-nginx ratio, capped by what nginx itself can pass: its CPU per request, measured here from
/proc, gives the requests per second one nginx core sustains.

    python -m benchmarks.multi_server [--variant osnet_x0_25] [--seconds 5] [--rounds 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Row:
    name: str
    servers: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int


def process_cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / CLOCK_TICKS


def group_pids(leader: int) -> list[int]:
    """The processes of `leader`'s process group (nginx's master and its workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == leader:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def closed_loop(client, images: list[bytes], batch: int, concurrency: int, seconds: float) -> tuple[int, list[float]]:
    """`concurrency` threads, each sending its next request when the last is answered; (requests, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def user(offset: int) -> None:
        index = offset
        while time.monotonic() < deadline:
            request = [images[(index + i) % len(images)] for i in range(batch)]
            index += batch
            started = time.perf_counter()
            answer = client.embed_images(request)
            elapsed = time.perf_counter() - started
            if answer.shape[0] != batch or not np.isfinite(answer).all():
                raise RuntimeError("wrong answer")
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=user, args=(n * batch,)) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies), latencies


def measure(name: str, servers: int, connect: Callable[[], object], images, args) -> Row:
    with connect() as client:
        client.embed_images(images[: args.batch])  # warm: connections up, sessions touched
        started = time.monotonic()
        requests, latencies = closed_loop(client, images, args.batch, args.concurrency, args.seconds)
        elapsed = time.monotonic() - started
    ms = np.array(latencies) * 1000
    return Row(name=name, servers=servers, images_per_s=requests * args.batch / elapsed,
               p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)), requests=requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="osnet_x0_25")
    parser.add_argument("--seconds", type=float, default=5.0, help="per row and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="JPEG crops per request")
    parser.add_argument("--concurrency", type=int, default=6, help="requests in flight")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from client.embedding_client import EmbeddingClient
    from deploy.nginx import NginxBalancer
    from engine_builder.build import build_cpu_repository
    from engine_builder.cpu_runtimes import BASELINE_RUNTIME, RuntimeSelection
    from engine_builder.synthetic_people import person_jpegs
    from osnet_base.triton_server import TritonServerConfig, TritonServerProcess

    images = person_jpegs(64, cameras=4, seed=1)
    with tempfile.TemporaryDirectory(prefix="osnet_multi_bench_") as work:
        work = Path(work)
        repository = build_cpu_repository(args.variant, work / "repo", selection=RuntimeSelection(runtime=BASELINE_RUNTIME))
        servers = [TritonServerProcess(TritonServerConfig(model_repository=repository)).start() for _ in range(3)]
        try:
            urls = [server.grpc_url for server in servers]
            with NginxBalancer(urls[:1], runtime_dir=work / "nginx1") as one, NginxBalancer(urls, runtime_dir=work / "nginx3") as three:
                cases = [
                    ("1 server, direct", 1, lambda: EmbeddingClient(urls[0])),
                    ("1 server, through nginx", 1, lambda: EmbeddingClient(one.url)),
                    ("3 servers, client pool", 3, lambda: EmbeddingClient(",".join(urls))),
                    ("3 servers, through nginx", 3, lambda: EmbeddingClient(three.url)),
                ]
                best: dict[str, Row] = {}
                nginx_cpu_per_request: list[float] = []
                for _ in range(args.rounds):
                    for name, count, connect in cases:
                        balancer = one if "nginx" in name and count == 1 else three if "nginx" in name else None
                        pids = group_pids(balancer.pid) if balancer is not None else []
                        cpu_before = process_cpu_s(pids)
                        row = measure(name, count, connect, images, args)
                        if balancer is not None and row.requests:
                            nginx_cpu_per_request.append((process_cpu_s(pids) - cpu_before) / row.requests)
                        if name not in best or row.images_per_s > best[name].images_per_s:
                            best[name] = row
        finally:
            for server in servers:
                server.stop()

    direct = best["1 server, direct"].images_per_s
    print(f"{args.variant}, `osnet` ensemble, batch {args.batch} JPEG crops, {args.concurrency} requests in flight, "
          f"best of {args.rounds} x {args.seconds:g} s; all servers share this machine's {os.cpu_count()} cores\n")
    print("| path | servers | images/s | vs 1 server direct | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in best.values():
        print(f"| {row.name} | {row.servers} | {row.images_per_s:.1f} | {row.images_per_s / direct:.2f} | "
              f"{row.p50_ms:.1f} | {row.p99_ms:.1f} |")
    # Above 1 is noise (or the client's own gRPC cost moving): nginx adds a hop, it cannot speed a server up.
    through_nginx = min(1.0, best["1 server, through nginx"].images_per_s / direct)
    cpu_per_request = min(nginx_cpu_per_request) if nginx_cpu_per_request else float("nan")
    nginx_requests_per_core = 1.0 / cpu_per_request if cpu_per_request > 0 else float("inf")
    print(f"\nnginx CPU per request: {cpu_per_request * 1e6:.0f} us -> one nginx core passes ~{nginx_requests_per_core:.0f} "
          f"requests/s (~{nginx_requests_per_core * args.batch:.0f} images/s at batch {args.batch})")
    print("paper estimate, N servers on N machines like this one, behind one nginx core:")
    for n in (1, 2, 4, 8, 16):
        estimate = min(n * direct * through_nginx, nginx_requests_per_core * args.batch)
        print(f"  N={n:>2}: ~{estimate:.0f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
