"""Served against in-process, side by side in one run: the JPEG ensemble against the same decode and
model in one process, and the uint8 tensor path against the model alone.

For each variant: every CPU runtime in-process as `osnet-build --runtime auto` measures it, and PyTorch
eager; then, with ONNX Runtime FP32 and with the runtime auto picks:
- in-process: the model alone at batch 32; decode + model at batch 8 and at batch 32, decoded by the
  served preprocessor's own code (osnet_base/image_decoding.py) on as many threads as it gets;
- served by a real tritonserver, the repository written as `osnet-build` writes it: the `osnet`
  ensemble from JPEG bytes as 8 clients x 1 image (dynamic batching does the batching) and 1 client
  x 32 images; the tensor model from uint8 pixels, 1 and 8 clients x 32 images, over gRPC and with
  the pixels in Triton system shared memory (a client on the server's host).
Each served row is measured side by side with its in-process twin and its floor, in alternating
rounds: the ensemble at 8 x 1 with decode + model at batch 8, at 1 x 32 with batch 32; the tensor
model with the model alone at batch 32. The floor is the same served path on a second server whose
`preprocess` and tensor model do nothing (benchmarks/do_nothing_model.py): what the serving path
costs by itself; the row can reach at most its twin's time over (that time + the floor's). Then the
budgets: how long the preprocessor takes over the most expensive request it accepts.

Frames and boxes (`--frames-only` runs these rows alone): a generated 1280x720 camera frame with 8 or
32 people, through `osnet_frames` (one request per frame: the frame's JPEG and its boxes), against the
same boxes cut by the client and sent as JPEG crops through the `osnet` ensemble (one request per
frame with its K crops); 8 clients (`EmbeddingClient`, both paths alike), each with a frame of its
own, over ONNX Runtime FP32. Each path once with its JPEGs encoded beforehand (a camera that
delivers JPEG; crops cut and encoded elsewhere) and once encoded by the client in every request (a
tracker holding decoded frames). Rows: bytes sent per frame, embeddings/s.

Clients send prepared requests over raw gRPC stubs (serialised once; a shared-memory client copies
its pixels into its region for every call, as a real one must), so the load generator, which shares
the cores with the server, takes as little of them as it can; its cores are in the table. Requests
cycle through distinct generated crops. Every row is the best of `--rounds` rounds, and a row that
other people's processes disturbed (> 0.1 core) is measured again once the machine is quiet. Beside
each row: the cosine of its embeddings against PyTorch FP32 on the same pixels.

    python -m benchmarks.cpu_serving [--variants osnet_x0_25 osnet_x1_0] [--seconds 6] [--rounds 3] [--frames-only]
"""
from __future__ import annotations

import argparse
import ctypes
import io
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from osnet_base.contract import FEATURE_DIM

BATCH, CONCURRENCY = 32, 8
EMBEDDING_ROW_BYTES = 4 * FEATURE_DIM
BASELINE_RUNTIME = "onnxruntime-fp32"
BOXES_PER_FRAME = (8, 32)
FRAME_WIDTH, FRAME_HEIGHT, FRAME_JPEG_QUALITY = 1280, 720, 90
# The served paths: each row of the real server and its floor on the do-nothing one are named by these.
JPEG_PATH, TENSOR_GRPC_PATH, TENSOR_SHARED_PATH = "ensemble, JPEG over gRPC", "tensor, gRPC", "tensor, shared memory"
TARGETS = {JPEG_PATH: 0.8, TENSOR_GRPC_PATH: 0.9, TENSOR_SHARED_PATH: 0.95}
# Above this many cores busy with other people's work, a row is not a measurement of ours.
QUIET_CORES = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CORES = len(os.sched_getaffinity(0))  # what the servers and the load generator share
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Floor:
    """A served path with models that do nothing, measured in the same rounds as the row it bounds."""
    requests_per_s: float
    server_cpu_ms: float  # tritonserver and its stubs, per request
    client_cpu_ms: float  # the load generator, per request


@dataclass(frozen=True, kw_only=True)
class Row:
    variant: str
    runtime: str
    path: str
    batch: int  # images per request
    clients: int
    images_per_s: float
    in_process: str | None  # served rows: the in-process work measured alongside ...
    in_process_images_per_s: float | None  # ... and its img/s
    min_cosine: float | None
    client_cores: float | None  # served rows: what the load generator (this process) used
    foreign_cores: float
    floor: Floor | None = None  # served rows: the same path with models that do nothing, measured alongside


