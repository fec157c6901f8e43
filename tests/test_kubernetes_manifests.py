"""The Kubernetes manifests in deploy/kubernetes: valid against the Kubernetes JSON schemas (offline,
from the pinned kubernetes-validate), consistent with each other, and probing with the real-inference
check, which is run here, from the manifest, against a real server."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
ADAPTER_VALUES = MANIFESTS / "prometheus-adapter-values.yaml"  # Helm values, not a Kubernetes object
KUBERNETES_VERSION = "1.30.0"  # the oldest still-supported minor as these were written; autoscaling/v2 is GA there


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path != ADAPTER_VALUES:
            for document in yaml.safe_load_all(path.read_text()):
                found[document["kind"]] = document
    return found


def tritonserver_container() -> dict:
    (container,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("path", sorted(p.name for p in MANIFESTS.glob("*.yaml") if p != ADAPTER_VALUES))
def test_manifest_validates_against_the_kubernetes_schema(path):
    import kubernetes_validate

    for document in yaml.safe_load_all((MANIFESTS / path).read_text()):
        # strict: an unknown or misspelt field is an error, not silently dropped by the API server
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_validation_catches_a_broken_manifest():
    import kubernetes_validate

    deployment = manifests()["Deployment"]
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_pieces_refer_to_each_other():
    objects = manifests()
    deployment, service, hpa, ingress = objects["Deployment"], objects["Service"], objects["HorizontalPodAutoscaler"], objects["Ingress"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {port["name"]: port["containerPort"] for port in tritonserver_container()["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports.keys()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"] and backend["port"]["name"] == "grpc"
    # The HPA's metric is the one the prometheus-adapter rule makes from Triton's queue time.
    rule = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"][0]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    # The server must listen beyond the pod's loopback for the Service to reach it.
    assert {"--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(tritonserver_container()["command"])


def probe_command(kind: str, url: str) -> list[str]:
    command = list(tritonserver_container()[kind]["exec"]["command"])
    assert command[:3] == ["python", "-m", "client.server_pool"] and "--check" in command
    command[command.index("--check") + 1] = url
    return [sys.executable, *command[1:]]


@pytest.mark.server
@pytest.mark.parametrize("kind", ["readinessProbe", "livenessProbe"])
def test_probes_are_the_real_inference_check(kind, triton_server, served_repository, tmp_path):
    from osnet_base.triton_server import TritonServerConfig, TritonServerProcess, find_free_port

    run = lambda url: subprocess.run(probe_command(kind, url), capture_output=True, text=True, timeout=60, cwd=ROOT)  # noqa: E731
    healthy = run(triton_server.grpc_url)
    assert healthy.returncode == 0, healthy.stderr
    assert run(f"127.0.0.1:{find_free_port()}").returncode == 1  # nothing listening
    # A server that is up and ready but cannot embed (its ensemble missing) fails the probe.
    crippled = tmp_path / "repo"
    shutil.copytree(served_repository, crippled)
    shutil.rmtree(crippled / "osnet")
    with TritonServerProcess(TritonServerConfig(model_repository=crippled)) as server:
        result = run(server.grpc_url)
    assert result.returncode == 1 and "does not serve model" in result.stderr, result.stderr
