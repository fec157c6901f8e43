"""Health that tells the truth: one tiny real inference through the `osnet` ensemble, judged.

Triton's own `/v2/health/ready` answers 200 and every model stays READY after a python-backend stub
died, while every request fails. `check_inference` sends one small PNG through the ensemble (so the
preprocess stub, the tensor-model stub and the ensemble all take part) and says ready only for a
[1, 512] finite, unit-norm embedding, and, given a reference, one that points where it did before.
The supervisor, `TritonServerProcess`, `osnet-client health` and readiness probes all call it.
"""
from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from osnet_base.contract import EMBEDDING_NAME, ENSEMBLE_MODEL, FEATURE_DIM, IMAGE_NAME

# The server normalises in FP32; this leaves room for its rounding and for BF16 runtimes.
NORM_TOLERANCE = 1e-3
# The same image through the same model: only batching and threading may move the result.
MIN_COSINE_TO_REFERENCE = 0.999
# A probe connects afresh. gRPC otherwise shares one connection per address within a process, and
# after the server was down that connection waits out its reconnect back-off (1 s, 1.6 s, 2.6 s ...)
# before it tries again: the probe would report that wait, not the server.
PROBE_CHANNEL_ARGS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True)
class InferenceCheck:
    """What one probe found: `ok` only for a correct embedding; `detail` says why not."""

    ok: bool
    detail: str
    latency_s: float
    embedding: Any = None  # np.ndarray [512] when the server answered with one

    def __bool__(self) -> bool:
        return self.ok


@lru_cache(maxsize=1)
def probe_image_png(width: int = 32, height: int = 64) -> bytes:
    """A small deterministic RGB PNG (colour gradients), written with zlib so no imaging library is needed."""
    rows = b"".join(
        b"\x00" + bytes(channel for x in range(width) for channel in (x * 255 // width, y * 255 // height, 128))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def judge_embedding(embedding: Any, reference: Any = None) -> str | None:
    """Why `embedding` (the [1, 512] answer to the probe image) is wrong, or None if it is right."""
    import numpy as np

    if embedding is None:
        return f"the response has no {EMBEDDING_NAME}"
    if embedding.shape != (1, FEATURE_DIM):
        return f"{EMBEDDING_NAME} has shape {list(embedding.shape)}, expected [1, {FEATURE_DIM}]"
    vector = embedding[0].astype(np.float64)
    if not np.isfinite(vector).all():
        return f"{EMBEDDING_NAME} holds NaN or Inf"
    if abs(np.linalg.norm(vector) - 1.0) > NORM_TOLERANCE:
        return f"{EMBEDDING_NAME} is not unit-norm (norm {np.linalg.norm(vector):.4f})"
    if reference is not None:
        cosine = float(vector @ np.asarray(reference, dtype=np.float64))
        if cosine < MIN_COSINE_TO_REFERENCE:
            return f"{EMBEDDING_NAME} moved from the server's earlier answer (cosine {cosine:.4f})"
    return None


def check_inference(url: str, timeout_s: float = 5.0, model: str = ENSEMBLE_MODEL, reference: Any = None) -> InferenceCheck:
    """Send the probe image to `model` at `url` (gRPC, a connection of its own) and judge the answer.
    Never raises for the server's sake: an unreachable, failing, slow or wrong server is a failed
    check with the reason."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    request = grpcclient.InferInput(IMAGE_NAME, [1, 1], "BYTES")
    request.set_data_from_numpy(np.array([[probe_image_png()]], dtype=np.object_))
    try:
        with grpcclient.InferenceServerClient(url, channel_args=PROBE_CHANNEL_ARGS) as client:
            result = client.infer(model, [request], outputs=[grpcclient.InferRequestedOutput(EMBEDDING_NAME)],
                                  client_timeout=timeout_s)
            embedding = result.as_numpy(EMBEDDING_NAME)
    except InferenceServerException as exc:
        status, message = exc.status() or "error", exc.message() or str(exc)
        if "NOT_FOUND" in status or "unknown model" in message:
            message = f"the server at {url} does not serve model {model!r}: {message}"
        return InferenceCheck(False, f"{status}: {message}", time.monotonic() - started)
    latency = time.monotonic() - started
    problem = judge_embedding(embedding, reference)
    if problem is not None:
        return InferenceCheck(False, problem, latency)
    return InferenceCheck(True, f"{model} answered a correct embedding in {latency * 1000:.0f} ms", latency, embedding[0])