def _system_busy_s() -> float:
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def _group_cpu_s(groups: set[int]) -> float:
    """CPU seconds used so far by the live processes of these process groups."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) in groups:  # after the command: state, ppid, pgrp, ..., utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


class ForeignLoad:
    """CPU that processes other than ours (this benchmark's process group, and the servers' groups
    added to `groups`) use. Other people's jobs share this machine."""

    def __init__(self, quiet_timeout_s: float) -> None:
        self.groups = {os.getpgrp()}
        self.quiet_timeout_s = quiet_timeout_s

    def sample(self) -> tuple[float, float, float]:
        return time.perf_counter(), _system_busy_s(), _group_cpu_s(self.groups)

    def cores_since(self, start: tuple[float, float, float]) -> float:
        """Mean number of cores others kept busy since `start`."""
        now = self.sample()
        return max(0.0, (now[1] - start[1]) - (now[2] - start[2])) / (now[0] - start[0])

    def wait_until_quiet(self, seconds: float = 2.0) -> None:
        timeout_s = self.quiet_timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            start = self.sample()
            time.sleep(seconds)
            if self.cores_since(start) < QUIET_CORES:
                return
        if timeout_s > 0:
            print(f"  (the machine stayed busy for {timeout_s:.0f} s: measuring anyway)", flush=True)

    def measured_quietly(self, run: Callable[[], T], attempts: int = 3) -> tuple[T, float]:
        """(result, cores others used meanwhile) of `run`, redone (up to `attempts` times) while others disturb it."""
        attempts = attempts if self.quiet_timeout_s > 0 else 1
        for attempt in range(1, attempts + 1):
            self.wait_until_quiet()
            start = self.sample()
            result = run()
            foreign = self.cores_since(start)
            if foreign < QUIET_CORES or attempt == attempts:
                return result, foreign
            print(f"  (others used {foreign:.2f} cores meanwhile: measuring again)", flush=True)


def _one_round(calls: Sequence[Callable[[], int]], seconds: float) -> tuple[float, float]:
    """Images per second of `calls` run for `seconds`, one thread each (each returns how many images it
    did), and the cores this process used meanwhile."""
    done = [0] * len(calls)
    deadline = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        while time.perf_counter() < deadline:
            done[slot] += calls[slot]()

    started, cpu_started = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return sum(done) / elapsed, (time.process_time() - cpu_started) / elapsed


def measure(calls: Sequence[Callable[[], int]], seconds: float, rounds: int) -> tuple[float, float]:
    """(images per second, cores this process used) of `calls`: the best of `rounds` rounds of `seconds / rounds`."""
    for call in calls:
        call()  # warm-up: first-call allocations, graph specialisation, connections
    return max((_one_round(calls, seconds / rounds) for _ in range(rounds)), key=lambda result: result[0])


def measure_side_by_side(in_process: Callable[[], int], served: Sequence[Callable[[], int]],
                         floor_round: Callable[[float], Floor], seconds: float,
                         rounds: int) -> tuple[tuple[float, float], tuple[float, float], Floor]:
    """The in-process work, its served twin and the twin's floor in alternating rounds, the best round
    of each: the ratio and the bound are taken side by side, whatever the machine's speed does over the run."""
    for call in (in_process, *served):
        call()
    best_in, best_served, floors = (0.0, 0.0), (0.0, 0.0), []
    for _ in range(rounds):
        best_in = max(best_in, _one_round([in_process], seconds / rounds), key=lambda result: result[0])
        best_served = max(best_served, _one_round(served, seconds / rounds), key=lambda result: result[0])
        floors.append(floor_round(seconds / rounds))
    return best_in, best_served, max(floors, key=lambda floor: floor.requests_per_s)


def min_cosine(embeddings: np.ndarray, reference: np.ndarray) -> float:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return float(np.sum(unit * reference, axis=1).min())


def cycling(items: Sequence[T]) -> Callable[[], T]:
    """The next of `items` at each call, from a random start: clients do not march in step."""
    state = {"next": int(np.random.default_rng().integers(len(items)))}

    def next_item() -> T:
        item = items[state["next"] % len(items)]
        state["next"] += 1
        return item

    return next_item


