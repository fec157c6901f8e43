"""CPU throughput, side by side in one run: PyTorch eager, ONNX Runtime in-process, and Triton.

For each variant: in-process at batch 32; served through a real tritonserver (ONNX Runtime python
backend) as one client sending batch-32 tensor requests, as 8 concurrent clients sending one image
per request (dynamic batching does the batching), and through the `osnet` ensemble from JPEG bytes
the same two ways. The load generator shares the machine's cores with the server.

    python -m benchmarks.cpu_serving [--variants osnet_x1_0 osnet_x0_25] [--seconds 8]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Measurement:
    variant: str
    path: str
    batch: int
    concurrency: int
    images_per_s: float


def measure(run_batch: Callable[[], int], seconds: float, concurrency: int = 1) -> float:
    """Images per second of `run_batch` (returns how many images it did) called in `concurrency` threads."""
    run_batch()  # warm-up: first-call allocation and graph optimisation are not throughput
    done = [0] * concurrency
    deadline = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        while time.perf_counter() < deadline:
            done[slot] += run_batch()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def benchmark_variant(variant: str, seconds: float, workdir: Path) -> list[Measurement]:
    import onnxruntime as ort
    import torch

    from client.embedding_client import EmbeddingClient
    from client.triton_server import TritonServerConfig, TritonServerProcess
    from engine_builder.build import build_cpu_repository
    from engine_builder.models import create_osnet
    from engine_builder.synthetic_people import person_jpegs
    from engine_builder.triton_repository import tensor_model_name

    batch, concurrency = 32, 8
    images = np.random.default_rng(0).standard_normal((batch, 3, 256, 128), dtype=np.float32)
    jpegs = person_jpegs(batch * 4, cameras=3)
    results: list[Measurement] = []

    def record(path: str, per_request: int, clients: int, rate: float) -> None:
        results.append(Measurement(variant, path, per_request, clients, rate))
        print(f"  {variant:<12} {path:<34} batch {per_request:>2} x {clients} clients: {rate:8.1f} img/s", flush=True)

    model = create_osnet(variant)
    tensor = torch.from_numpy(images)

    def torch_batch() -> int:
        with torch.inference_mode():
            model(tensor)
        return batch

    record("PyTorch eager (in-process)", batch, 1, measure(torch_batch, seconds))

    repository = build_cpu_repository(variant, workdir / variant)
    session = ort.InferenceSession(
        str(repository / tensor_model_name(variant) / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    record("ONNX Runtime (in-process)", batch, 1, measure(lambda: len(session.run(["EMBEDDING"], {"INPUT": images})[0]), seconds))
    del session

    with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
        local = threading.local()

        def client() -> EmbeddingClient:
            if not hasattr(local, "client"):
                local.client = EmbeddingClient(server.grpc_url)
            return local.client

        tensor_model = tensor_model_name(variant)
        served = [
            ("Triton tensor model", batch, 1, lambda: len(client().embed_tensors(images, tensor_model))),
            ("Triton tensor model", 1, concurrency, lambda: len(client().embed_tensors(images[:1], tensor_model))),
            ("Triton ensemble (JPEG bytes)", batch, 1, lambda: len(client().embed_images(jpegs[:batch]))),
            ("Triton ensemble (JPEG bytes)", 1, concurrency, lambda: len(client().embed_images(jpegs[:1]))),
        ]
        for path, per_request, clients, run in served:
            record(path, per_request, clients, measure(run, seconds, clients))
    return results


def print_table(results: list[Measurement]) -> None:
    print(f"\n| variant | path | images/request | concurrent clients | img/s |\n|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r.variant} | {r.path} | {r.batch} | {r.concurrency} | {r.images_per_s:.1f} |")
    print(f"\n{os.cpu_count()} CPU cores; server and load generator share them.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["osnet_x1_0", "osnet_x0_25"])
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per row")
    args = parser.parse_args()
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="osnet_bench_") as workdir:
        for variant in args.variants:
            results += benchmark_variant(variant, args.seconds, Path(workdir))
    print_table(results)


if __name__ == "__main__":
    main()
