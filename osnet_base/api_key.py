"""The key that unlocks Triton's administrative APIs on our servers.

The supervisor restricts shared memory, the model repository (index, load, unload), logging and
tracing to callers that send this key in a header: any loopback client could otherwise register
the python backend's own /dev/shm regions (which crashed the server) or change its log level.
Health, metadata and inference stay open.

Every process of one user finds the same key without configuration: `OSNET_TRITON_API_KEY` if set,
else a random key kept in `~/.config/osnet-triton/api-key` (mode 0600, created on first use).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

API_KEY_ENV = "OSNET_TRITON_API_KEY"
API_KEY_HEADER = "osnet-api-key"
# Triton's gRPC server looks for a restricted protocol's key under this prefix; HTTP uses the bare name.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace")
# Triton's words when a call lacks the key (gRPC answers UNAVAILABLE with them, HTTP 403).
RESTRICTED_MESSAGE = "is restricted, expecting header"


def api_key_file() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "osnet-triton" / "api-key"


def load_api_key(create: bool = False) -> str | None:
    """The key from the environment, else from the key file; with `create`, a new key file if there is none."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if key:
        return key
    path = api_key_file()
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if not create:
            return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written aside and linked into place: a reader never sees a half-written key, and of two
    # servers starting at once the second one adopts the first one's key.
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    return path.read_text().strip()


def grpc_headers(key: str | None) -> dict[str, str] | None:
    """The gRPC metadata that carries `key`, for tritonclient's `headers=`."""
    return {GRPC_HEADER_PREFIX + API_KEY_HEADER: key} if key else None


def restriction_flags(key: str) -> list[str]:
    """tritonserver flags that restrict `RESTRICTED_APIS` to callers sending `key`."""
    apis = ",".join(RESTRICTED_APIS)
    return [f"--grpc-restricted-protocol={apis}:{API_KEY_HEADER}={key}", f"--http-restricted-api={apis}:{API_KEY_HEADER}={key}"]
