"""Images through the served ensemble: every kind of JPEG and PNG embedded as torchreid embeds it,
other formats refused by name, each budget enforced, hostile files confined to their own request,
and the preprocessor's memory given back after the largest request it accepts."""
from __future__ import annotations

import io
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.embedding_client import EmbeddingClient, InvalidInputError
from crafted_images import (
    accepted_kinds,
    crafted_dds,
    crafted_im,
    crafted_tiff,
    encode,
    jpeg_with_scans,
    mutated,
    other_formats,
    png_of_size,
    torchreid_embeddings,
)
from engine_builder.synthetic_people import encode_jpeg, person_jpegs, render_person
from osnet_base.image_decoding import DEFAULT_BUDGETS, MAX_JPEG_SCANS
from osnet_base.triton_server import TritonServerConfig, TritonServerProcess

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")]


@pytest.fixture
def client(triton_server):
    with EmbeddingClient(triton_server.grpc_url) as client:
        yield client


def test_every_kind_of_jpeg_and_png_embeds_as_torchreid_embeds_it(client, served_model):
    kinds = accepted_kinds()
    served = client.embed_images([sent for sent, _ in kinds.values()])
    # For 16-bit files, the reference is the same picture at 8 bits (torchreid's own pipeline clips them to white).
    expected = torchreid_embeddings(served_model, [reference for _, reference in kinds.values()])
    cosines = dict(zip(kinds, np.sum(served * expected, axis=1).round(6)))
    assert min(cosines.values()) >= 0.9999, cosines


def test_crops_a_client_holds_as_pixels_embed_as_their_files_do(client):
    jpegs = person_jpegs(5, cameras=2)
    crops = [np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs]
    crops.append(crops[0][:, :, 0])  # a gray crop
    files = jpegs + [encode(Image.fromarray(crops[-1]), "PNG")]
    np.testing.assert_allclose(client.embed_crops(crops), client.embed_images(files), atol=1e-5)
    with pytest.raises(InvalidInputError, match=r"crop 1 is float32"):
        client.embed_crops([crops[0], crops[1].astype(np.float32)])


def test_formats_outside_the_allowlist_are_refused_by_name(client):
    for name, data in other_formats().items():
        with pytest.raises(InvalidInputError, match=rf"IMAGE\[1\] is a {name} file: the preprocessor decodes only JPEG and PNG"):
            client.embed_images([person_jpegs(1)[0], data])
    assert client.embed_images(person_jpegs(1)).shape == (1, 512)


def test_each_budget_refuses_what_is_over_it_and_takes_what_is_at_it(client):
    jpeg = person_jpegs(1)[0]
    at_limit = jpeg + b"\x00" * (DEFAULT_BUDGETS.max_image_bytes - len(jpeg))  # JPEG decoders stop at the end-of-image marker
    assert client.embed_images([at_limit]).shape == (1, 512)
    with pytest.raises(InvalidInputError, match=rf"IMAGE\[0\] is {DEFAULT_BUDGETS.max_image_bytes + 1} bytes, over the limit .*MAX_IMAGE_BYTES"):
        client.embed_images([at_limit + b"\x00"])

    width = 2000
    height = DEFAULT_BUDGETS.max_image_pixels // width
    assert client.embed_images([png_of_size(width, height)]).shape == (1, 512)
    with pytest.raises(InvalidInputError, match=rf"IMAGE\[0\] is {width}x{height + 1} pixels, over the limit .*MAX_IMAGE_PIXELS"):
        client.embed_images([png_of_size(width, height + 1)])

    per_request = DEFAULT_BUDGETS.max_request_pixels // (width * height)
    full = [png_of_size(width, height)] * per_request
    assert client.embed_images(full).shape == (per_request, 512)
    # One more item, and a broken one: the request is refused for its size, before anything is decoded.
    with pytest.raises(InvalidInputError, match=r"over the limit of \d+ per request \(MAX_REQUEST_PIXELS\).*nothing was decoded"):
        client.embed_images(full + [png_of_size(width, height)[:60]])

    with pytest.raises(InvalidInputError, match=rf"IMAGE\[0\] is a JPEG of {MAX_JPEG_SCANS + 10} scans, over the limit"):
        client.embed_images([jpeg_with_scans(MAX_JPEG_SCANS)])


def _outcome(client: EmbeddingClient, images: list[bytes]) -> tuple[str, np.ndarray | str]:
    try:
        return "ok", client.embed_images(images)
    except InvalidInputError as exc:
        return "invalid", str(exc)
    except Exception as exc:  # anything else is a failure the test reports
        return "error", f"{type(exc).__name__}: {exc}"


