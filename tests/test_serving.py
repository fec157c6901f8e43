"""The embedded default end to end: JPEG bytes -> real tritonserver (CPU) -> gRPC embeddings."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as system_shm
from PIL import Image
from tritonclient.utils import InferenceServerException

from client.embedding_client import (
    EmbeddingClient,
    InvalidInputError,
    ModelNotFoundError,
    ServerUnavailableError,
    _SharedMemoryInputs,
)
from osnet_base.api_key import grpc_headers, load_api_key
from osnet_base.triton_server import find_free_port
from crafted_images import png_of_size, torchreid_embeddings
from engine_builder.preprocessing import normalize_pixels, preprocess_encoded
from engine_builder.synthetic_people import encode_jpeg, person_jpegs, render_person

pytestmark = pytest.mark.server


@pytest.fixture
def client(triton_server):
    with EmbeddingClient(triton_server.grpc_url) as client:
        yield client


def test_ensemble_embedding_matches_in_process_pytorch(client, served_model):
    jpegs = person_jpegs(6, cameras=3)
    served = client.embed_images(jpegs)
    assert served.shape == (6, 512) and served.dtype == np.float32
    cosines = np.sum(served * torchreid_embeddings(served_model, jpegs), axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_features_output_is_the_raw_eval_feature(client, served_model):
    jpeg = person_jpegs(1)
    with torch.inference_mode():
        expected = served_model(preprocess_encoded(jpeg[0])[None]).numpy()
    np.testing.assert_allclose(client.embed_images(jpeg, output="FEATURES"), expected, atol=1e-4, rtol=1e-4)


def test_tensor_model_serves_uint8_pixels(client, served_model, tensor_model):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 256, 128, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(served_model(normalize_pixels(pixels)), dim=1).numpy()
    np.testing.assert_allclose(client.embed_tensors(pixels, tensor_model), expected, atol=1e-5)
    assert client.served_tensor_model() == tensor_model


def test_the_tensor_model_refuses_what_the_old_contract_sent(client, tensor_model):
    with pytest.raises(InvalidInputError, match=r"uint8 pixels \[N, 256, 128, 3\], got float32 \[2, 3, 256, 128\]"):
        client.embed_tensors(np.zeros((2, 3, 256, 128), np.float32), tensor_model)


def test_sixteen_concurrent_clients_each_get_their_own_embedding(triton_server, served_model):
    jpegs = [encode_jpeg(render_person(identity, camera=identity % 3)) for identity in range(16)]
    expected = torchreid_embeddings(served_model, jpegs)

    def embed_alone(index: int) -> np.ndarray:
        with EmbeddingClient(triton_server.grpc_url) as own_client:
            return np.stack([own_client.embed_images([jpegs[index]])[0] for _ in range(3)])

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(embed_alone, range(16)))
    similarity = np.stack([r.mean(axis=0) for r in results]) @ expected.T
    # Each client's answer is its own image's embedding and nobody else's.
    assert np.all(np.argmax(similarity, axis=1) == np.arange(16))
    assert np.diag(similarity).min() >= 0.9999
    for index, result in enumerate(results):
        np.testing.assert_allclose(result, np.broadcast_to(expected[index], result.shape), atol=2e-4)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (encode_jpeg(render_person(1))[:400], r"IMAGE\[0\] is not a decodable JPEG"),
        (b"", "is empty"),
        (b"definitely not an image", "is not a JPEG or PNG file"),
        (png_of_size(20000, 20000), "20000x20000 pixels, over the limit"),
    ],
    ids=["truncated_jpeg", "empty_bytes", "garbage", "decompression_bomb"],
)
def test_bad_image_is_a_clear_error_and_the_server_keeps_serving(client, payload, message):
    with pytest.raises(InvalidInputError, match=message):
        client.embed_images([payload])
    assert client.embed_images(person_jpegs(1)).shape == (1, 512)


def test_one_bad_image_fails_only_its_own_request(triton_server, client):
    good, bad = person_jpegs(1)[0], b"\xff\xd8\xff broken"
    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(lambda payload: _try_embed(triton_server.grpc_url, payload), [good, bad] * 4))
    assert outcomes == ["ok", "IMAGE[0]"] * 4


def _try_embed(url: str, payload: bytes) -> str:
    with EmbeddingClient(url) as client:
        try:
            client.embed_images([payload])
        except InvalidInputError as exc:
            return "IMAGE[0]" if "IMAGE[0]" in str(exc) else str(exc)
    return "ok"


@pytest.mark.parametrize(
    ("shape", "datatype", "message"),
    [
        ((1, 256, 128, 2), "UINT8", "unexpected shape for input 'INPUT'"),
        ((1, 3, 256, 128), "UINT8", "unexpected shape for input 'INPUT'"),
        ((1, 256, 128, 3), "FP32", "data-type is 'FP32'"),
        ((65, 256, 128, 3), "UINT8", "batch-size must be <= 64"),
        # Triton reads a batch dimension of 0 as 1 and finds no bytes: the model never sees an empty batch.
        ((0, 256, 128, 3), "UINT8", "input byte size mismatch"),
    ],
    ids=["wrong_shape", "old_layout", "wrong_dtype", "batch_too_large", "empty_batch"],
)
def test_wrong_tensor_is_refused_with_a_clear_message(triton_server, client, shape, datatype, message, tensor_model):
    raw = grpcclient.InferenceServerClient(triton_server.grpc_url)
    request = grpcclient.InferInput("INPUT", list(shape), datatype)
    request.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.uint8))
    with pytest.raises(InferenceServerException, match=message):
        raw.infer(tensor_model, [request])
    raw.close()
    assert client.embed_tensors(np.zeros((1, 256, 128, 3), np.uint8), tensor_model).shape == (1, 512)


def _registered_shared_memory(url: str) -> set[str]:
    raw = grpcclient.InferenceServerClient(url)
    try:
        status = raw.get_system_shared_memory_status(headers=grpc_headers(load_api_key()), as_json=True)
        return {region["name"] for region in status.get("regions", {}).values()}
    finally:
        raw.close()


def test_shared_memory_tensors_match_grpc_and_leave_nothing_behind(triton_server, client, tensor_model):
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 256, (size, 256, 128, 3), dtype=np.uint8) for size in (2, 5, 1, 7, 3, 5, 8, 4)]
    expected = [client.embed_tensors(batch, tensor_model) for batch in batches]
    with EmbeddingClient(triton_server.grpc_url, shared_memory=True) as shared:
        # Four requests in flight at once, batch sizes that make regions grow: each gets its own embeddings.
        with ThreadPoolExecutor(max_workers=4) as pool:
            served = list(pool.map(lambda batch: shared.embed_tensors(batch, tensor_model), batches * 3))
        for got, want in zip(served, expected * 3):
            np.testing.assert_allclose(got, want, atol=1e-5)
        regions = _registered_shared_memory(triton_server.grpc_url)
        assert 1 <= len(regions) <= 4, regions
        with pytest.raises(InvalidInputError):
            shared.embed_tensors(np.zeros((1, 128, 256, 3), np.uint8), tensor_model)
        # As after a server restart: the server forgets every region; the client registers afresh.
        raw = grpcclient.InferenceServerClient(triton_server.grpc_url)
        for attempt in range(20):  # Triton refuses "in use" until the refused request above lets go of its region
            try:
                raw.unregister_system_shared_memory(headers=grpc_headers(triton_server.api_key))
                break
            except InferenceServerException:
                if attempt == 19:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raw.close()
        np.testing.assert_allclose(shared.embed_tensors(batches[0], tensor_model), expected[0], atol=1e-5)
        renewed = _registered_shared_memory(triton_server.grpc_url)
        assert len(renewed) == 1 and not renewed & regions
        assert not [path for path in Path("/dev/shm").iterdir() if path.name in regions]
        regions |= renewed
    assert not _registered_shared_memory(triton_server.grpc_url) & regions
    assert not [path for path in Path("/dev/shm").iterdir() if path.name in regions]


def test_a_region_a_request_still_holds_is_unregistered_once_it_is_released(triton_server, tensor_model):
    batch = np.zeros((64, 256, 128, 3), np.uint8)  # ~0.1 s of work: the server holds the region meanwhile
    raw = grpcclient.InferenceServerClient(triton_server.grpc_url)
    inputs = _SharedMemoryInputs(raw, triton_server.grpc_url, grpc_headers(triton_server.api_key))
    region = inputs.acquire(batch.nbytes)
    system_shm.set_shared_memory_region(region.handle, [batch])
    request = grpcclient.InferInput("INPUT", list(batch.shape), "UINT8")
    request.set_shared_memory(region.name, batch.nbytes)
    done = []
    raw.async_infer(tensor_model, [request], callback=lambda result, error: done.append(error))
    inputs.release(region)
    inputs.close()  # Triton refuses "in use" until the request lets go; close waits for that
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [None]
    assert region.name not in _registered_shared_memory(triton_server.grpc_url)
    assert not (Path("/dev/shm") / region.name).exists()
    raw.close()


def test_shared_memory_without_a_server_is_named(tensor_model):
    with EmbeddingClient(f"127.0.0.1:{find_free_port()}", timeout_s=5, shared_memory=True) as client:
        with pytest.raises(ServerUnavailableError, match="is tritonserver running"):
            client.embed_tensors(np.zeros((1, 256, 128, 3), np.uint8), tensor_model)
    assert not [path for path in Path("/dev/shm").iterdir() if path.name.startswith(f"osnet_client_{os.getpid()}_")]


def test_empty_batch_is_refused_before_sending(client, tensor_model):
    with pytest.raises(InvalidInputError, match="empty batch"):
        client.embed_images([])
    with pytest.raises(InvalidInputError, match="non-empty batch"):
        client.embed_tensors(np.zeros((0, 256, 128, 3), np.uint8), tensor_model)


def test_missing_model_and_unreachable_server_are_named(triton_server):
    with EmbeddingClient(triton_server.grpc_url, model="osnet_x9_9") as client:
        with pytest.raises(ModelNotFoundError, match="osnet_x9_9"):
            client.embed_images(person_jpegs(1))
    with EmbeddingClient(f"127.0.0.1:{find_free_port()}", timeout_s=5) as client:
        with pytest.raises(ServerUnavailableError, match="is tritonserver running"):
            client.embed_images(person_jpegs(1))


def test_health_reports_every_model_ready(client, tensor_model):
    health = client.health()
    assert health.live and health.ready
    assert health.models == {"osnet": "READY", "osnet_frames": "READY", "preprocess": "READY", tensor_model: "READY"}
    assert health.server_version.startswith("2.")
