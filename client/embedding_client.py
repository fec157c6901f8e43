"""Embedding person crops through Triton over gRPC.

`EmbeddingClient` sends encoded images to the `osnet` ensemble, or pixels it already holds (crops a
detector cut from a frame) straight to the tensor model the ensemble runs, and returns L2-normalised
embeddings. Pixels travel as the tensor model's input, uint8 [N,256,128,3] RGB: `embed_crops` resizes
crops of any size exactly as the server's preprocessor resizes a decoded file, so no JPEG round trip
is needed and the embedding is the one the image would get. Transport failures become the few
exceptions below, with messages that say what to do; nothing else from gRPC leaks out.

A client on the server's host can pass pixels through Triton system shared memory
(`shared_memory=True`): a batch of 32 is 3.1 MB, which gRPC and protobuf copy several times on
both sides; through shared memory it is one copy.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as system_shm
from tritonclient.utils import InferenceServerException

from osnet_base.api_key import API_KEY_ENV, RESTRICTED_MESSAGE, api_key_file, grpc_headers, load_api_key
from osnet_base.contract import (
    BOXES_NAME,
    DEFAULT_URL,
    EMBEDDING_NAME,
    ENSEMBLE_MODEL,
    FEATURE_DIM,
    FRAME_NAME,
    FRAMES_MODEL,
    IMAGE_FILE_SUFFIXES,
    IMAGE_NAME,
    INPUT_DATATYPE,
    INPUT_NAME,
    INPUT_SHAPE,
)
from osnet_base.errors import OsnetTritonError
from osnet_base.image_decoding import ImageRejected, pixels_of_array

logger = logging.getLogger(__name__)

# tritonclient's own message limits, and one connection per client that retries every 2 s at most while
# its server is down: gRPC's back-off otherwise grows to 2 minutes after a restart, and channels to one
# address share a connection, so a new client would inherit an old one's back-off.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# Triton's words for a region it does not know, and for one a request still holds.
UNKNOWN_REGION_MESSAGE = "Unable to find shared memory region"
REGION_IN_USE_MESSAGE = "it is currently in use"


class ClientError(OsnetTritonError):
    """Base class of the client's errors."""


class ServerUnavailableError(ClientError):
    """No Triton server answers at the URL."""


class ServerTimeoutError(ClientError):
    """The server took longer than the request timeout to answer."""


class ModelNotFoundError(ClientError):
    """The server answers but does not serve the model (or it is not ready)."""


class InvalidInputError(ClientError):
    """The server refused the input: an undecodable image, a wrong shape or dtype, an empty batch."""


@dataclass(frozen=True)
class ServerHealth:
    url: str
    live: bool
    ready: bool
    server_version: str
    models: dict[str, str]  # name -> "READY" or the reason it is not


def _describe_model_state(entry: dict) -> str:
    state = entry.get("state") or "UNKNOWN"
    return f"{state} ({entry['reason']})" if entry.get("reason") and state != "READY" else state


def _server_unavailable(exc: InferenceServerException, url: str, timeout_s: float | None = None) -> ClientError | None:
    status = exc.status() or ""
    if RESTRICTED_MESSAGE in (exc.message() or ""):
        return None  # Triton refuses a call without the API key as UNAVAILABLE too
    if "DEADLINE_EXCEEDED" in status:
        within = "" if timeout_s is None else f" within {timeout_s:g} s"
        return ServerTimeoutError(f"the server at {url} did not answer{within} ({status}): it may be overloaded "
                                  "or still loading its models; try a longer --timeout-s")
    if "UNAVAILABLE" in status:
        return ServerUnavailableError(f"no Triton server reachable at {url} ({status}): is tritonserver running?")
    return None


def check_grpc_url(url: str) -> str:
    """A gRPC endpoint is host:port; a scheme means someone passed an HTTP URL (Triton's HTTP port is another one)."""
    if "://" in url:
        raise ClientError(f"{url!r} is not a gRPC endpoint: give host:port without a scheme, e.g. {DEFAULT_URL} "
                          "(Triton's gRPC port, 8001 by default; 8000 is its HTTP port)")
    return url


