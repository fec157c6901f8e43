"""osnet-client: person re-identification embeddings from a Triton server over gRPC.

  osnet-client health                      ready only if a real inference is answered correctly
  osnet-client embed IMAGES... -o out.npy  embed files or folders (batched, concurrent)
  osnet-client embed-frames DIR --boxes B -o out.npy
                                           one embedding per detected person: frames and their boxes
  osnet-client compare A.jpg B.jpg         cosine similarity of two crops
  osnet-client evaluate --data DIR         CMC rank-1/5/10 and mAP on a Market-1501-layout query/gallery
  osnet-client gallery build DIR --index G embed a folder of crops into a gallery index saved in G
  osnet-client search IMAGES... --index G  the gallery crops most similar to each image
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from osnet_base.errors import OsnetTritonError


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    from osnet_base.contract import DEFAULT_URL, ENSEMBLE_MODEL

    parser.add_argument("--url", action="append", default=None,
                        help=f"Triton gRPC endpoint host:port (default: {DEFAULT_URL}); several, repeated or comma-separated, "
                        "share the requests: least-loaded healthy server first, one retry elsewhere if one is unavailable")
    parser.add_argument("--model", default=ENSEMBLE_MODEL, help="image-input model (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per-request timeout (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from osnet_base.contract import FRAMES_MODEL

    parser = argparse.ArgumentParser(prog="osnet-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    health = commands.add_parser("health", help="readiness from a real inference through the model; exit 0 only if it was correct")
    add_endpoint_arguments(health)
    health.set_defaults(run=run_health)

    embed = commands.add_parser("embed", help="embed image files or folders into a .npy")
    add_endpoint_arguments(embed)
    add_embedding_arguments(embed)
    embed.add_argument("images", nargs="+", type=Path, help="image files or folders")
    embed.add_argument("-o", "--output", type=Path, required=True,
                       help="the [N, 512] embeddings (.npy is added if missing); a .txt beside it lists the files")
    embed.add_argument("--skip-unreadable", action="store_true",
                       help="leave out files that cannot be read or decoded, and list them, instead of failing the job")
    embed.set_defaults(run=run_embed)

    frames = commands.add_parser(
        "embed-frames", help="embed every box of a folder of camera frames into a .npy",
        description="Each frame is sent once, with its boxes, to osnet_frames, which cuts and embeds them. The boxes "
        "file has one row per box: frame (file name inside FRAMES), camera, x1, y1, x2, y2 (frame pixels); as CSV "
        "with that header line, or as JSON (one object per line, or a list). Row i of the .npy is box i of the file; "
        "a .csv beside it repeats the rows.",
    )
    add_endpoint_arguments(frames)
    frames.add_argument("frames", type=Path, help="folder of JPEG/PNG frames")
    frames.add_argument("--boxes", type=Path, required=True, help="the boxes file (.csv, or .json / .jsonl)")
    frames.add_argument("-o", "--output", type=Path, required=True, help="the [boxes, 512] embeddings (.npy is added if missing)")
    frames.add_argument("--frames-model", default=FRAMES_MODEL, help="frame-and-boxes model (default: %(default)s)")
    frames.add_argument("--concurrency", type=int, default=8, help="frames in flight (default: %(default)s)")
    frames.set_defaults(run=run_embed_frames)

    compare = commands.add_parser("compare", help="cosine similarity of two images")
    add_endpoint_arguments(compare)
    compare.set_defaults(run=run_compare)
    compare.add_argument("first", type=Path)
    compare.add_argument("second", type=Path)

    evaluate = commands.add_parser(
        "evaluate",
        help="rank-1/5/10 and mAP with the Market-1501 protocol",
        description="Embed DIR/query and DIR/bounding_box_test through the server and score the ranking: gallery "
        "images of the query's identity seen by the query's camera are excluded, junk (pid -1) is ignored, "
        "distractors (pid 0) count as wrong matches. Prints a table with chance level; writes JSON.",
    )
    add_endpoint_arguments(evaluate)
    add_embedding_arguments(evaluate)
    evaluate.add_argument("--data", type=Path, required=True, help="Market-1501-layout root holding query/ and bounding_box_test/")
    evaluate.add_argument("-o", "--output", type=Path, default=Path("evaluation.json"), help="JSON report (default: %(default)s)")
    evaluate.set_defaults(run=run_evaluate)

    gallery = commands.add_parser("gallery", help="gallery index commands")
    gallery_commands = gallery.add_subparsers(dest="gallery_command", required=True)
    gallery_build = gallery_commands.add_parser(
        "build", help="embed image files or folders into a gallery index on disk",
        description="Market-1501 file names (PPPP_cCsS_FFFFFF_NN.jpg) give each entry its identity and camera.",
    )
    add_endpoint_arguments(gallery_build)
    add_embedding_arguments(gallery_build)
    gallery_build.add_argument("images", nargs="+", type=Path, help="image files or folders")
    gallery_build.add_argument("--index", type=Path, default=Path("gallery_index"), help="folder to save the index in (default: %(default)s)")
    gallery_build.add_argument("--faiss-threshold", type=int, default=None, help="entries from which search uses a FAISS HNSW graph instead of exact NumPy (default: 50000)")
    gallery_build.set_defaults(run=run_gallery_build)

    search = commands.add_parser("search", help="the gallery crops most similar to each image")
    add_endpoint_arguments(search)
    add_embedding_arguments(search)
    search.add_argument("images", nargs="+", type=Path, help="query image files or folders")
    search.add_argument("--index", type=Path, default=Path("gallery_index"), help="gallery index folder (default: %(default)s)")
    search.add_argument("-k", "--top-k", type=int, default=5, help="matches per query (default: %(default)s)")
    search.add_argument("--exact", action="store_true", help="exact NumPy search even where the gallery has a FAISS graph")
    search.add_argument("--json", action="store_true", help="print the matches as JSON instead of tables")
    search.set_defaults(run=run_search)
    return parser


def add_embedding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=16, help="images per request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default: %(default)s)")


def run_health(client, args: argparse.Namespace) -> int:
    if hasattr(client, "servers_health"):
        return run_servers_health(client)
    from client.health import health_report

    report = health_report(client)
    print(json.dumps(report.as_dict(), indent=2))
    if not report.ready:
        print(f"osnet-client: not ready: {report.why_not_ready()}", file=sys.stderr)
    return 0 if report.ready else 1


def run_servers_health(client) -> int:
    """Several servers: each one's real-inference check; healthy only if all pass."""
    results = client.servers_health()
    print(json.dumps({"model": client.model, "servers": [{"url": url, "healthy": problem is None, "problem": problem}
                                                         for url, problem in results]}, indent=2))
    for url, problem in results:
        if problem is not None:
            print(f"osnet-client: {url} fails its health check: {problem}", file=sys.stderr)
    return 0 if all(problem is None for _, problem in results) else 1