def test_a_storm_of_hostile_files_fails_no_good_request(triton_server, served_model):
    good = [encode_jpeg(render_person(identity, camera=identity % 3)) for identity in range(12)]
    expected = torchreid_embeddings(served_model, good)
    rng = np.random.default_rng(1)
    named = {"IM": crafted_im(), "TIFF": crafted_tiff(), "DDS": crafted_dds(), "JPEG 2000": other_formats()["JPEG 2000"]}
    broken = [mutated(good[index % len(good)], rng, flips=6) for index in range(48)]
    stop = threading.Event()
    good_results: list[tuple[str, str]] = []
    hostile_results: Counter = Counter()

    def good_client(slot: int) -> None:
        with EmbeddingClient(triton_server.grpc_url) as client:
            for step in range(10_000):
                if stop.is_set():
                    return
                picks = [(slot + step + offset) % len(good) for offset in range(1 + step % 3)]
                status, answer = _outcome(client, [good[index] for index in picks])
                if status != "ok":
                    good_results.append(("failed", str(answer)[:200]))
                elif np.sum(answer * expected[picks], axis=1).min() < 0.9999:
                    good_results.append(("wrong", str(picks)))
                else:
                    good_results.append(("ok", ""))

    def hostile_client() -> None:
        with EmbeddingClient(triton_server.grpc_url) as client:
            for step in range(10_000):
                if stop.is_set():
                    return
                if step % 2 == 0:
                    name = list(named)[step // 2 % len(named)]
                    status, answer = _outcome(client, [good[0], named[name]])  # a good item does not save it
                    hostile_results["named" if status == "invalid" and f"IMAGE[1] is a {name} file" in answer else f"{name}: {answer}"] += 1
                else:
                    status, answer = _outcome(client, [broken[step // 2 % len(broken)]])
                    hostile_results["broken " + status if status != "error" else f"broken: {answer}"] += 1

    threads = [threading.Thread(target=good_client, args=(slot,)) for slot in range(6)] + [threading.Thread(target=hostile_client)]
    for thread in threads:
        thread.start()
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    outcomes = Counter(kind for kind, _ in good_results)
    assert outcomes["ok"] >= 100 and outcomes["ok"] == len(good_results), [r for r in good_results if r[0] != "ok"][:5]
    assert set(hostile_results) <= {"named", "broken ok", "broken invalid"}, hostile_results
    assert hostile_results["named"] >= 20 and hostile_results["broken invalid"] >= 5, hostile_results


def _server_processes(server: TritonServerProcess) -> dict[str, list[str]]:
    """pid -> command line of the server and its python-backend stubs (they share its process group)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == server.pid:
                found[entry.name] = Path(f"/proc/{entry.name}/cmdline").read_text().split("\0")
        except OSError:
            continue
    return found


def _private_bytes(pid: str) -> int:
    """Memory a process holds alone (its heap, not the shared-memory regions it maps)."""
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) * 1024 for line in lines if line.startswith(("Private_Clean:", "Private_Dirty:")))


@pytest.fixture(scope="module")
def own_server(served_repository):
    """A server of its own: the shared one's memory depends on what other tests sent it."""
    with TritonServerProcess(TritonServerConfig(model_repository=served_repository)) as server:
        yield server


def test_the_preprocessor_gives_memory_back_after_the_largest_request_it_takes(own_server):
    rng = np.random.default_rng(0)
    side = int((DEFAULT_BUDGETS.max_request_pixels / 64) ** 0.5)

    def item() -> bytes:
        jpeg = encode(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), "JPEG", quality=75)
        return jpeg + b"\x00" * (DEFAULT_BUDGETS.max_image_bytes - len(jpeg))

    maximal = [item() for _ in range(64)]  # 64 x 1 MiB, 6 MP: every budget at its limit
    stub = next(pid for pid, command in _server_processes(own_server).items() if any("/preprocess/1/" in part for part in command))
    region = Path("/dev/shm") / _server_processes(own_server)[stub][2]  # the stub's argv names its shared-memory region
    with EmbeddingClient(own_server.grpc_url) as client:
        for _ in range(3):  # full batches of crops: every arena at its working size
            client.embed_images(person_jpegs(64))
        time.sleep(0.5)
        before = _private_bytes(stub)
        for _ in range(3):
            assert client.embed_images(maximal).shape == (64, 512)
        deadline = time.monotonic() + 5
        while _private_bytes(stub) > before + (16 << 20) and time.monotonic() < deadline:
            time.sleep(0.1)
        after = _private_bytes(stub)
        assert client.embed_images(person_jpegs(2)).shape == (2, 512)
    # 3 x 64 MiB of bytes and 6 MP of decoded pixels went through; the preprocessor keeps less than 16 MiB of it.
    assert after <= before + (16 << 20), (before >> 20, after >> 20)
    # Triton's python backend copies each batch into the stub's region, which grows to fit and never shrinks:
    # the budgets bound what a legal batch can make of it.
    assert region.stat().st_size <= 1.25 * 64 * DEFAULT_BUDGETS.max_image_bytes, region.stat().st_size >> 20
