"""The supervised tritonserver: loopback only, fails fast, its administrative APIs behind the key,
and it leaves nothing behind however it ends."""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.embedding_client import EmbeddingClient
from osnet_base.triton_server import (
    KEEP_LARGE_BUFFERS,
    SHM_DIR,
    SupervisionPolicy,
    TritonServerConfig,
    TritonServerError,
    TritonServerProcess,
    find_free_port,
)

pytestmark = pytest.mark.server


def listening_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, from the kernel's socket tables (gRPC listens on tcp6,
    IPv4-mapped, even for an IPv4 address)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address_hex, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            # The kernel prints each 32-bit word of the address in host (little-endian) byte order.
            raw = b"".join(bytes.fromhex(address_hex[i : i + 8])[::-1] for i in range(0, len(address_hex), 8))
            address = ipaddress.ip_address(raw)
            mapped = getattr(address, "ipv4_mapped", None)
            addresses.add(str(mapped or address))
    return addresses


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(cmdline.parent.name)
        except OSError:
            continue
    return found


def test_stop_leaves_no_process_and_no_shared_memory(served_repository):
    server = TritonServerProcess(TritonServerConfig(model_repository=served_repository))
    server.start()
    prefix = server.config.shm_region_prefix
    assert list(SHM_DIR.glob(f"{prefix}*")), "the python backend should be using shared memory while it runs"
    assert processes_mentioning(prefix), "python backend stubs run with the region prefix on their command line"
    with pytest.raises(TritonServerError, match="already started"):
        server.start()
    pid = server.pid
    server.stop()
    server.stop()  # idempotent
    assert not Path(f"/proc/{pid}").exists()
    assert processes_mentioning(prefix) == []
    assert list(SHM_DIR.glob(f"{prefix}*")) == []


def test_binds_to_loopback_only(triton_server):
    for port in (triton_server.config.grpc_port, triton_server.config.http_port, triton_server.config.metrics_port):
        assert listening_addresses(port) == {"127.0.0.1"}


