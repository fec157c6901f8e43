"""Several servers: the client's pool, nginx in front, and failover across stand-in hosts.

The failover tests run three tritonservers, each in its own network namespace on its own address with
Triton's default ports, as three machines would; locust loads them for ~30 s (one master, two workers),
one server is killed with SIGKILL half-way and started again. Every answer is checked against the first
server's answer to the same images; each server's share is read from its own Triton metrics.
They skip, with the reason, where namespaces (root, iproute2) or nginx are missing; .ci/run installs both.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from client.embedding_client import ClientError, EmbeddingClient, ServerUnavailableError
from client.server_pool import PooledEmbeddingClient, ServerPool, check_server, probe_image, split_urls
from deploy.namespaces import NamespacedInstall, StandInHosts, unavailable_reason
from deploy.nginx import BalancerError, NginxBalancer, NginxBalancerConfig, find_nginx, render_nginx_config
from loadtest.runner import LoadTestSettings, format_summary, run_load_test
from loadtest.workload import ResponseCheckError, check_against_reference
from osnet_base.contract import ENSEMBLE_MODEL
from osnet_base.triton_server import TritonServerConfig, TritonServerProcess, find_free_port, locate_tritonserver

logger = logging.getLogger(__name__)

VARIANT = "osnet_x0_25"  # the smallest: three servers share the machine's two cores
FAILOVER_USERS, FAILOVER_WORKERS, FAILOVER_S = 4, 2, 30
KILL_AT_S = 15  # after the load test starts (its checks and locust's start take the first few seconds)
SHARE_TOLERANCE = 0.15  # each healthy server's share within 15% of a third


def nginx_missing() -> str | None:
    try:
        find_nginx()
    except BalancerError as exc:
        return str(exc)
    return None


needs_nginx = pytest.mark.skipif(nginx_missing() is not None, reason=f"{nginx_missing()}")
needs_namespaces = pytest.mark.skipif(unavailable_reason() is not None, reason=f"no network namespaces: {unavailable_reason()}")


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    from engine_builder.build import build_cpu_repository
    from engine_builder.cpu_runtimes import BASELINE_RUNTIME, RuntimeSelection

    return build_cpu_repository(VARIANT, tmp_path_factory.mktemp("multi_repo"), selection=RuntimeSelection(runtime=BASELINE_RUNTIME))


def serve(repository: Path, grpc_port: int | None = None) -> TritonServerProcess:
    return TritonServerProcess(TritonServerConfig(model_repository=repository, grpc_port=grpc_port)).start()


# --- no server -------------------------------------------------------------------------------------


def test_urls_split_on_commas_and_refuse_repeats_and_schemes():
    assert split_urls("a:1, b:2") == ["a:1", "b:2"]
    assert split_urls(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    with pytest.raises(ClientError, match="twice"):
        split_urls("a:1,a:1")
    with pytest.raises(ClientError, match="not a gRPC endpoint"):
        split_urls("a:1,http://b:2")
    with pytest.raises(ValueError, match="several comma-separated"):
        LoadTestSettings(output_dir=Path("x"), url="127.0.0.1:1,nonsense")


def test_answers_are_checked_against_the_reference():
    rows = np.eye(2, 512, dtype=np.float32)
    check_against_reference(rows, rows)
    with pytest.raises(ResponseCheckError, match="differs from the reference"):
        check_against_reference(rows, rows[::-1])


def test_nginx_config_balances_each_request_and_retries_only_inference_after_it_was_sent(tmp_path):
    config = render_nginx_config(NginxBalancerConfig(servers=["10.0.0.1:8001", "10.0.0.2:8001"], runtime_dir=tmp_path))
    assert "grpc_pass grpc://triton_grpc;" in config and " http2;" in config and "least_conn" not in config
    assert "grpc_next_upstream_tries 2;" in config  # each server once
    assert "server 10.0.0.1:8001 max_fails=1 fail_timeout=5s;" in config and "server 10.0.0.2:8001" in config
    infer, other = config.split("location = /inference.GRPCInferenceService/ModelInfer")[1].split("location / {")
    assert "grpc_next_upstream error timeout non_idempotent;" in infer
    assert "non_idempotent" not in other and "grpc_next_upstream error timeout;" in other
    assert "least_conn;" in render_nginx_config(NginxBalancerConfig(servers=["a:1"], runtime_dir=tmp_path, balance="least_conn"))
    with pytest.raises(ValueError, match="twice"):
        NginxBalancerConfig(servers=["a:1", "a:1"])


@needs_nginx
def test_nginx_accepts_the_written_config(tmp_path):
    balancer = NginxBalancer(["127.0.0.1:1", "127.0.0.1:2"], runtime_dir=tmp_path)
    with balancer:
        assert balancer.config_path.is_file()
    assert "[emerg]" not in (tmp_path / "error.log").read_text()


# --- the client's pool, on loopback ---------------------------------------------------------------


@pytest.mark.server
def test_pool_spreads_requests_retries_elsewhere_and_readmits_a_restarted_server(repository, tmp_path, capsys):
    from client.cli import main as client_main

    steady, flaky = serve(repository), None
    try:
        # Chosen once steady listens: picked before, it was free for steady's own ports to take too.
        port = find_free_port()
        flaky = serve(repository, grpc_port=port)
        # osnet-client: --url repeated or comma-separated; health runs the real-inference check on each server.
        assert client_main(["health", "--url", steady.grpc_url, "--url", flaky.grpc_url]) == 0
        assert '"healthy": true' in capsys.readouterr().out
        (tmp_path / "a.png").write_bytes(probe_image())
        assert client_main(["embed", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "--batch-size", "1",
                            "-o", str(tmp_path / "out"), "--url", f"{steady.grpc_url},{flaky.grpc_url}"]) == 0
        report = capsys.readouterr().err
        assert "where the requests went" in report and steady.grpc_url in report and flaky.grpc_url in report

        # Probes only when asked (check_health), so that what the requests alone do is seen.
        with EmbeddingClient(f"{steady.grpc_url},{flaky.grpc_url}", timeout_s=10, check_interval_s=600) as client:
            assert isinstance(client, PooledEmbeddingClient)
            pool = client.pool
            image = probe_image()
            expected = client.embed_images([image])
            for _ in range(19):
                client.embed_images([image])
            assert [s.answered for s in pool.stats()] == [10, 10]

            flaky.stop()
            answers = [client.embed_images([image]) for _ in range(10)]  # none fails: retried on the steady one
            assert all(np.allclose(answer, expected, atol=1e-5) for answer in answers)
            steady_stats, flaky_stats = pool.stats()
            assert not flaky_stats.healthy and flaky_stats.left_rotation == 1 and "UNAVAILABLE" in flaky_stats.problem
            assert flaky_stats.retried_elsewhere == 1 and flaky_stats.failed == 1  # then it was out of the rotation
            assert steady_stats.answered == 20

            pool.check_health()
            assert not pool.stats()[1].healthy, "a server that is down stays out"
            assert client_main(["health", "--url", f"{steady.grpc_url},{flaky.grpc_url}"]) == 1
            assert f"{flaky.grpc_url} fails its health check" in capsys.readouterr().err
            reborn = serve(repository, grpc_port=port)
            try:
                pool.check_health()
                assert pool.stats()[1].healthy, "the restarted server passes its probe and rejoins"
                for _ in range(10):
                    client.embed_images([image])
                assert pool.stats()[1].answered == 10 + 5
            finally:
                reborn.stop()
    finally:
        steady.stop()
        if flaky is not None:
            flaky.stop()


@pytest.mark.server
def test_health_probe_is_a_real_inference(repository):
    with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
        assert check_server(server.grpc_url, 10, ENSEMBLE_MODEL) is None
        assert "does not serve model" in check_server(server.grpc_url, 10, "no_such_model")
    assert "UNAVAILABLE" in check_server(server.grpc_url, 2)


def test_pool_with_every_server_down_says_so():
    urls = [f"127.0.0.1:{find_free_port()}", f"127.0.0.1:{find_free_port()}"]
    with EmbeddingClient(",".join(urls), timeout_s=2) as client:
        with pytest.raises(ServerUnavailableError):
            client.embed_images([probe_image()])
        assert all(not s.healthy for s in client.pool.stats())


# --- three stand-in hosts -------------------------------------------------------------------------


def success_count(host: str) -> int:
    """`nv_inference_request_success` of the image model, from the server's metrics port; 0 while it is down."""
    try:
        text = urllib.request.urlopen(f"http://{host}:8002/metrics", timeout=5).read().decode()
    except OSError:
        return 0
    found = re.search(rf'^nv_inference_request_success{{model="{ENSEMBLE_MODEL}",version="1"}} (\d+)', text, re.M)
    return int(found.group(1)) if found else 0