class PreparedCalls:
    """ModelInfer requests serialised once and sent over a raw gRPC stub, one channel per client:
    what the server does is measured, not tritonclient's request building."""

    def __init__(self, url: str):
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self._pb = service_pb2
        self._channels = []
        self._grpc, self._grpc_stub, self._url = grpc, service_pb2_grpc.GRPCInferenceServiceStub, url

    def stub(self):
        options = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
        channel = self._grpc.insecure_channel(self._url, options=options)
        self._channels.append(channel)
        return self._grpc_stub(channel)

    def request(self, model: str, name: str, datatype: str, array: np.ndarray, output: str, shared_region: str | None = None):
        from osnet_base.contract import IMAGE_NAME

        request = self._pb.ModelInferRequest(model_name=model)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if shared_region is not None:
            tensor.parameters["shared_memory_region"].string_param = shared_region
            tensor.parameters["shared_memory_byte_size"].int64_param = array.nbytes
        elif name == IMAGE_NAME:
            from tritonclient.utils import serialize_byte_tensor

            request.raw_input_contents.append(serialize_byte_tensor(array).item())
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        request.outputs.add(name=output)
        return request

    def cycling_clients(self, requests: list, clients: int) -> list[Callable[[], int]]:
        """`clients` callers, each on its own channel, each sending the next of `requests` at every call
        and returning how many embeddings came back."""
        made = []
        for _ in range(clients):
            stub, next_request = self.stub(), cycling(requests)
            made.append(lambda stub=stub, next_request=next_request: embedding_count(stub.ModelInfer(next_request())))
        return made

    def jpeg_clients(self, jpegs: Sequence[bytes], size: int, clients: int) -> list[Callable[[], int]]:
        """Clients of the `osnet` ensemble, `size` JPEGs a request."""
        from osnet_base.contract import EMBEDDING_NAME, ENSEMBLE_MODEL, IMAGE_NAME

        encoded = [np.array([[jpeg] for jpeg in jpegs[start : start + size]], dtype=np.object_) for start in range(0, len(jpegs), size)]
        return self.cycling_clients([self.request(ENSEMBLE_MODEL, IMAGE_NAME, "BYTES", items, EMBEDDING_NAME) for items in encoded], clients)

    def tensor_clients(self, model: str, pixels: np.ndarray, batches: Sequence[slice], clients: int) -> list[Callable[[], int]]:
        """Clients of the tensor model, the pixels of one of `batches` in each request."""
        from osnet_base.contract import EMBEDDING_NAME, INPUT_DATATYPE, INPUT_NAME

        return self.cycling_clients([self.request(model, INPUT_NAME, INPUT_DATATYPE, pixels[part], EMBEDDING_NAME) for part in batches],
                                    clients)

    def shared_memory_clients(self, regions: SharedRegions, model: str, pixels: np.ndarray, batches: Sequence[slice],
                              clients: int) -> list[Callable[[], int]]:
        """The same with the pixels in a region of each client's own, written before every request."""
        from osnet_base.contract import EMBEDDING_NAME, INPUT_DATATYPE, INPUT_NAME

        made = []
        for _ in range(clients):
            name, handle = regions.create(pixels[batches[0]].nbytes)
            request = self.request(model, INPUT_NAME, INPUT_DATATYPE, pixels[batches[0]], EMBEDDING_NAME, shared_region=name)
            stub, next_part = self.stub(), cycling(batches)

            def call(stub=stub, handle=handle, request=request, next_part=next_part) -> int:
                regions.write(handle, pixels[next_part()])  # a real client's pixels are new every time
                return embedding_count(stub.ModelInfer(request))

            made.append(call)
        return made

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


def embedding_count(response) -> int:
    """Embeddings in a ModelInferResponse whose first output is EMBEDDING (FP32 rows of FEATURE_DIM)."""
    return len(response.raw_output_contents[0]) // EMBEDDING_ROW_BYTES


class SharedRegions:
    """One Triton system shared-memory region per client, registered once; removed on close."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as system_shm

        from osnet_base.api_key import grpc_headers, load_api_key

        self._shm, self._client, self._regions = system_shm, grpcclient.InferenceServerClient(url), []
        self._headers = grpc_headers(load_api_key())  # the shared-memory API is restricted

    def create(self, byte_size: int) -> tuple[str, np.ndarray]:
        name = f"osnet_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        handle = self._shm.create_shared_memory_region(name, f"/{name}", byte_size)
        self._client.register_system_shared_memory(name, f"/{name}", byte_size, headers=self._headers)
        self._regions.append((name, handle))
        return name, handle

    def write(self, handle, array: np.ndarray) -> None:
        self._shm.set_shared_memory_region(handle, [array])

    def close(self) -> None:
        for name, handle in self._regions:
            try:
                self._client.unregister_system_shared_memory(name, headers=self._headers)
            finally:
                self._shm.destroy_shared_memory_region(handle)
        self._client.close()


class InProcessPipeline:
    """Decode + model in one process: the preprocessor's own opening and decoding, on as many threads, then `embed`."""

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], budgets, threads: int):
        from osnet_base.image_decoding import ParallelDecoder

        self.embed, self.budgets, self.decoder = embed, budgets, ParallelDecoder(threads)

    def __call__(self, encoded: Sequence[bytes]) -> np.ndarray:
        from osnet_base.image_decoding import open_request

        images = open_request(encoded, self.budgets)
        return self.embed(np.stack(self.decoder.decode([(image, index) for index, image in enumerate(images)])))

    def close(self) -> None:
        self.decoder.close()


