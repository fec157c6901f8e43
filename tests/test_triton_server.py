"""The tritonserver launcher: loopback only, fails fast, and leaves nothing behind."""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.embedding_client import EmbeddingClient
from osnet_base.triton_server import KEEP_LARGE_BUFFERS, SHM_DIR, TritonServerConfig, TritonServerError, TritonServerProcess, find_free_port

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