class ThreeHosts:
    """Three tritonservers, one per stand-in host, on Triton's default ports."""

    def __init__(self, repository: Path, hosts):
        self.repository, self.hosts = repository, hosts
        self.install = locate_tritonserver()
        self.servers = [self._start(host) for host in hosts]

    def _start(self, host) -> TritonServerProcess:
        install = NamespacedInstall(binary=self.install.binary, backend_directory=self.install.backend_directory,
                                    library_path=self.install.library_path, namespace=host.namespace)
        config = TritonServerConfig(model_repository=self.repository, host=host.address, http_port=8000,
                                    grpc_port=8001, metrics_port=8002)
        return TritonServerProcess(config, install=install).start()

    @property
    def urls(self) -> list[str]:
        return [server.grpc_url for server in self.servers]

    def kill_and_restart(self, index: int) -> None:
        victim = self.servers[index]
        os.kill(victim.pid, signal.SIGKILL)
        victim.stop()  # reaps it and its python-backend stubs, removes its shared memory
        self.servers[index] = self._start(self.hosts[index])

    def counts(self) -> list[int]:
        return [success_count(host.address) for host in self.hosts]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@dataclass
class FailoverRun:
    summary: object
    healthy_counts: list[int]  # each server's successes while all three were up (locust running)
    after_restart: int  # the restarted server's successes after it came back
    restart_s: float