def writable_output(path: Path, suffix: str) -> Path:
    """`path` with `suffix` (NumPy adds .npy to a name without it: say where it really goes), checked
    writable now, before a long job, not after it."""
    from client.embedding_client import ClientError

    path = path if path.suffix == suffix else path.with_name(path.name + suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with path.open("ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise ClientError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def run_embed(client, args: argparse.Namespace) -> int:
    import numpy as np

    from client.embedding_client import embed_files, embed_readable_files, list_images

    output = writable_output(args.output, ".npy")
    paths = list_images(args.images)
    if args.skip_unreadable:
        embedded = embed_readable_files(client, paths, batch_size=args.batch_size, concurrency=args.concurrency)
        paths, embeddings = embedded.paths, embedded.embeddings
        for path, reason in embedded.skipped:
            print(f"osnet-client: skipped {path}: {reason}", file=sys.stderr)
    else:
        embeddings = embed_files(client, paths, batch_size=args.batch_size, concurrency=args.concurrency)
    np.save(output, embeddings)
    listing = output.with_suffix(".txt")
    listing.write_text("".join(f"{path}\n" for path in paths))
    print(f"embedded {len(paths)} images -> {output} {embeddings.shape}, files listed in {listing}")
    return 0


def run_embed_frames(client, args: argparse.Namespace) -> int:
    import csv

    import numpy as np

    from client.frames import BOX_COLUMNS, embed_frame_folder, read_boxes_file

    output = writable_output(args.output, ".npy")
    if not args.frames.is_dir():
        raise ValueError(f"{args.frames} is not a folder of frames")
    rows = read_boxes_file(args.boxes)
    embeddings = embed_frame_folder(client, args.frames, rows, concurrency=args.concurrency, model=args.frames_model)
    np.save(output, embeddings)
    listing = output.with_suffix(".csv")
    with listing.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(BOX_COLUMNS)
        writer.writerows([row.frame, row.camera, *(f"{corner:g}" for corner in row.box)] for row in rows)
    print(f"embedded {len(rows)} boxes of {len({row.frame for row in rows})} frames from "
          f"{len({row.camera for row in rows})} cameras -> {output} {embeddings.shape}, rows listed in {listing}")
    return 0


def run_compare(client, args: argparse.Namespace) -> int:
    from client.embedding_client import cosine_similarity, read_image_bytes

    embeddings = client.embed_images([read_image_bytes(args.first), read_image_bytes(args.second)])
    print(f"{cosine_similarity(embeddings[:1], embeddings[1:])[0, 0]:.6f}")
    return 0


def run_evaluate(client, args: argparse.Namespace) -> int:
    from client.embedding_client import cosine_similarity
    from reid.evaluation import chance_level, evaluate_retrieval, format_metrics_table
    from reid.market1501 import DISTRACTOR_PID, GALLERY_DIR, JUNK_PID, QUERY_DIR, read_market_split
    from client.progress import ProgressLine, embed_with_progress

    query, gallery = read_market_split(args.data, QUERY_DIR), read_market_split(args.data, GALLERY_DIR)
    embeddings = {}
    for name, split in (("query", query), ("gallery", gallery)):
        embeddings[name] = embed_with_progress(
            client, list(split.paths), batch_size=args.batch_size, concurrency=args.concurrency,
            on_progress=ProgressLine(f"embedding {name}"),
        )
    similarity = cosine_similarity(embeddings["query"], embeddings["gallery"])
    metrics = evaluate_retrieval(similarity, query.pids, query.camids, gallery.pids, gallery.camids)
    chance = chance_level(query.pids, query.camids, gallery.pids, gallery.camids)
    junk, distractors = gallery.pids.count(JUNK_PID), gallery.pids.count(DISTRACTOR_PID)
    print(f"{args.data}: {len(query)} queries of {len(set(query.pids))} identities; {len(gallery)} gallery images "
          f"({junk} junk, ignored; {distractors} distractors, kept as negatives); model {client.model} at {client.url}")
    print(format_metrics_table({client.model: metrics, "chance": chance}))
    if metrics.skipped_queries:
        print(f"{metrics.skipped_queries} queries have no match in another camera and were skipped")
    report = {
        "data": str(args.data),
        "model": client.model,
        "url": client.url,
        "protocol": "Market-1501: same identity and camera as the query excluded, junk (-1) ignored, distractors (0) kept as negatives",
        "queries": len(query),
        "gallery": len(gallery),
        "gallery_junk": junk,
        "gallery_distractors": distractors,
        "metrics": metrics.as_dict(),
        "chance": chance.as_dict(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report -> {args.output}")
    return 0


def run_gallery_build(client, args: argparse.Namespace) -> int:
    from client.embedding_client import list_images
    from client.gallery import DEFAULT_FAISS_THRESHOLD, build_gallery
    from client.progress import ProgressLine

    paths = list_images(args.images)
    threshold = DEFAULT_FAISS_THRESHOLD if args.faiss_threshold is None else args.faiss_threshold
    index = build_gallery(
        client, paths, batch_size=args.batch_size, concurrency=args.concurrency, faiss_threshold=threshold,
        on_progress=ProgressLine("embedding gallery"),
    )
    index.save(args.index)
    search = "FAISS HNSW graph (approximate)" if index.uses_faiss else "exact NumPy search"
    print(f"indexed {len(index)} images -> {args.index} ({search})")
    return 0


def run_search(client, args: argparse.Namespace) -> int:
    from client.embedding_client import list_images
    from client.gallery import GalleryEntry, GalleryIndex
    from client.progress import ProgressLine, embed_with_progress

    index = GalleryIndex.load(args.index)
    if index.model != client.model:
        print(f"osnet-client: warning: {args.index} was embedded by model {index.model!r}, the queries by {client.model!r}", file=sys.stderr)
    paths = list_images(args.images)
    embeddings = embed_with_progress(client, paths, batch_size=args.batch_size, concurrency=args.concurrency,
                                     on_progress=ProgressLine("embedding queries") if len(paths) > args.batch_size else None)
    results = index.search(embeddings, top_k=args.top_k, exact=args.exact)
    queries = [GalleryEntry.from_path(path) for path in paths]
    # Queries named like Market-1501 files carry their identity: count how often the best match shares it.
    known = [(query, matches) for query, matches in zip(queries, results) if query.pid is not None and query.pid > 0]
    correct = sum(bool(matches) and matches[0].entry.pid == query.pid for query, matches in known)
    if args.json:
        print(json.dumps({
            "index": str(args.index),
            "queries": [{"path": q.path, "pid": q.pid, "camid": q.camid,
                         "matches": [{"rank": m.rank, "score": m.score, "pid": m.entry.pid, "camid": m.entry.camid, "path": m.entry.path} for m in matches]}
                        for q, matches in zip(queries, results)],
            "top1_identity_correct": correct,
            "queries_with_identity": len(known),
        }, indent=2))
        return 0
    for query, matches in zip(queries, results):
        print(f"{query.path} (identity {_show(query.pid)}, camera {_show(query.camid)})")
        print(f"  {'rank':>4} {'score':>7} {'identity':>8} {'camera':>6}  file")
        for match in matches:
            print(f"  {match.rank:>4} {match.score:7.3f} {_show(match.entry.pid):>8} {_show(match.entry.camid):>6}  {match.entry.path}")
    if known:
        print(f"top-1 identity correct for {correct} of {len(known)} queries ({100 * correct / len(known):.1f}%)")
    return 0


def _show(value: int | None) -> str:
    return "?" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from client.embedding_client import EmbeddingClient
    from osnet_base.contract import DEFAULT_URL

    try:
        with EmbeddingClient(",".join(args.url or [DEFAULT_URL]), args.model, timeout_s=args.timeout_s) as client:
            try:
                return args.run(client, args)
            finally:
                if hasattr(client, "pool") and args.command != "health":
                    from client.server_pool import format_stats

                    print(f"where the requests went:\n{format_stats(client.pool.stats())}", file=sys.stderr)
    except (OsnetTritonError, ValueError) as exc:
        print(f"osnet-client: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
