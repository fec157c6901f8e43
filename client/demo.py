"""`make demo`: build the repository, serve it with a real tritonserver, embed crops over gRPC.

Prints what came back (shapes, norms, a cosine-similarity matrix of generated people seen by two
cameras), the throughput of a short concurrent burst, then stops the server.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def print_similarity_matrix(labels: list[str], similarity: np.ndarray) -> None:
    print(" " * 10 + "".join(f"{label:>9}" for label in labels))
    for label, row in zip(labels, similarity):
        print(f"{label:>10}" + "".join(f"{value:9.3f}" for value in row))


def run_demo(variant: str, repository: Path, output: Path, burst_images: int, weights: Path | None) -> None:
    from client.embedding_client import EmbeddingClient, cosine_similarity, embed_files
    from client.triton_server import TritonServerConfig, TritonServerProcess
    from engine_builder.build import build_cpu_repository
    from engine_builder.synthetic_people import encode_jpeg, render_person

    started = time.perf_counter()
    build_cpu_repository(variant, repository, weights)
    print(f"\n[1/4] built {repository}/ ({variant}, ONNX Runtime checked against PyTorch) in {time.perf_counter() - started:.1f} s")

    output.mkdir(parents=True, exist_ok=True)
    identities, cameras = 4, 2
    labels, paths = [], []
    for identity in range(identities):
        for camera in range(cameras):
            labels.append(f"id{identity}/c{camera}")
            path = output / f"{identity:04d}_c{camera}.jpg"
            path.write_bytes(encode_jpeg(render_person(identity, camera)))
            paths.append(path)
    burst = [output / "burst" / f"{index:04d}.jpg" for index in range(burst_images)]
    burst[0].parent.mkdir(exist_ok=True)
    for index, path in enumerate(burst):
        path.write_bytes(encode_jpeg(render_person(100 + index // 3, camera=index % 3)))

    with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
        print(f"[2/4] tritonserver ready on {server.grpc_url} (pid {server.pid})")
        with EmbeddingClient(server.grpc_url) as client:
            health = client.health()
            print(f"      server {health.server_version}, models: {', '.join(f'{k}={v}' for k, v in sorted(health.models.items()))}")
            embeddings = embed_files(client, paths, batch_size=len(paths))
            np.save(output / "embeddings.npy", embeddings)
            norms = np.linalg.norm(embeddings, axis=1)
            print(f"[3/4] embedded {len(paths)} generated crops over gRPC: {embeddings.shape} {embeddings.dtype}, "
                  f"norms {norms.min():.4f}..{norms.max():.4f}")
            caveat = "" if weights else " (random weights: the values mean nothing until --weights is given)"
            print(f"      cosine similarity, each identity seen by two cameras{caveat}:")
            print_similarity_matrix(labels, cosine_similarity(embeddings, embeddings))

            embed_files(client, burst[:8], batch_size=8)  # warm-up
            started = time.perf_counter()
            embed_files(client, burst, batch_size=8, concurrency=4)
            elapsed = time.perf_counter() - started
            print(f"[4/4] burst: {len(burst)} JPEGs, batch 8, 4 requests in flight: {len(burst) / elapsed:.1f} img/s "
                  f"({elapsed:.2f} s; server and client share this machine's cores)")
    print(f"\nserver stopped. Embeddings in {output}/embeddings.npy; serve it yourself with:\n"
          f"  .venv/bin/tritonserver --model-repository {repository}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="osnet_x1_0")
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--repository", type=Path, default=Path("triton_repo"))
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    parser.add_argument("--burst-images", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_demo(args.variant, args.repository, args.output, args.burst_images, args.weights)


if __name__ == "__main__":
    main()
