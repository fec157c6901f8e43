"""osnet-client: person re-identification embeddings from a Triton server over gRPC.

  osnet-client health                      server and model readiness, versions
  osnet-client embed IMAGES... -o out.npy  embed files or folders (batched, concurrent)
  osnet-client compare A.jpg B.jpg         cosine similarity of two crops
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine_builder.errors import OsnetTritonError


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    from client.embedding_client import DEFAULT_URL, ENSEMBLE_MODEL

    parser.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC endpoint (default: %(default)s)")
    parser.add_argument("--model", default=ENSEMBLE_MODEL, help="image-input model (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-request timeout (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osnet-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    health = commands.add_parser("health", help="server and model readiness")
    add_endpoint_arguments(health)

    embed = commands.add_parser("embed", help="embed image files or folders into a .npy")
    add_endpoint_arguments(embed)
    embed.add_argument("images", nargs="+", type=Path, help="image files or folders")
    embed.add_argument("-o", "--output", type=Path, required=True, help=".npy for the [N, 512] embeddings; a .txt beside it lists the files")
    embed.add_argument("--batch-size", type=int, default=16, help="images per request (default: %(default)s)")
    embed.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")

    compare = commands.add_parser("compare", help="cosine similarity of two images")
    add_endpoint_arguments(compare)
    compare.add_argument("first", type=Path)
    compare.add_argument("second", type=Path)
    return parser


def run_health(client) -> int:
    health = client.health()
    print(json.dumps({"url": health.url, "live": health.live, "ready": health.ready, "version": health.server_version, "models": health.models}, indent=2))
    return 0 if health.ready and client.model in health.models and health.models[client.model] == "READY" else 1


def run_embed(client, args: argparse.Namespace) -> int:
    import numpy as np

    from client.embedding_client import embed_files, list_images

    paths = list_images(args.images)
    embeddings = embed_files(client, paths, batch_size=args.batch_size, concurrency=args.concurrency)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.output, embeddings)
    args.output.with_suffix(".txt").write_text("".join(f"{path}\n" for path in paths))
    print(f"embedded {len(paths)} images -> {args.output} {embeddings.shape}")
    return 0


def run_compare(client, args: argparse.Namespace) -> int:
    from client.embedding_client import cosine_similarity, read_image_bytes

    embeddings = client.embed_images([read_image_bytes(args.first), read_image_bytes(args.second)])
    print(f"{cosine_similarity(embeddings[:1], embeddings[1:])[0, 0]:.6f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from client.embedding_client import EmbeddingClient

    try:
        with EmbeddingClient(args.url, args.model, timeout_s=args.timeout_s) as client:
            if args.command == "health":
                return run_health(client)
            if args.command == "embed":
                return run_embed(client, args)
            return run_compare(client, args)
    except (OsnetTritonError, ValueError) as exc:
        print(f"osnet-client: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
