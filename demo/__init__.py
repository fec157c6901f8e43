"""`make demo`: build the repository, serve it with a real tritonserver, embed crops over gRPC.

By default it serves osnet_x0_25 with the reference checkpoint (`weights/`, trained on generated
multi-camera people), on the CPU runtime `osnet-build --runtime auto` picks for this machine (the
fastest within the precision floor, measured during the build), and shows people it never saw in training, each through two cameras: the
cosine-similarity matrix, and whether each crop's most similar crop from the other camera is the
same person. Then whole camera frames: two generated frames, one per camera, with those people at
places of their own, sent with their boxes to `osnet_frames` (one request per frame, one embedding
per box), and each box's best match in the other camera's frame. Then the throughput of a short
concurrent burst, and the server stops.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

LOAD_TEST_USERS = 4
FRAME_WIDTH, FRAME_HEIGHT = 480, 288


def print_similarity_matrix(labels: list[str], similarity: np.ndarray) -> None:
    print(" " * 10 + "".join(f"{label:>9}" for label in labels))
    for label, row in zip(labels, similarity):
        print(f"{label:>10}" + "".join(f"{value:9.3f}" for value in row))


def print_cross_camera_matches(labels: list[str], identities: list[int], cameras: list[int], similarity: np.ndarray) -> int:
    """For each crop, its most similar crop seen by another camera; returns how many are the same person."""
    correct = 0
    for row, (label, identity, camera) in enumerate(zip(labels, identities, cameras)):
        others = [column for column, other_camera in enumerate(cameras) if other_camera != camera]
        best = max(others, key=lambda column: similarity[row, column])
        same = identities[best] == identity
        correct += same
        print(f"      {label:>10} -> {labels[best]:<10} {similarity[row, best]:.3f}  {'same person' if same else 'WRONG person'}")
    return correct


def write_camera_frames(output: Path, identities: list[int], cameras: tuple[int, ...], seed: int) -> tuple[list[bytes], list[np.ndarray], list[list[int]]]:
    """One JPEG frame per camera with every identity in it (in an order of the camera's own), saved with a
    boxes file `osnet-client embed-frames` reads; returns the frames, their boxes and who is in each box."""
    from engine_builder.synthetic_people import compose_frame, encode_jpeg, render_person

    folder = output / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    frames, boxes, people = [], [], []
    rows = ["frame,camera,x1,y1,x2,y2"]
    for camera in cameras:
        order = [identities[i] for i in np.random.default_rng([seed, camera]).permutation(len(identities))]
        image, camera_boxes = compose_frame([render_person(identity, camera, shot=1, seed=seed) for identity in order],
                                            FRAME_WIDTH, FRAME_HEIGHT, camera=camera, seed=seed)
        frames.append(encode_jpeg(image))
        (folder / f"c{camera}.jpg").write_bytes(frames[-1])
        rows += [f"c{camera}.jpg,{camera},{','.join(f'{v:g}' for v in box)}" for box in camera_boxes.tolist()]
        boxes.append(camera_boxes)
        people.append(order)
    (output / "boxes.csv").write_text("\n".join(rows) + "\n")
    return frames, boxes, people


def run_demo(variant: str, repository: Path, output: Path, burst_images: int, weights: Path | None,
             load_test_s: int = 10) -> None:
    from client.embedding_client import EmbeddingClient, cosine_similarity, embed_files
    from osnet_base.triton_server import TritonServerConfig, TritonServerProcess
    from engine_builder.build import build_cpu_repository
    from engine_builder.cpu_runtimes import RuntimeSelection, read_runtime_choice
    from engine_builder.reference_weights import REFERENCE_DATASET
    from engine_builder.triton_repository import served_tensor_model
    from engine_builder.synthetic_people import encode_jpeg, render_person
    from loadtest.runner import LoadTestSettings, format_summary, run_load_test

    started = time.perf_counter()
    # What osnet-build does by default, so the demo serves what a user's build would.
    build_cpu_repository(variant, repository, weights, selection=RuntimeSelection())  # --runtime auto
    tensor_model = served_tensor_model(repository)
    choice = read_runtime_choice(repository / tensor_model)
    print(f"\n[1/6] built {repository}/ ({variant}, export checked against PyTorch) in {time.perf_counter() - started:.1f} s")
    print(f"      `osnet` runs {tensor_model}: --runtime auto chose {choice['reason']}")

    output.mkdir(parents=True, exist_ok=True)
    # People numbered after the reference checkpoint's training identities: it never saw them.
    first_unseen = REFERENCE_DATASET.train_identities + 1
    labels, paths, identities, cameras = [], [], [], []
    for identity in range(first_unseen, first_unseen + 4):
        for camera in (1, 4):
            labels.append(f"id{identity}/c{camera}")
            identities.append(identity)
            cameras.append(camera)
            path = output / f"{identity:04d}_c{camera}.jpg"
            path.write_bytes(encode_jpeg(render_person(identity, camera, seed=REFERENCE_DATASET.seed)))
            paths.append(path)
    burst = [output / "burst" / f"{index:04d}.jpg" for index in range(burst_images)]
    burst[0].parent.mkdir(exist_ok=True)
    for index, path in enumerate(burst):
        path.write_bytes(encode_jpeg(render_person(100 + index // 3, camera=index % 3)))

    with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
        print(f"[2/6] tritonserver ready on {server.grpc_url} (pid {server.pid})")
        with EmbeddingClient(server.grpc_url) as client:
            health = client.health()
            print(f"      server {health.server_version}, models: {', '.join(f'{k}={v}' for k, v in sorted(health.models.items()))}")
            embeddings = embed_files(client, paths, batch_size=len(paths))
            np.save(output / "embeddings.npy", embeddings)
            norms = np.linalg.norm(embeddings, axis=1)
            print(f"[3/6] embedded {len(paths)} generated crops over gRPC: {embeddings.shape} {embeddings.dtype}, "
                  f"norms {norms.min():.4f}..{norms.max():.4f}")
            caveat = "" if weights else " (random weights: the values mean nothing until --weights is given)"
            print(f"      cosine similarity of {len(set(identities))} people unseen in training, each seen by two cameras{caveat}:")
            similarity = cosine_similarity(embeddings, embeddings)
            print_similarity_matrix(labels, similarity)
            print("      each crop's most similar crop from the other camera:")
            correct = print_cross_camera_matches(labels, identities, cameras, similarity)
            print(f"      {correct}/{len(labels)} crops re-identified across cameras (chance: 1 in {len(set(identities))})")

            cameras_seen = (1, 4)
            frames, boxes, people = write_camera_frames(output, sorted(set(identities)), cameras_seen, REFERENCE_DATASET.seed)
            per_box = client.embed_frames(list(zip(frames, boxes)))
            print(f"[4/6] {len(frames)} camera frames ({FRAME_WIDTH}x{FRAME_HEIGHT} JPEG, {', '.join(str(len(b)) for b in boxes)} "
                  f"boxes) -> osnet_frames, one request per frame: {sum(len(e) for e in per_box)} embeddings")
            box_labels = [f"c{camera}/box{index}" for camera, camera_boxes in zip(cameras_seen, boxes) for index in range(len(camera_boxes))]
            box_cameras = [camera for camera, camera_boxes in zip(cameras_seen, boxes) for _ in camera_boxes]
            box_identities = [identity for order in people for identity in order]
            box_embeddings = np.concatenate(per_box)
            print("      each box's most similar box in the other camera's frame:")
            correct = print_cross_camera_matches(box_labels, box_identities, box_cameras,
                                                 cosine_similarity(box_embeddings, box_embeddings))
            print(f"      {correct}/{len(box_labels)} boxes matched to the same person across cameras; frames and "
                  f"boxes in {output}/frames, {output}/boxes.csv (osnet-client embed-frames reads them)")

            embed_files(client, burst[:8], batch_size=8)  # warm-up
            started = time.perf_counter()
            embed_files(client, burst, batch_size=8, concurrency=4)
            elapsed = time.perf_counter() - started
            print(f"[5/6] burst: {len(burst)} JPEGs, batch 8, 4 requests in flight: {len(burst) / elapsed:.1f} img/s "
                  f"({elapsed:.2f} s; server and client share this machine's cores)")
        print(f"[6/6] locust over gRPC: {LOAD_TEST_USERS} users for {load_test_s} s on the `osnet` ensemble ...")
        load = run_load_test(
            LoadTestSettings(output_dir=output / "loadtest", url=server.grpc_url, users=LOAD_TEST_USERS, duration_s=load_test_s)
        )
        print("\n".join(f"      {line}" for line in format_summary(load).splitlines()))
    print(f"\nserver stopped. Embeddings in {output}/embeddings.npy, load-test report in {output}/loadtest/; serve it yourself with:\n"
          f"  .venv/bin/tritonserver --model-repository {repository}")


def main() -> None:
    from engine_builder.reference_weights import REFERENCE_VARIANT, reference_weights

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default=REFERENCE_VARIANT, help="OSNet variant (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help=f"torchreid checkpoint (default for {REFERENCE_VARIANT}: the reference checkpoint; other variants: random weights)")
    parser.add_argument("--repository", type=Path, default=Path("triton_repo"))
    parser.add_argument("--output", type=Path, default=Path("demo_output"))
    parser.add_argument("--burst-images", type=int, default=256)
    parser.add_argument("--load-test-s", type=int, default=10, help="locust run time in seconds (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    weights = args.weights or (reference_weights() if args.variant == REFERENCE_VARIANT else None)
    run_demo(args.variant, args.repository, args.output, args.burst_images, weights, args.load_test_s)