def benchmark_variant(variant: str, seconds: float, rounds: int, workdir: Path, settings, load: ForeignLoad,
                      do_nothing: DoNothingServer) -> tuple[list[Row], str]:
    import torch

    from engine_builder.build import make_cpu_graphs, pytorch_embeddings
    from engine_builder.cpu_runtimes import (
        RUNTIMES,
        RuntimeSelection,
        available_runtimes,
        choose_runtime,
        cpu_capabilities,
        measure_candidates,
        open_embedder,
        openvino_installed,
    )
    from engine_builder.image_sets import EVALUATION_SEED, image_set, preprocess_all
    from engine_builder.models import create_osnet
    from engine_builder.preprocessing import normalize_pixels
    from engine_builder.reference_weights import default_weights
    from engine_builder.synthetic_people import person_jpegs
    from engine_builder.triton_repository import write_cpu_models
    from osnet_base.triton_server import TritonServerConfig, TritonServerProcess

    rows: list[Row] = []

    def record(runtime: str, path: str, batch: int, clients: int, measured: tuple[tuple[float, float], float],
               cosine: float | None, in_process: tuple[str, float] | None = None, floor: Floor | None = None) -> None:
        (rate, cores), foreign = measured
        served = in_process is not None
        rows.append(Row(variant=variant, runtime=runtime, path=path, batch=batch, clients=clients, images_per_s=rate,
                        in_process=in_process[0] if served else None, in_process_images_per_s=in_process[1] if served else None,
                        min_cosine=cosine, client_cores=cores if served else None, foreign_cores=foreign, floor=floor))
        extra = f"  load generator {cores:.2f} cores; in-process {in_process[0]}: {in_process[1]:.1f} img/s" if served else ""
        print(f"  {variant:<12} {runtime:<17} {path:<30} {batch:>2} x {clients}: {rate:8.1f} img/s  min cosine "
              f"{cosine if cosine is not None else float('nan'):.6f}{extra}  (others: {foreign:.2f} cores)", flush=True)

    selection = RuntimeSelection(runtime="auto")
    weights = default_weights(variant)  # what `osnet-build` serves without --weights
    print(f"  {variant}: {weights or 'seeded random weights'}", flush=True)
    model = create_osnet(variant, weights)
    evaluation = image_set(None, selection.evaluation_images, EVALUATION_SEED)
    candidates = available_runtimes(cpu_capabilities(), openvino_installed())
    graph_dir = workdir / variant / "graphs"
    graph_dir.mkdir(parents=True)
    graphs = make_cpu_graphs(model, {runtime.graph for runtime in candidates}, graph_dir, selection)
    # What `--runtime auto` measures at build time.
    measurements, candidates_foreign = load.measured_quietly(lambda: measure_candidates(
        candidates, graphs, evaluation, pytorch_embeddings(model, evaluation), floor=selection.floor,
        threads=settings.threads_per_instance(), streams=settings.streams, instances=settings.instances,
        batch_size=BATCH, seconds_per_candidate=seconds, rounds=rounds))
    chosen, reason = choose_runtime(measurements, selection.floor)
    print(f"  auto picks {chosen}: {reason}", flush=True)
    for measured in measurements:
        rows.append(Row(variant=variant, runtime=measured.runtime, path="in-process: model, as auto measures", batch=BATCH,
                        clients=1, images_per_s=measured.images_per_s or 0.0, in_process=None, in_process_images_per_s=None,
                        min_cosine=measured.min_cosine, client_cores=None, foreign_cores=candidates_foreign))
    tensor = normalize_pixels(np.resize(evaluation, (BATCH, *evaluation.shape[1:])))

    def torch_batch() -> int:
        with torch.inference_mode():
            model(tensor)
        return BATCH

    record("pytorch-fp32", "in-process: model, PyTorch eager", BATCH, 1,
           load.measured_quietly(lambda: measure([torch_batch], seconds, rounds)), 1.0)

    jpegs = person_jpegs(BATCH * 8, cameras=3, seed=21)
    pixels = preprocess_all(jpegs)
    reference = pytorch_embeddings(model, pixels)
    batches = [slice(start, start + BATCH) for start in range(0, len(jpegs), BATCH)]
    _, decode_threads = settings.preprocess_layout()
    budgets = settings.decode_budgets()
    for runtime_name in dict.fromkeys([BASELINE_RUNTIME, chosen]):
        runtime = RUNTIMES[runtime_name]
        parameters = runtime.config_parameters(settings.threads_per_instance(), settings.streams)
        embed, _ = open_embedder(runtime, graphs[runtime.graph], parameters, settings.instances)
        pipeline = InProcessPipeline(embed, budgets, decode_threads)
        next_batch = cycling(batches)
        groups = {size: cycling([jpegs[start : start + size] for start in range(0, len(jpegs), size)]) for size in (CONCURRENCY, BATCH)}
        in_process = {  # the in-process twin of each served row, and its cosine
            "model": (lambda: len(embed(pixels[next_batch()])), min_cosine(np.concatenate([embed(pixels[part]) for part in batches]), reference)),
            "decode": {size: lambda size=size: len(pipeline(groups[size]())) for size in groups},
        }
        repository = workdir / variant / runtime_name
        tensor_model = write_cpu_models(repository, variant, settings, runtime)
        shutil.copyfile(graphs[runtime.graph], repository / tensor_model / "1" / "model.onnx")
        with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
            load.groups.add(server.pid)  # the server leads its own process group, its python stubs included
            calls, regions = PreparedCalls(server.grpc_url), SharedRegions(server.grpc_url)
            try:
                served_rows(server.grpc_url, runtime_name, tensor_model, jpegs, pixels, reference, batches, calls, regions,
                            record, load, seconds, rounds, in_process, do_nothing)
            finally:
                calls.close()
                regions.close()
                load.groups.discard(server.pid)
        pipeline.close()
    return rows, f"{chosen}: {reason}"


