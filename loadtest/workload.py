"""What a load-test request sends and how its response is judged; shared by the locustfile and the runner.

Two scenarios:
- `ensemble`: encoded JPEG person crops to the `osnet` ensemble (IMAGE BYTES [N,1]), so the
  server decodes and preprocesses, as a camera pipeline would ask it to;
- `tensor`: the tensor model's input, uint8 pixels [N,256,128,3], straight to the tensor model, for
  clients that decode themselves (the pixels the served preprocessor makes of the same crops).
Requests cycle through a pool of distinct crops, so no cache (Triton's response cache, a CPU
cache warmed by one image) can flatter the numbers.

This module deliberately imports neither torch nor tritonclient: every locust process loads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from osnet_base.contract import (
    EMBEDDING_NAME,
    ENSEMBLE_MODEL,
    FEATURE_DIM,
    IMAGE_NAME,
    INPUT_DATATYPE,
    INPUT_NAME,
)
from osnet_base.errors import OsnetTritonError
from osnet_base.image_decoding import decode

SCENARIOS = ("ensemble", "tensor")
# The server normalises in FP32; 1e-3 leaves room for its rounding and catches any real mistake.
NORM_TOLERANCE = 1e-3


class ResponseCheckError(OsnetTritonError):
    """A response that arrived but is wrong: missing output, wrong shape, non-finite or not unit-norm."""


class TritonCallError(OsnetTritonError):
    """A call the transport or the server failed. locust reports failures by repr(), and
    tritonclient's InferenceServerException has an empty one, so its status and message travel in this."""

    @classmethod
    def from_exception(cls, exc: Exception) -> TritonCallError:
        status = getattr(exc, "status", lambda: None)() or type(exc).__name__
        message = getattr(exc, "message", lambda: None)() or str(exc)
        return cls(f"{status}: {message}")


@dataclass(frozen=True)
class Workload:
    """The requests one generator process cycles through: `batches[i]` is one request's input tensor."""

    scenario: str
    model: str
    input_name: str
    datatype: str
    batch_size: int
    batches: tuple[np.ndarray, ...]

    @property
    def distinct_images(self) -> int:
        return self.batch_size * len(self.batches)


def default_model(scenario: str) -> str | None:
    """The model a scenario targets when none is named; the tensor model's name depends on the variant served."""
    return ENSEMBLE_MODEL if scenario == "ensemble" else None


def build_workload(*, scenario: str, model: str, batch_size: int, image_pool: int, seed: int = 0) -> Workload:
    """Split `image_pool` distinct synthetic person crops into requests of `batch_size` items."""
    from engine_builder.synthetic_people import person_jpegs

    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_pool < batch_size:
        raise ValueError(f"image_pool ({image_pool}) must hold at least one batch ({batch_size} images)")
    # Disjoint windows: every request in the cycle carries images no other request in it carries.
    count = (image_pool // batch_size) * batch_size
    jpegs = person_jpegs(count, cameras=4, seed=seed)
    if scenario == "ensemble":
        items = np.array([[jpeg] for jpeg in jpegs], dtype=np.object_)
        input_name, datatype = IMAGE_NAME, "BYTES"
    else:
        items = np.stack([decode(jpeg) for jpeg in jpegs])
        input_name, datatype = INPUT_NAME, INPUT_DATATYPE
    batches = tuple(items[start : start + batch_size] for start in range(0, count, batch_size))
    return Workload(
        scenario=scenario, model=model, input_name=input_name, datatype=datatype, batch_size=batch_size, batches=batches
    )


# The same images through the same model: only batching and threading may move an answer.
MIN_COSINE_TO_REFERENCE = 0.999


def check_against_reference(embedding: np.ndarray, reference: np.ndarray) -> None:
    """Raise `ResponseCheckError` unless every row of `embedding` points where `reference`'s row does."""
    cosine = np.sum(embedding.astype(np.float64) * reference.astype(np.float64), axis=1)
    if cosine.min() < MIN_COSINE_TO_REFERENCE:
        raise ResponseCheckError(f"{EMBEDDING_NAME} differs from the reference answer to the same images "
                                 f"(cosine below {MIN_COSINE_TO_REFERENCE})")


def check_embedding(embedding: np.ndarray | None, batch_size: int) -> None:
    """Raise `ResponseCheckError` unless `embedding` is [batch_size, 512], finite, with unit-norm rows.

    Messages carry no per-request numbers, so locust groups equal failures into one row.
    """
    if embedding is None:
        raise ResponseCheckError(f"response has no {EMBEDDING_NAME} output")
    expected = (batch_size, FEATURE_DIM)
    if embedding.shape != expected:
        raise ResponseCheckError(f"{EMBEDDING_NAME} has shape {list(embedding.shape)}, expected {list(expected)}")
    if not np.isfinite(embedding).all():
        raise ResponseCheckError(f"{EMBEDDING_NAME} holds NaN or Inf")
    norms = np.linalg.norm(embedding.astype(np.float64), axis=1)
    if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        raise ResponseCheckError(f"{EMBEDDING_NAME} rows are not unit-norm (tolerance {NORM_TOLERANCE})")