def test_server_keeps_large_buffers_unless_the_user_tuned_glibc(triton_server, monkeypatch):
    # glibc consumes GLIBC_TUNABLES at start-up (it is gone from /proc/PID/environ), so check what the server is given.
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert triton_server.install.environment()["GLIBC_TUNABLES"] == KEEP_LARGE_BUFFERS
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert triton_server.install.environment()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_a_model_that_cannot_load_fails_the_start_fast_with_its_reason(served_repository, tensor_model, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(served_repository, repository)
    (repository / tensor_model / "1" / "model.onnx").write_bytes(b"not an onnx file")
    started = time.monotonic()
    with pytest.raises(TritonServerError, match=tensor_model):
        TritonServerProcess(TritonServerConfig(model_repository=repository)).start(timeout_s=60)
    assert time.monotonic() - started < 45


def test_missing_repository_is_named(tmp_path):
    with pytest.raises(TritonServerError, match="osnet-build"):
        TritonServerConfig(model_repository=tmp_path / "absent")


def test_tritonserver_command_serves_the_repository_on_loopback(served_repository):
    command = Path(sys.executable).parent / "tritonserver"
    if not command.exists():
        pytest.skip("the project is not installed in this interpreter's environment (no tritonserver script)")
    grpc_port, http_port, metrics_port = find_free_port(), find_free_port(), find_free_port()
    process = subprocess.Popen(
        [str(command), f"--model-repository={served_repository}", f"--grpc-port={grpc_port}",
         f"--http-port={http_port}", f"--metrics-port={metrics_port}", "--exit-timeout-secs=3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        with EmbeddingClient(f"127.0.0.1:{grpc_port}", timeout_s=5) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if client.health().models.get("osnet") == "READY":
                        break
                except Exception:
                    time.sleep(0.2)
            assert client.health().models["osnet"] == "READY"
        assert listening_addresses(grpc_port) == {"127.0.0.1"}
    finally:
        os.killpg(process.pid, 2)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


# --- the supervisor ------------------------------------------------------------------------------

def test_the_api_key_unlocks_the_restricted_apis_and_is_not_on_the_servers_command_line(triton_server):
    from osnet_base.api_key import grpc_headers

    server_pid = triton_server.server_pid()
    assert triton_server.api_key not in Path(f"/proc/{server_pid}/cmdline").read_bytes().decode(errors="replace")
    assert "Umask:\t0077" in Path(f"/proc/{server_pid}/status").read_text()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        headers = grpc_headers(triton_server.api_key)
        assert client.get_log_settings(headers=headers, as_json=True)["settings"]["log_verbose_level"]["uint32_param"] == 0
        assert {m.name for m in client.get_model_repository_index(headers=headers).models} >= {"osnet", "preprocess"}
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index(headers=grpc_headers("not-the-key"))
    finally:
        client.close()


def test_tritonserver_command_fails_soon_naming_a_model_that_never_loads(served_repository, tmp_path):
    command = Path(sys.executable).parent / "tritonserver"
    if not command.exists():
        pytest.skip("the project is not installed in this interpreter's environment (no tritonserver script)")
    repository = tmp_path / "repository"
    shutil.copytree(served_repository, repository)
    (repository / "preprocess" / "1" / "model.py").unlink()
    finished = subprocess.run(
        [str(command), f"--model-repository={repository}", f"--grpc-port={find_free_port()}",
         f"--http-port={find_free_port()}", f"--metrics-port={find_free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    assert finished.returncode == 1
    failure = [line for line in finished.stderr.splitlines() if "did not start" in line]
    assert failure and "Failed to preinitialize Python stub" in failure[0] and "preprocess/1/model.py" in failure[0]


@pytest.mark.parametrize("flag", ["--grpc-restricted-protocol=logging:x=y", "--http-restricted-api=logging:x=y",
                                  "--backend-config=python,shm-region-prefix-name=mine_", "--allow-grpc=false"])
def test_the_supervisor_refuses_flags_it_owns(served_repository, flag, caplog):
    from osnet_base.supervisor import main

    assert main([f"--model-repository={served_repository}", flag]) == 2


def test_a_crash_loop_backs_off_and_a_stable_server_restarts_at_once():
    policy = SupervisionPolicy()
    assert [policy.backoff_s(failures) for failures in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    with pytest.raises(ValueError):
        SupervisionPolicy(probe_failures=0)


def test_the_policy_reaches_the_supervisor_whole():
    from osnet_base.arguments import dataclass_from_arguments
    from osnet_base.supervisor import supervisor_parser

    policy = SupervisionPolicy(probe_interval_s=0.5, probe_failures=3, restart=False, backoff_max_s=7.0)
    options, rest = supervisor_parser().parse_known_args([*policy.to_cli_flags(), "--model-repository=x"])
    assert dataclass_from_arguments(SupervisionPolicy, options) == policy and rest == ["--model-repository=x"]


def _group(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(stat.parent.name))
    return members


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_without_restarts_a_killed_server_ends_the_supervisor_leaving_nothing(served_repository):
    server = TritonServerProcess(TritonServerConfig(model_repository=served_repository), policy=SupervisionPolicy(restart=False))
    server.start()
    try:
        os.kill(server.server_pid(), signal.SIGKILL)
        assert _wait_for(lambda: server._process.poll() is not None, 20)
        assert server._process.returncode == 1
        assert _group(server.pid) == []
        assert list(SHM_DIR.glob(f"{server.config.shm_region_prefix}*")) == []
    finally:
        server.stop()


def test_stubs_orphaned_by_a_killed_supervisor_are_removed_by_the_next(served_repository):
    doomed = TritonServerProcess(TritonServerConfig(model_repository=served_repository))
    doomed.start()
    prefix = doomed.config.shm_region_prefix
    try:
        os.kill(doomed.pid, signal.SIGKILL)  # the server dies with it; its stubs do not
        assert _wait_for(lambda: doomed.server_pid() is None and doomed._process.poll() is not None, 10)
        orphans = processes_mentioning(prefix)
        assert orphans, "the stubs outlive a supervisor killed outright"
        with TritonServerProcess(TritonServerConfig(model_repository=served_repository)):
            assert processes_mentioning(prefix) == []
            assert list(SHM_DIR.glob(f"{prefix}*")) == []
    finally:
        doomed.stop()