def served_rows(url, runtime_name, tensor_model, jpegs, pixels, reference, batches, calls, regions, record, load, seconds,
                rounds, in_process, do_nothing: DoNothingServer) -> None:
    from client.embedding_client import EmbeddingClient

    with EmbeddingClient(url) as client:
        ensemble_cosine = min_cosine(np.concatenate([client.embed_images(jpegs[part]) for part in batches]), reference)
        tensor_cosine = min_cosine(np.concatenate([client.embed_tensors(pixels[part], tensor_model) for part in batches]), reference)
    with EmbeddingClient(url, shared_memory=True) as client:
        shared_cosine = min_cosine(np.concatenate([client.embed_tensors(pixels[part], tensor_model) for part in batches]), reference)

    def side_by_side(twin: Callable[[], int], made: list[Callable[[], int]], path: str, batch: int, clients: int):
        (twin_rate, _), served, path_floor = measure_side_by_side(twin, made, do_nothing.round_of(path, batch, clients), seconds, rounds)
        return twin_rate, served, path_floor

    for size, clients in ((1, CONCURRENCY), (BATCH, 1)):
        made = calls.jpeg_clients(jpegs, size, clients)
        (twin_rate, served, path_floor), foreign = load.measured_quietly(
            lambda: side_by_side(in_process["decode"][size * clients], made, JPEG_PATH, size, clients))
        record(runtime_name, JPEG_PATH, size, clients, (served, foreign), ensemble_cosine,
               in_process=(f"decode + model, batch {size * clients}", twin_rate), floor=path_floor)
    model_twin, model_cosine = in_process["model"]
    for clients in (1, CONCURRENCY):
        for path, made, cosine in ((TENSOR_GRPC_PATH, calls.tensor_clients(tensor_model, pixels, batches, clients), tensor_cosine),
                                   (TENSOR_SHARED_PATH, calls.shared_memory_clients(regions, tensor_model, pixels, batches, clients),
                                    shared_cosine)):
            (twin_rate, served, path_floor), foreign = load.measured_quietly(lambda: side_by_side(model_twin, made, path, BATCH, clients))
            record(runtime_name, path, BATCH, clients, (served, foreign), cosine, in_process=(f"model, batch {BATCH}", twin_rate),
                   floor=path_floor)
    print(f"  ({runtime_name} in-process model: min cosine {model_cosine:.6f})", flush=True)


@dataclass(frozen=True, kw_only=True)
class FrameRow:
    variant: str
    boxes: int
    path: str
    bytes_per_frame: int
    embeddings_per_s: float
    client_cores: float
    foreign_cores: float


def benchmark_frames(variant: str, seconds: float, rounds: int, workdir: Path, settings, load: ForeignLoad) -> list[FrameRow]:
    from PIL import Image

    from client.embedding_client import EmbeddingClient
    from engine_builder.build import make_cpu_graphs
    from engine_builder.cpu_runtimes import RUNTIMES, RuntimeSelection
    from engine_builder.models import create_osnet
    from engine_builder.reference_weights import default_weights
    from engine_builder.synthetic_people import compose_frame, render_person
    from engine_builder.triton_repository import write_cpu_models
    from osnet_base.frame_boxes import pixel_boxes
    from osnet_base.triton_server import TritonServerConfig, TritonServerProcess

    def jpeg(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=FRAME_JPEG_QUALITY)
        return buffer.getvalue()

    runtime = RUNTIMES[BASELINE_RUNTIME]
    repository = workdir / variant / "frames"
    graphs = make_cpu_graphs(create_osnet(variant, default_weights(variant)), {runtime.graph}, workdir / variant, RuntimeSelection())
    tensor_model = write_cpu_models(repository, variant, settings, runtime)
    shutil.copyfile(graphs[runtime.graph], repository / tensor_model / "1" / "model.onnx")
    rows: list[FrameRow] = []
    with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
        load.groups.add(server.pid)
        clients = [EmbeddingClient(server.grpc_url) for _ in range(CONCURRENCY)]
        try:
            for count in BOXES_PER_FRAME:
                # A frame of other people for each client: no cache anywhere sees the same pixels twice in a row.
                frames = []
                for slot in range(CONCURRENCY):
                    people = [render_person(1000 * slot + index, camera=slot % 3) for index in range(count)]
                    image, boxes = compose_frame(people, FRAME_WIDTH, FRAME_HEIGHT, camera=slot % 3, seed=slot)
                    pixels = np.asarray(image)
                    cut = [pixels[y1:y2, x1:x2] for x1, y1, x2, y2 in pixel_boxes(boxes, FRAME_WIDTH, FRAME_HEIGHT, count).tolist()]
                    frames.append((pixels, boxes, cut, jpeg(pixels), [jpeg(crop) for crop in cut]))
                plan = [
                    ("osnet_frames, frame JPEG encoded beforehand", lambda f: len(f[3]) + f[1].nbytes,
                     lambda client, f: len(client.embed_frames([(f[3], f[1])])[0])),
                    ("osnet_frames, client encodes the frame", lambda f: len(f[3]) + f[1].nbytes,
                     lambda client, f: len(client.embed_frames([(jpeg(f[0]), f[1])])[0])),
                    ("osnet, JPEG crops encoded beforehand", lambda f: sum(map(len, f[4])),
                     lambda client, f: len(client.embed_images(f[4]))),
                    ("osnet, client cuts and encodes crops", lambda f: sum(map(len, f[4])),
                     lambda client, f: len(client.embed_images([jpeg(crop) for crop in f[2]]))),
                ]
                for path, sent, send in plan:
                    calls = [lambda client=client, frame=frame: send(client, frame) for client, frame in zip(clients, frames)]
                    (rate, cores), foreign = load.measured_quietly(lambda: measure(calls, seconds, rounds))
                    row = FrameRow(variant=variant, boxes=count, path=path, bytes_per_frame=int(np.mean([sent(f) for f in frames])),
                                   embeddings_per_s=rate, client_cores=cores, foreign_cores=foreign)
                    rows.append(row)
                    print(f"  {variant:<12} {count:>2} boxes  {path:<44} {row.bytes_per_frame:>8} B/frame {rate:8.1f} emb/s"
                          f"  load generator {cores:.2f} cores  (others: {foreign:.2f} cores)", flush=True)
        finally:
            for client in clients:
                client.close()
            load.groups.discard(server.pid)
    return rows


