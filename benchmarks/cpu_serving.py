"""CPU throughput and precision, side by side in one run: PyTorch eager, every CPU runtime and
precision in-process, and each of them served by a real tritonserver.

For each variant, at batch 32 unless said otherwise:
- in-process: PyTorch eager FP32, then every CPU runtime this machine runs (`engine_builder.cpu_runtimes`:
  ONNX Runtime and OpenVINO, FP32 / BF16 / INT8), configured as the served model is;
- which runtime `osnet-build --runtime auto` picks from those figures, and why;
- served over gRPC with `EmbeddingClient`: each runtime's tensor model, written as `osnet-build`
  writes it, as 1 client and as 8 concurrent clients sending batch-32 requests, and as 8 clients
  sending one image per request (dynamic batching does the batching);
- for the chosen runtime, also: the tensor model with its input in Triton system shared memory (a
  co-located client: the 12.6 MB batch is not sent through gRPC), and the `osnet` ensemble from
  JPEG bytes.
Models have the weights `osnet-build` uses without --weights (the reference checkpoint for
osnet_x0_25, seeded random weights otherwise). Beside each row: mean and minimum cosine of its
embeddings against PyTorch FP32 on held-out generated people (served rows: what came back from the
server), the cores the load generator itself used (served rows), and the cores other people's
processes kept busy meanwhile. Every row is the best of `--rounds` rounds, in-process and served alike, and a row
that others disturbed (> 0.1 core) is measured again once the machine is quiet.

The load generator (Python, gRPC) shares the machine's cores with the server. On a VM, a 12.6 MB
buffer allocated fresh for every request costs more in page faults than in copying, so this script
asks glibc to keep large freed buffers (`mallopt`), as `TritonServerProcess` does for the server.

    python -m benchmarks.cpu_serving [--variants osnet_x1_0 osnet_x0_25] [--seconds 6] [--rounds 3]
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

BATCH, CONCURRENCY = 32, 8
# Above this many cores busy with other people's work, a row is not a measurement of ours.
QUIET_CORES = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Row:
    variant: str
    runtime: str
    path: str
    batch: int
    concurrency: int
    images_per_s: float
    mean_cosine: float | None
    min_cosine: float | None
    foreign_cores: float
    client_cores: float | None  # served rows: what the load generator (this process) used


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

    def __init__(self) -> None:
        self.groups = {os.getpgrp()}

    def sample(self) -> tuple[float, float, float]:
        return time.perf_counter(), _system_busy_s(), _group_cpu_s(self.groups)

    def cores_since(self, start: tuple[float, float, float]) -> float:
        """Mean number of cores others kept busy since `start`."""
        now = self.sample()
        return max(0.0, (now[1] - start[1]) - (now[2] - start[2])) / (now[0] - start[0])

    def wait_until_quiet(self, seconds: float = 2.0, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            start = self.sample()
            time.sleep(seconds)
            if self.cores_since(start) < QUIET_CORES:
                return
        print(f"  (the machine stayed busy for {timeout_s:.0f} s: measuring anyway)", flush=True)

    def measured_quietly(self, run: Callable[[], T], attempts: int = 4) -> tuple[T, float]:
        """(result, cores others used meanwhile) of `run`, redone (up to `attempts` times) while others disturb it."""
        for attempt in range(1, attempts + 1):
            self.wait_until_quiet()
            start = self.sample()
            result = run()
            foreign = self.cores_since(start)
            if foreign < QUIET_CORES or attempt == attempts:
                return result, foreign
            print(f"  (others used {foreign:.2f} cores meanwhile: measuring again)", flush=True)


def measure(run_batch: Callable[[], int], seconds: float, concurrency: int = 1, rounds: int = 1) -> tuple[float, float]:
    """Images per second of `run_batch` (returns how many images it did) called in `concurrency`
    threads, and the cores this process used meanwhile: the best of `rounds` rounds of `seconds / rounds`."""
    run_batch()  # warm-up: first-call allocation and graph optimisation are not throughput
    best, best_cores = 0.0, 0.0
    for _ in range(rounds):
        done = [0] * concurrency
        deadline = time.perf_counter() + seconds / rounds

        def worker(slot: int) -> None:
            while time.perf_counter() < deadline:
                done[slot] += run_batch()

        started, cpu_started = time.perf_counter(), time.process_time()
        threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        if sum(done) / elapsed > best:
            best, best_cores = sum(done) / elapsed, (time.process_time() - cpu_started) / elapsed
    return best, best_cores


def cosines(embeddings: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    values = np.sum(unit * reference, axis=1)
    return float(values.mean()), float(values.min())


class PerThread(Generic[T]):
    """One client per load-generator thread, all closed at the end."""

    def __init__(self, factory: Callable[[], T]):
        self._factory, self._local, self._lock = factory, threading.local(), threading.Lock()
        self._made: list[T] = []

    def get(self) -> T:
        if not hasattr(self._local, "client"):
            self._local.client = self._factory()
            with self._lock:
                self._made.append(self._local.client)
        return self._local.client

    def close(self) -> None:
        for client in self._made:
            client.close()


def benchmark_variant(variant: str, seconds: float, rounds: int, workdir: Path, settings, load: ForeignLoad) -> tuple[list[Row], tuple[str, str]]:
    import torch

    from client.embedding_client import EmbeddingClient
    from osnet_base.triton_server import TritonServerConfig, TritonServerProcess
    from engine_builder.build import make_cpu_graphs, pytorch_embeddings
    from engine_builder.cpu_runtimes import (
        RuntimeSelection,
        available_runtimes,
        choose_runtime,
        cpu_capabilities,
        measure_candidates,
        openvino_installed,
    )
    from engine_builder.image_sets import EVALUATION_SEED, image_set, preprocess_all
    from engine_builder.models import create_osnet
    from engine_builder.reference_weights import default_weights
    from engine_builder.synthetic_people import person_jpegs
    from engine_builder.triton_repository import write_cpu_models

    rows: list[Row] = []

    def record(runtime: str, path: str, batch: int, clients: int, rate: float, foreign: float,
               agreement: tuple[float | None, float | None], client_cores: float | None = None) -> None:
        mean, minimum = agreement
        rows.append(Row(variant=variant, runtime=runtime, path=path, batch=batch, concurrency=clients, images_per_s=rate,
                        mean_cosine=mean, min_cosine=minimum, foreign_cores=foreign,
                        client_cores=client_cores))
        cosine = "" if mean is None else f"  cosine mean {mean:.6f} min {minimum:.6f}"
        cosine += "" if client_cores is None else f"  load generator {client_cores:.2f} cores"
        print(f"  {variant:<12} {runtime:<17} {path:<32} batch {batch:>2} x {clients}: {rate:8.1f} img/s{cosine}"
              f"  (others: {foreign:.2f} cores)", flush=True)

    selection = RuntimeSelection()  # --runtime auto, as osnet-build
    # What `osnet-build` serves without --weights: precision depends on the weights, speed does not.
    weights = default_weights(variant)
    print(f"  {variant}: {weights or 'seeded random weights'}", flush=True)
    model = create_osnet(variant, weights)
    evaluation = image_set(None, selection.evaluation_images, EVALUATION_SEED)
    reference = pytorch_embeddings(model, evaluation)
    images = np.resize(evaluation, (BATCH, *evaluation.shape[1:]))
    tensor = torch.from_numpy(images)

    def torch_batch() -> int:
        with torch.inference_mode():
            model(tensor)
        return BATCH

    (rate, _), foreign = load.measured_quietly(lambda: measure(torch_batch, seconds, rounds=rounds))
    record("pytorch-fp32", "in-process (eager)", BATCH, 1, rate, foreign, (1.0, 1.0))

    runtimes = available_runtimes(cpu_capabilities(), openvino_installed())
    graph_dir = workdir / variant / "graphs"
    graph_dir.mkdir(parents=True)
    graphs = make_cpu_graphs(model, {runtime.graph for runtime in runtimes}, graph_dir, selection)
    # What `--runtime auto` measures at build time, with more time per candidate.
    measurements, foreign = load.measured_quietly(lambda: measure_candidates(
        runtimes, graphs, evaluation, reference, floor=selection.floor, threads=settings.threads_per_instance(),
        streams=settings.streams, batch_size=BATCH, seconds_per_candidate=seconds, rounds=rounds))
    for measured in measurements:
        record(measured.runtime, "in-process", BATCH, 1, measured.images_per_s or 0.0, foreign,
               (measured.mean_cosine, measured.min_cosine))
    chosen, reason = choose_runtime(measurements, selection.floor)

    jpegs = person_jpegs(BATCH * 4, cameras=3)
    jpeg_reference = pytorch_embeddings(model, preprocess_all(jpegs[:BATCH]))
    for runtime in runtimes:
        repository = workdir / variant / runtime.name
        tensor_model = write_cpu_models(repository, variant, settings, runtime)
        shutil.copyfile(graphs[runtime.graph], repository / tensor_model / "1" / "model.onnx")
        with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
            load.groups.add(server.pid)  # the server leads its own process group, its python stubs included
            clients = PerThread(lambda: EmbeddingClient(server.grpc_url))
            shared = PerThread(lambda: EmbeddingClient(server.grpc_url, shared_memory=True))
            try:
                served = np.concatenate([clients.get().embed_tensors(evaluation[i : i + BATCH], tensor_model)
                                         for i in range(0, len(evaluation), BATCH)])
                agreement = cosines(served, reference)
                plan = [
                    ("tensor model, gRPC", BATCH, 1, lambda: len(clients.get().embed_tensors(images, tensor_model))),
                    ("tensor model, gRPC", BATCH, CONCURRENCY, lambda: len(clients.get().embed_tensors(images, tensor_model))),
                    ("tensor model, gRPC", 1, CONCURRENCY, lambda: len(clients.get().embed_tensors(images[:1], tensor_model))),
                ]
                if runtime.name == chosen:
                    plan += [
                        ("tensor model, shared memory", BATCH, 1, lambda: len(shared.get().embed_tensors(images, tensor_model))),
                        ("tensor model, shared memory", BATCH, CONCURRENCY, lambda: len(shared.get().embed_tensors(images, tensor_model))),
                    ]
                for path, per_request, concurrency, run in plan:
                    (rate, cores), foreign = load.measured_quietly(lambda: measure(run, seconds, concurrency, rounds))
                    record(runtime.name, path, per_request, concurrency, rate, foreign, agreement, cores)
                if runtime.name == chosen:
                    ensemble = cosines(clients.get().embed_images(jpegs[:BATCH]), jpeg_reference)
                    for per_request, concurrency in ((BATCH, 1), (1, CONCURRENCY)):
                        (rate, cores), foreign = load.measured_quietly(lambda: measure(
                            lambda: len(clients.get().embed_images(jpegs[:per_request])), seconds, concurrency, rounds))
                        record(runtime.name, "ensemble, JPEG bytes over gRPC", per_request, concurrency, rate, foreign, ensemble, cores)
            finally:
                clients.close()
                shared.close()
                load.groups.discard(server.pid)
    return rows, (chosen, reason)


def print_table(rows: list[Row], choices: dict[str, tuple[str, str]], settings, seconds: float, rounds: int) -> None:
    from osnet_base.triton_server import KEEP_LARGE_BUFFERS

    best_in_process = {}
    for row in rows:
        if row.path.startswith("in-process"):
            best_in_process[row.variant] = max(best_in_process.get(row.variant, 0.0), row.images_per_s)
    print("\n| variant | runtime | path | images/request | clients | img/s | x best in-process | mean cosine | min cosine "
          "| load generator cores | others' cores |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cosine = "- | -" if r.mean_cosine is None else f"{r.mean_cosine:.6f} | {r.min_cosine:.6f}"
        client = "-" if r.client_cores is None else f"{r.client_cores:.2f}"
        print(f"| {r.variant} | {r.runtime} | {r.path} | {r.batch} | {r.concurrency} | {r.images_per_s:.1f} | "
              f"{r.images_per_s / best_in_process[r.variant]:.2f} | {cosine} | {client} | {r.foreign_cores:.2f} |")
    print()
    for variant, (chosen, reason) in choices.items():
        print(f"- {variant}: auto picks {chosen}: {reason}.")
        for path in ("tensor model, gRPC", "tensor model, shared memory"):
            served = [r for r in rows if r.variant == variant and r.runtime == chosen and r.path == path and r.batch == BATCH]
            best = max(served, key=lambda r: r.images_per_s)
            print(f"  - served {chosen}, {path}, batch {BATCH} x {best.concurrency} clients: {best.images_per_s:.1f} img/s = "
                  f"{best.images_per_s / best_in_process[variant]:.2f}x the best in-process figure "
                  f"({best_in_process[variant]:.1f} img/s), mean cosine {best.mean_cosine:.6f} vs PyTorch FP32; "
                  f"the load generator used {best.client_cores:.2f} of the {os.cpu_count()} cores")
    streams = settings.streams or "OpenVINO THROUGHPUT default"
    print(f"\n{os.cpu_count()} CPU cores; server and load generator share them. Each row: best of {rounds} rounds of "
          f"{seconds / rounds:.1f} s. Tensor models: {settings.instances} instance(s), threads "
          f"{settings.threads_per_instance() or 'runtime default'}, streams {streams}, dynamic batching (max queue delay "
          f"{settings.max_queue_delay_us} us, preferred sizes {list(settings.preferred_batch_sizes) or 'none'}); "
          f"glibc malloc keeps large buffers ({KEEP_LARGE_BUFFERS}) in the load generator and the servers.")


def keep_large_buffers() -> None:
    """What `KEEP_LARGE_BUFFERS` does for the servers, for the load generator (this process):
    without it each batch-32 request costs the client ~40 ms of CPU in page faults instead of ~10."""
    from osnet_base.triton_server import MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        raise OSError("glibc refused mallopt")


def main() -> None:
    from engine_builder.triton_repository import CpuRepositorySettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["osnet_x1_0", "osnet_x0_25"])
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per row (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row; the best counts (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    keep_large_buffers()
    settings = CpuRepositorySettings()
    load = ForeignLoad()
    rows: list[Row] = []
    choices: dict[str, tuple[str, str]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="osnet_bench_") as workdir:
        for variant in args.variants:
            variant_rows, choices[variant] = benchmark_variant(variant, args.seconds, args.rounds, Path(workdir), settings, load)
            rows += variant_rows
    print_table(rows, choices, settings, args.seconds, args.rounds)
    print(f"Run time {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