def failover_run(target: str, cluster: ThreeHosts, output_dir: Path) -> FailoverRun:
    """locust for FAILOVER_S against `target`; server 1 killed (SIGKILL) at KILL_AT_S and started again."""
    settings = LoadTestSettings(output_dir=output_dir, url=target, users=FAILOVER_USERS, workers=FAILOVER_WORKERS,
                                duration_s=FAILOVER_S)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", run_load_test(settings)), daemon=True)
    started = time.monotonic()
    runner.start()
    time.sleep(KILL_AT_S / 3)  # reference answers asked and locust spawned: count from here
    first = cluster.counts()
    time.sleep(max(0.0, KILL_AT_S - (time.monotonic() - started)))
    healthy = [now - then for now, then in zip(cluster.counts(), first)]
    restart_started = time.monotonic()
    cluster.kill_and_restart(1)
    restart_s = time.monotonic() - restart_started
    runner.join(timeout=settings.deadline_s + 30)
    assert "summary" in result, "the load test did not finish"
    summary = result["summary"]
    logger.info("%s\nshares while healthy %s; restarted in %.1f s", format_summary(summary), healthy, restart_s)
    return FailoverRun(summary=summary, healthy_counts=healthy, after_restart=cluster.counts()[1], restart_s=restart_s)


@pytest.fixture(scope="module")
def cluster(repository):
    if unavailable_reason() is not None:
        pytest.skip(f"no network namespaces: {unavailable_reason()}")
    with StandInHosts(3) as hosts:
        servers = ThreeHosts(repository, hosts)
        try:
            yield servers
        finally:
            servers.stop()


def assert_even_shares(counts: list[int]) -> None:
    total = sum(counts)
    assert total > 0
    for count in counts:
        assert abs(count / total - 1 / 3) <= SHARE_TOLERANCE / 3, f"shares {counts} not within 15% of a third"


@pytest.mark.server
@needs_namespaces
def test_failover_through_the_multi_url_client_loses_nothing(cluster, tmp_path):
    run = failover_run(",".join(cluster.urls), cluster, tmp_path)
    summary = run.summary
    print(format_summary(summary), f"\nhealthy shares (metrics): {run.healthy_counts}; restarted server answered "
          f"{run.after_restart} after its restart ({run.restart_s:.1f} s)")
    assert summary.requests > 0 and summary.failures == 0 and summary.passed, format_summary(summary)
    assert_even_shares(run.healthy_counts)
    assert run.after_restart > 0, "the restarted server came back into the rotation"
    assert set(summary.answered_by_server) == set(cluster.urls)
    assert sum(summary.answered_by_server.values()) == summary.requests


@pytest.mark.server
@needs_namespaces
@needs_nginx
def test_failover_through_nginx_fails_at_most_the_requests_in_flight(cluster, tmp_path):
    with NginxBalancer(cluster.urls, runtime_dir=tmp_path / "nginx") as balancer:
        run = failover_run(balancer.url, cluster, tmp_path / "load")
    summary = run.summary
    print(format_summary(summary), f"\nhealthy shares (metrics): {run.healthy_counts}; restarted server answered "
          f"{run.after_restart} after its restart ({run.restart_s:.1f} s)")
    # nginx streams a gRPC request's body to its server, so one already sent to the server that was
    # killed cannot be re-sent: those fail (502), and only those. nginx logs each as an [error] naming
    # the killed upstream; there cannot be more of them than users.
    killed = f"grpc://{cluster.urls[1]}"
    lost_in_flight = sum("[error]" in line and killed in line
                         for line in (tmp_path / "nginx" / "error.log").read_text().splitlines())
    print(f"requests nginx lost in flight on {killed}: {lost_in_flight}")
    assert summary.failures <= lost_in_flight <= FAILOVER_USERS, format_summary(summary)
    assert summary.requests - summary.failures > 0
    assert "differs from the reference" not in " ".join(summary.failure_messages)
    assert_even_shares(run.healthy_counts)
    assert run.after_restart > 0, "nginx sent requests to the restarted server again"
