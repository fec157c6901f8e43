"""`osnet-client health`: ready means a real inference through the image model was answered correctly.

Triton's own readiness and model states are reported beside it, for the operator, but they decide
nothing: they stay READY while a dead python-backend stub fails every request. The check itself
is `osnet_base.health.check_inference`, which the supervisor and any other caller reuse.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from client.embedding_client import ClientError, EmbeddingClient, ServerUnavailableError
from osnet_base.health import check_inference


@dataclass(frozen=True)
class HealthReport:
    url: str
    model: str
    ready: bool  # the probe image went through `model` and came back as a correct embedding
    inference: str  # what the probe found
    latency_ms: float
    live: bool | None = None  # Triton's own answers, None where it did not give them
    server_ready: bool | None = None
    version: str | None = None
    models: dict[str, str] | None = None
    server_error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def why_not_ready(self) -> str:
        state = None if self.models is None else self.models.get(self.model)
        if self.models is not None and state is None:
            return (f"the server at {self.url} does not serve model {self.model!r} "
                    f"(it serves: {', '.join(sorted(self.models)) or 'nothing'})")
        if state not in (None, "READY"):
            return f"model {self.model!r} is {state}"
        return f"{self.model} at {self.url} did not answer the probe image correctly: {self.inference}"


def health_report(client: EmbeddingClient, timeout_s: float | None = None) -> HealthReport:
    """Probe `client.model` at `client.url`, then collect what Triton says about itself."""
    check = check_inference(client.url, client.timeout_s if timeout_s is None else timeout_s, client.model)
    report = dict(url=client.url, model=client.model, ready=check.ok, inference=check.detail,
                  latency_ms=round(check.latency_s * 1000, 1))
    try:
        health = client.health()
    except ServerUnavailableError:
        raise
    except ClientError as exc:  # e.g. the model index, which needs the server's API key
        return HealthReport(**report, server_error=str(exc))
    return HealthReport(**report, live=health.live, server_ready=health.ready, version=health.server_version,
                        models=health.models)