def _translate(exc: InferenceServerException, url: str, model: str, timeout_s: float | None = None) -> ClientError:
    status = exc.status() or ""
    message = exc.message() or str(exc)
    unreachable = _server_unavailable(exc, url, timeout_s)
    if unreachable is not None:
        return unreachable
    if RESTRICTED_MESSAGE in message:
        return _key_refused(url, message)
    if "NOT_FOUND" in status or "unknown model" in message or "is not found" in message:
        return ModelNotFoundError(f"server at {url} does not serve model {model!r}: {message}")
    if "INVALID_ARG" in status:
        return InvalidInputError(message)
    return ClientError(f"{model} at {url} failed ({status}): {message}")


def _key_refused(url: str, message: str) -> ClientError:
    return ClientError(f"the server at {url} refused a call that needs its API key ({message}): set {API_KEY_ENV}, "
                       f"or run as the user whose {api_key_file()} the server uses")


@dataclass
class _SharedMemoryRegion:
    name: str  # what Triton calls it; also its /dev/shm key
    handle: object
    byte_size: int


class _SharedMemoryInputs:
    """Triton system shared memory regions for tensor inputs: one per request in flight, registered
    with the server once and reused; a region too small for a batch is replaced by a larger one."""

    def __init__(self, client: grpcclient.InferenceServerClient, url: str, headers: dict[str, str] | None):
        self._client, self._url, self._headers = client, url, headers
        self._free: list[_SharedMemoryRegion] = []
        self._lock = threading.Lock()

    def _create(self, byte_size: int) -> _SharedMemoryRegion:
        name = f"osnet_client_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        handle = system_shm.create_shared_memory_region(name, f"/{name}", byte_size)
        region = _SharedMemoryRegion(name, handle, byte_size)
        try:
            self._client.register_system_shared_memory(name, f"/{name}", byte_size, headers=self._headers)
        except InferenceServerException as exc:
            system_shm.destroy_shared_memory_region(handle)
            unreachable = _server_unavailable(exc, self._url)
            if unreachable is not None:
                raise unreachable from None
            if RESTRICTED_MESSAGE in (exc.message() or ""):
                raise _key_refused(self._url, exc.message()) from None
            raise ClientError(
                f"the server at {self._url} cannot map this client's shared memory ({exc.message()}): "
                "shared memory needs the server on this host; use the default gRPC transport otherwise"
            ) from None
        return region

    def _destroy(self, region: _SharedMemoryRegion) -> None:
        self._unregister(region.name)
        system_shm.destroy_shared_memory_region(region.handle)

    def _unregister(self, name: str, attempts: int = 20) -> None:
        # Triton drops its reference to a request's region a moment after the response is sent; until
        # then it refuses to unregister the region as "in use".
        for attempt in range(attempts):
            try:
                self._client.unregister_system_shared_memory(name, headers=self._headers)
                return
            except InferenceServerException as exc:
                message = exc.message() or ""
                if REGION_IN_USE_MESSAGE not in message:
                    return  # the server is gone (and its registrations with it) or never knew the region
                if attempt == attempts - 1:
                    logger.warning("server at %s kept shared memory region %s registered: %s", self._url, name, message)
                    return
                time.sleep(0.005 * (attempt + 1))

    def acquire(self, byte_size: int) -> _SharedMemoryRegion:
        with self._lock:
            region = self._free.pop() if self._free else None
        if region is not None and region.byte_size < byte_size:
            self._destroy(region)
            region = None
        return region or self._create(byte_size)

    def release(self, region: _SharedMemoryRegion) -> None:
        with self._lock:
            self._free.append(region)

    def discard(self, region: _SharedMemoryRegion) -> None:
        """`region` is unknown to the server, so are the idle ones (it restarted): remove them all."""
        self._destroy(region)
        self.close()

    def close(self) -> None:
        """Unregister and remove the regions; call it once no request is in flight."""
        with self._lock:
            regions, self._free = self._free, []
        for region in regions:
            self._destroy(region)