def print_frames_table(rows: list[FrameRow], seconds: float, rounds: int) -> None:
    print(f"\n| variant | boxes per frame | path | bytes sent per frame | embeddings/s | x osnet, JPEG crops encoded beforehand "
          "| load generator cores | others' cores |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        crops = next(c for c in rows if (c.variant, c.boxes, c.path) == (r.variant, r.boxes, "osnet, JPEG crops encoded beforehand"))
        print(f"| {r.variant} | {r.boxes} | {r.path} | {r.bytes_per_frame} | {r.embeddings_per_s:.1f} | "
              f"{r.embeddings_per_s / crops.embeddings_per_s:.2f} | {r.client_cores:.2f} | {r.foreign_cores:.2f} |")
    print(f"\n{os.cpu_count()} CPU cores, shared by the server and the load generator ({CONCURRENCY} clients, one frame per "
          f"request); {FRAME_WIDTH}x{FRAME_HEIGHT} frames, JPEG quality {FRAME_JPEG_QUALITY}; ONNX Runtime FP32. Each row: best "
          f"of {rounds} rounds of {seconds / rounds:.1f} s.")


class DoNothingServer:
    """The served paths with `preprocess` and the tensor model replaced by a model that does nothing
    (benchmarks/do_nothing_model.py), under the configs `osnet-build` writes: what serving costs by
    itself. It runs for the whole benchmark, idle while the real server is measured, so that each
    served row's floor is measured in the same alternating rounds as the row and its twin."""

    def __init__(self, workdir: Path, settings, load: ForeignLoad):
        from engine_builder.cpu_runtimes import RUNTIMES
        from engine_builder.synthetic_people import person_jpegs
        from engine_builder.triton_repository import write_cpu_models
        from osnet_base.contract import INPUT_SHAPE
        from osnet_base.triton_server import TritonServerConfig, TritonServerProcess

        repository = workdir / "do_nothing"
        self._tensor_model = write_cpu_models(repository, "osnet_x0_25", settings, RUNTIMES[BASELINE_RUNTIME])
        for step in ("preprocess", self._tensor_model):
            shutil.copyfile(Path(__file__).with_name("do_nothing_model.py"), repository / step / "1" / "model.py")
        self._jpegs = person_jpegs(BATCH * 2, cameras=3, seed=21)
        self._pixels = np.random.default_rng(0).integers(0, 256, (BATCH, *INPUT_SHAPE), dtype=np.uint8)
        self._server = TritonServerProcess(TritonServerConfig(model_repository=repository))
        self._load, self._clients, self._stack = load, {}, ExitStack()

    def __enter__(self) -> DoNothingServer:
        with ExitStack() as stack:
            server = stack.enter_context(self._server)
            self._load.groups.add(server.pid)
            stack.callback(self._load.groups.discard, server.pid)
            self._calls = PreparedCalls(server.grpc_url)
            stack.callback(self._calls.close)
            self._regions = SharedRegions(server.grpc_url)
            stack.callback(self._regions.close)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    def _made(self, path: str, batch: int, clients: int) -> list[Callable[[], int]]:
        whole = [slice(0, BATCH)]
        makers = {
            JPEG_PATH: lambda: self._calls.jpeg_clients(self._jpegs, batch, clients),
            TENSOR_GRPC_PATH: lambda: self._calls.tensor_clients(self._tensor_model, self._pixels, whole, clients),
            TENSOR_SHARED_PATH: lambda: self._calls.shared_memory_clients(self._regions, self._tensor_model, self._pixels, whole, clients),
        }
        return makers[path]()  # a path with no floor is a KeyError, not another path's floor

    def round_of(self, path: str, batch: int, clients: int) -> Callable[[float], Floor]:
        """One round of `path` at `batch` images x `clients`, for `seconds`: its requests/s and CPU per request."""
        key = (path, batch, clients)
        if key not in self._clients:
            self._clients[key] = self._made(path, batch, clients)
            for call in self._clients[key]:
                call()  # warm-up
        made = self._clients[key]

        def one_round(seconds: float) -> Floor:
            server_started, started = _group_cpu_s({self._server.pid}), time.perf_counter()
            images_per_s, client_cores = _one_round(made, seconds)
            requests_per_s = images_per_s / batch
            requests = requests_per_s * (time.perf_counter() - started)
            return Floor(requests_per_s=requests_per_s, client_cpu_ms=client_cores / requests_per_s * 1e3,
                         server_cpu_ms=(_group_cpu_s({self._server.pid}) - server_started) / requests * 1e3)

        return one_round


def print_floor_table(rows: list[Row]) -> None:
    """Each served path's floor, as it ranged over the rows it was measured beside."""
    floors: dict[tuple[str, int, int], list[Floor]] = {}
    for row in rows:
        if row.floor is not None:
            floors.setdefault((row.path, row.batch, row.clients), []).append(row.floor)
    print("\nThe serving path with models that do nothing (`preprocess` and the tensor model replaced by "
          "benchmarks/do_nothing_model.py, the configs as `osnet-build` writes them), measured beside each served row; "
          "lowest to highest over those rows:\n")
    print("| path | images/request x clients | rows | requests/s | ms per request | server CPU ms per request | "
          "load generator CPU ms per request |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def spread(values: list[float], digits: int) -> str:
        return f"{min(values):.{digits}f}-{max(values):.{digits}f}"

    for (path, batch, clients), measured in floors.items():
        print(f"| {path} | {batch} x {clients} | {len(measured)} | {spread([floor.requests_per_s for floor in measured], 0)} | "
              f"{spread([clients / floor.requests_per_s * 1e3 for floor in measured], 2)} | "
              f"{spread([floor.server_cpu_ms for floor in measured], 3)} | {spread([floor.client_cpu_ms for floor in measured], 3)} |")


def serving_bound(row: Row) -> float:
    """The highest ratio `row` could reach if serving cost no more than with models that do nothing:
    one client waits for the floor's time per request on top of its twin's; several keep every core
    busy and pay the floor's CPU per request (server and load generator) on top of the twin's."""
    twin_ms = row.batch / row.in_process_images_per_s * 1e3
    if row.clients == 1:
        return twin_ms / (twin_ms + 1e3 / row.floor.requests_per_s)
    twin_cpu_ms = twin_ms * CORES
    return twin_cpu_ms / (twin_cpu_ms + row.floor.server_cpu_ms + row.floor.client_cpu_ms)


def print_table(rows: list[Row], choices: dict[str, str], settings, seconds: float, rounds: int) -> None:
    from osnet_base.triton_server import KEEP_LARGE_BUFFERS

    print("\n| variant | runtime | path | images/request x clients | img/s | in-process, measured alongside | in-process img/s "
          "| ratio | target | bound with do-nothing models | min cosine | load generator cores | others' cores |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        bound = f"{serving_bound(row):.2f}" if row.floor is not None else "-"
        target = TARGETS.get(row.path)
        paired = row.in_process_images_per_s is not None
        ratio = row.images_per_s / row.in_process_images_per_s if paired else None
        verdict = "-" if not paired else f">= {target} ({'met' if ratio >= target else '**missed**'})"
        print(f"| {row.variant.removeprefix('osnet_')} | {row.runtime} | {row.path} | {row.batch} x {row.clients} | "
              f"{row.images_per_s:.1f} | {row.in_process or '-'} | {f'{row.in_process_images_per_s:.1f}' if paired else '-'} | "
              f"{f'{ratio:.3f}' if paired else '-'} | {verdict} | {bound} | "
              f"{'-' if row.min_cosine is None else f'{row.min_cosine:.6f}'} | "
              f"{'-' if row.client_cores is None else f'{row.client_cores:.2f}'} | {row.foreign_cores:.2f} |")
    print()
    for variant, choice in choices.items():
        print(f"- {variant}: auto picks {choice}.")
    instances, threads = settings.preprocess_layout()
    print(f"\n{CORES} CPU cores; the servers and the load generator share them. Each row: best of {rounds} rounds of "
          f"{seconds / rounds:.1f} s. preprocess: {instances} instance(s) x {threads} decode thread(s); tensor model: "
          f"{settings.instances} instance(s), threads {settings.threads_per_instance() or 'runtime default'}; dynamic batching "
          f"with a {settings.max_queue_delay_us} us queue delay; glibc keeps large buffers ({KEEP_LARGE_BUFFERS}) in the "
          "load generator and the servers.")


def budget_rows(settings) -> None:
    """How long the preprocessor takes over the most expensive requests its budgets let in, decoded by
    its own code on its own threads, in-process: the budgets' promise of about 100 ms."""
    from PIL import Image

    from osnet_base.image_decoding import MAX_JPEG_SCANS, ParallelDecoder, open_request

    budgets = settings.decode_budgets()
    _, threads = settings.preprocess_layout()
    rng = np.random.default_rng(0)
    width = 2000
    height = budgets.max_image_pixels // width
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)

    def largest_jpeg(progressive: bool) -> bytes:
        for quality in range(95, 0, -5):  # the most entropy that fits the byte budget
            buffer = io.BytesIO()
            Image.fromarray(noise).save(buffer, format="JPEG", quality=quality, progressive=progressive)
            if buffer.tell() <= budgets.max_image_bytes:
                return buffer.getvalue()
        raise RuntimeError("no JPEG of noise fits the byte budget")

    progressive = largest_jpeg(True)
    # The progressive file with its smallest scan repeated up to the scan limit (or as often as the byte budget allows).
    starts = [index for index in range(len(progressive) - 1) if progressive[index : index + 2] == b"\xff\xda"]
    smallest = min((progressive[start:end] for start, end in zip(starts, [*starts[1:], len(progressive) - 2])), key=len)
    repeats = min(MAX_JPEG_SCANS - len(starts), (budgets.max_image_bytes - len(progressive)) // len(smallest))
    many_scans = progressive[:-2] + smallest * max(0, repeats) + b"\xff\xd9"
    solid = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(solid, format="PNG")
    per_request = budgets.max_request_pixels // (width * height)
    cases = {
        f"JPEG of noise, baseline ({len(largest_jpeg(False)) >> 10} KiB)": largest_jpeg(False),
        f"JPEG of noise, progressive ({len(progressive) >> 10} KiB)": progressive,
        f"the same, {len(starts) + max(0, repeats)} scans ({len(many_scans) >> 10} KiB)": many_scans,
        "PNG, solid colour": solid.getvalue(),
    }
    decoder = ParallelDecoder(threads)
    print(f"\nThe most expensive requests the budgets let in ({per_request} x {width}x{height} = {per_request * width * height} "
          f"pixels; MAX_IMAGE_BYTES {budgets.max_image_bytes}), decoded by the preprocessor's code on its {threads} "
          "thread(s), in-process, best of 3:\n")
    print("| request | ms |\n|---|---:|")
    for name, data in cases.items():
        request = [data] * per_request
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            images = open_request(request, budgets)
            decoder.decode([(image, index) for index, image in enumerate(images)])
            best = min(best, time.perf_counter() - started)
        print(f"| {per_request} x {name} | {best * 1e3:.0f} |")
    decoder.close()


def keep_large_buffers() -> None:
    """What `KEEP_LARGE_BUFFERS` does for the servers, for the load generator (this process)."""
    from osnet_base.triton_server import MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        raise OSError("glibc refused mallopt")


def main() -> None:
    from engine_builder.triton_repository import CpuRepositorySettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["osnet_x0_25", "osnet_x1_0"])
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per row (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row; the best counts (default: %(default)s)")
    parser.add_argument("--quiet-timeout-s", type=float, default=300.0,
                        help="how long to wait, before each row, for other people's processes to let the cores go (default: %(default)s)")
    parser.add_argument("--frames-only", action="store_true", help="only the frames-and-boxes rows (osnet_frames against JPEG crops)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    keep_large_buffers()
    settings = CpuRepositorySettings()
    load = ForeignLoad(args.quiet_timeout_s)
    rows: list[Row] = []
    frame_rows: list[FrameRow] = []
    choices: dict[str, str] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="osnet_bench_") as workdir:
        if not args.frames_only:
            with DoNothingServer(Path(workdir), settings, load) as do_nothing:
                for variant in args.variants:
                    variant_rows, choices[variant] = benchmark_variant(variant, args.seconds, args.rounds, Path(workdir), settings,
                                                                       load, do_nothing)
                    rows += variant_rows
            print_floor_table(rows)
            print_table(rows, choices, settings, args.seconds, args.rounds)
        for variant in args.variants:
            frame_rows += benchmark_frames(variant, args.seconds, args.rounds, Path(workdir), settings, load)
        print_frames_table(frame_rows, args.seconds, args.rounds)
    if not args.frames_only:
        budget_rows(settings)
    print(f"\nRun time {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