class EmbeddingClient:
    """A gRPC client for one server, or for several given as "host:port,host:port" or a list (then a
    `PooledEmbeddingClient`: least-loaded healthy routing, one retry elsewhere); safe to share between threads.

    `shared_memory=True` sends pixel batches (`embed_tensors`, `embed_crops`) through Triton system shared memory; the
    server must run on this host. Images and all responses still travel over gRPC.
    Shared memory and the model index need the server's API key: `api_key`, else this user's
    (see osnet_base.api_key).
    """

    def __new__(cls, url: str | Sequence[str] = DEFAULT_URL, *args, **kwargs):
        # Several servers ("a:8001,b:8001" or a list): the same client, routed over them (client.server_pool).
        several = len(url.split(",")) > 1 if isinstance(url, str) else len(url) > 1
        if cls is EmbeddingClient and several:
            from client.server_pool import PooledEmbeddingClient

            cls = PooledEmbeddingClient
        return super().__new__(cls)

    def __init__(self, url: str = DEFAULT_URL, model: str = ENSEMBLE_MODEL, timeout_s: float = 60.0,
                 shared_memory: bool = False, api_key: str | None = None):
        url = url if isinstance(url, str) else url[0]
        self.url = check_grpc_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self._headers = grpc_headers(api_key or load_api_key())
        self._shared_inputs = _SharedMemoryInputs(self._client, url, self._headers) if shared_memory else None
        self._tensor_model: str | None = None

    def close(self) -> None:
        if self._shared_inputs is not None:
            self._shared_inputs.close()
        self._client.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def embed_images(self, images: Sequence[bytes], output: str = EMBEDDING_NAME) -> np.ndarray:
        """Embed encoded JPEG/PNG images in one request through the ensemble: [N, 512] FP32."""
        if len(images) == 0:
            raise InvalidInputError("empty batch: pass at least one image")
        encoded = np.array([[image] for image in images], dtype=np.object_)
        request = grpcclient.InferInput(IMAGE_NAME, list(encoded.shape), "BYTES")
        request.set_data_from_numpy(encoded)
        return self._infer(self.model, request, output)

    def embed_tensors(self, pixels: np.ndarray, model: str, output: str = EMBEDDING_NAME) -> np.ndarray:
        """Embed the tensor model's input, uint8 pixels [N, 256, 128, 3] RGB, with a tensor model such as
        `osnet_x1_0_int8` (`served_tensor_model()` names the one the ensemble runs)."""
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[1:] != INPUT_SHAPE or len(pixels) == 0:
            raise InvalidInputError(
                f"expected a non-empty batch of uint8 pixels [N, {', '.join(map(str, INPUT_SHAPE))}], got {pixels.dtype} "
                f"{list(pixels.shape)}: the tensor models normalise themselves; embed_crops resizes crops of any size")
        pixels = np.ascontiguousarray(pixels)
        request = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), INPUT_DATATYPE)
        if self._shared_inputs is None:
            request.set_data_from_numpy(pixels)
            return self._infer(model, request, output)
        return self._infer_shared(pixels, request, model, output)

    def embed_crops(self, crops: Sequence[np.ndarray], model: str | None = None, output: str = EMBEDDING_NAME) -> np.ndarray:
        """Embed decoded crops (uint8 [H,W,3] RGB, [H,W,4] RGBA or [H,W] gray, any size) in one request to
        the tensor model (default: the one the ensemble runs), resized as the preprocessor resizes a
        decoded image: the same embedding as the ensemble gives the crop saved losslessly, a quarter of
        the bytes of FP32, and no encoding."""
        if len(crops) == 0:
            raise InvalidInputError("empty batch: pass at least one crop")
        try:
            pixels = np.stack([pixels_of_array(crop, index) for index, crop in enumerate(crops)])
        except ImageRejected as exc:
            raise InvalidInputError(str(exc)) from None
        return self.embed_tensors(pixels, model or self.served_tensor_model(), output)

    def embed_frames(self, frames: Sequence[tuple[bytes | np.ndarray, object]], output: str = EMBEDDING_NAME,
                     model: str = FRAMES_MODEL, concurrency: int = 8, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Embed every box of every frame: `frames` is (frame, boxes) pairs, perhaps from several cameras,
        a frame being encoded JPEG/PNG bytes or decoded pixels (uint8 [H,W,3] RGB, sent as a lossless PNG),
        boxes x1, y1, x2, y2 in its pixels [K,4]. One request per frame to `osnet_frames`, `concurrency` of
        them in flight, so the server batches the crops of all of them. Returns [K, 512] per frame, in order.
        `names` (e.g. file names) say which frame an error is about; by default its index."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        names = [f"frame {index}" for index in range(len(frames))] if names is None else list(names)
        requests = [self._frame_request(name, frame, boxes) for name, (frame, boxes) in zip(names, frames, strict=True)]

        def embed(index: int) -> np.ndarray:
            try:
                result = self._client.infer(model, list(requests[index]), outputs=[grpcclient.InferRequestedOutput(output)],
                                            client_timeout=self.timeout_s)
                return result.as_numpy(output)
            except InferenceServerException as exc:
                error = _translate(exc, self.url, model, self.timeout_s)
                raise type(error)(f"{names[index]}: {error}") from None

        if len(requests) <= 1 or concurrency == 1:
            return [embed(index) for index in range(len(requests))]
        with ThreadPoolExecutor(max_workers=min(concurrency, len(requests))) as pool:
            return list(pool.map(embed, range(len(requests))))

    @staticmethod
    def _frame_request(name: str, frame: bytes | np.ndarray, boxes: object) -> tuple[grpcclient.InferInput, grpcclient.InferInput]:
        if isinstance(frame, np.ndarray):
            frame = encode_png(frame, name)
        if not isinstance(frame, bytes):
            raise InvalidInputError(f"{name} is a {type(frame).__name__}: expected encoded JPEG/PNG bytes or uint8 pixels")
        boxes = np.asarray(boxes, dtype=np.float32)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise InvalidInputError(f"{name}: boxes have shape {list(boxes.shape)}: expected [K, 4] (x1, y1, x2, y2)")
        encoded = grpcclient.InferInput(FRAME_NAME, [1], "BYTES")
        encoded.set_data_from_numpy(np.array([frame], dtype=np.object_))
        corners = grpcclient.InferInput(BOXES_NAME, list(boxes.shape), "FP32")
        corners.set_data_from_numpy(np.ascontiguousarray(boxes))
        return encoded, corners

    def served_tensor_model(self) -> str:
        """The tensor model the ensemble (this client's `model`) runs, asked of the server once."""
        if self._tensor_model is None:
            try:
                config = self._client.get_model_config(self.model, as_json=True)["config"]
            except InferenceServerException as exc:
                raise _translate(exc, self.url, self.model) from None
            steps = config.get("ensemble_scheduling", {}).get("step", [])
            if not steps:
                raise ModelNotFoundError(f"{self.model} at {self.url} is not an ensemble: name the tensor model")
            self._tensor_model = steps[-1]["model_name"]
        return self._tensor_model

    def _infer_shared(self, pixels: np.ndarray, request: grpcclient.InferInput, model: str, output: str,
                      retry: bool = True) -> np.ndarray:
        region = self._shared_inputs.acquire(pixels.nbytes)
        try:
            system_shm.set_shared_memory_region(region.handle, [pixels])
            request.set_shared_memory(region.name, pixels.nbytes)
            return self._client_infer(model, request, output)
        except InferenceServerException as exc:
            if retry and UNKNOWN_REGION_MESSAGE in (exc.message() or ""):
                # The server restarted, or the region was unregistered: register afresh, once.
                self._shared_inputs.discard(region)
                region = None
                return self._infer_shared(pixels, request, model, output, retry=False)
            raise _translate(exc, self.url, model, self.timeout_s) from None
        finally:
            if region is not None:
                self._shared_inputs.release(region)

    def _client_infer(self, model: str, request: grpcclient.InferInput, output: str) -> np.ndarray:
        result = self._client.infer(
            model, [request], outputs=[grpcclient.InferRequestedOutput(output)], client_timeout=self.timeout_s
        )
        return result.as_numpy(output)

    def _infer(self, model: str, request: grpcclient.InferInput, output: str) -> np.ndarray:
        try:
            return self._client_infer(model, request, output)
        except InferenceServerException as exc:
            raise _translate(exc, self.url, model, self.timeout_s) from None

    def health(self) -> ServerHealth:
        timeout = self.timeout_s
        try:
            live = self._client.is_server_live(client_timeout=timeout)
            ready = self._client.is_server_ready(client_timeout=timeout)
            version = self._client.get_server_metadata(as_json=True, client_timeout=timeout).get("version", "?")
            index = self._client.get_model_repository_index(headers=self._headers, as_json=True, client_timeout=timeout).get("models", [])
        except InferenceServerException as exc:
            raise _translate(exc, self.url, self.model, timeout) from None
        models = {m["name"]: _describe_model_state(m) for m in index}
        return ServerHealth(url=self.url, live=live, ready=ready, server_version=version, models=models)


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the images inside folders (sorted); anything missing is an error."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise InvalidInputError(f"{path} does not exist")
    return found


def read_image_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None


def _batches(items: Sequence[Path], batch_size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def embed_files(
    client: EmbeddingClient, paths: Sequence[Path], batch_size: int = 16, concurrency: int = 4
) -> np.ndarray:
    """Embed image files in batches with `concurrency` requests in flight; rows follow `paths`."""
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be >= 1")
    if not paths:
        raise InvalidInputError("no images to embed")

    def embed_batch(batch: Sequence[Path]) -> np.ndarray:
        try:
            return client.embed_images([read_image_bytes(path) for path in batch])
        except InvalidInputError as exc:
            raise InvalidInputError(f"batch {batch[0].name}..{batch[-1].name}: {exc} "
                                    "(--skip-unreadable leaves such files out and lists them)") from None

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return np.concatenate(list(pool.map(embed_batch, _batches(paths, batch_size))))


@dataclass(frozen=True)
class EmbeddedFiles:
    paths: list[Path]  # the files embedded, in the order given
    embeddings: np.ndarray  # one row per path
    skipped: list[tuple[Path, str]]  # files that could not be read or decoded, and why


def embed_readable_files(
    client: EmbeddingClient, paths: Sequence[Path], batch_size: int = 16, concurrency: int = 4
) -> EmbeddedFiles:
    """`embed_files`, except that a file that cannot be read or decoded is left out and reported
    instead of failing the job: a batch the server refuses is retried one file at a time."""
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be >= 1")

    def embed_batch(batch: Sequence[Path]) -> list[tuple[Path, np.ndarray | str]]:
        try:
            return list(zip(batch, client.embed_images([read_image_bytes(path) for path in batch])))
        except InvalidInputError as exc:
            if len(batch) == 1:
                return [(batch[0], str(exc))]
        return [item for path in batch for item in embed_batch([path])]

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = [item for batch in pool.map(embed_batch, _batches(paths, batch_size)) for item in batch]
    kept = [(path, row) for path, row in results if not isinstance(row, str)]
    if not kept:
        raise InvalidInputError(f"none of the {len(paths)} files could be embedded: " + "; ".join(
            f"{path}: {reason}" for path, reason in results[:3]))
    return EmbeddedFiles(paths=[path for path, _ in kept], embeddings=np.stack([row for _, row in kept]),
                         skipped=[(path, reason) for path, reason in results if isinstance(reason, str)])


def encode_png(pixels: np.ndarray, name: str = "image") -> bytes:
    """Decoded pixels (uint8 [H,W,3] RGB, [H,W,4] RGBA or [H,W] gray) as a PNG: lossless at any zlib level,
    so at the fastest: a client encodes every frame it sends."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))) or 0 in pixels.shape:
        raise InvalidInputError(f"{name} is {pixels.dtype} of shape {list(pixels.shape)}: expected uint8 [H,W,3] RGB, "
                                "[H,W,4] RGBA or [H,W] gray")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows of `a` [N, D] and rows of `b` [M, D]: [N, M]."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T
