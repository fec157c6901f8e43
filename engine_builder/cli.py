"""osnet-build: turn OSNet (torchreid weights) into a Triton model repository.

Exports the variant to ONNX with a dynamic batch axis, checks ONNX Runtime against PyTorch, and
writes `preprocess`, `<variant>_fp32` and the `osnet` ensemble into the repository.
Serve it with: tritonserver --model-repository <repository>
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine_builder.errors import OsnetTritonError


def build_parser() -> argparse.ArgumentParser:
    from engine_builder.models import VARIANTS

    parser = argparse.ArgumentParser(prog="osnet-build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="osnet_x1_0", choices=sorted(VARIANTS), help="OSNet variant (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help="torchreid checkpoint (.pth state_dict or .pth.tar); default: seeded random weights")
    parser.add_argument("--repository", type=Path, default=Path("triton_repo"), help="output model repository (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size (default: %(default)s)")
    parser.add_argument("--instances", type=int, default=1, help="model instances per model (default: %(default)s)")
    parser.add_argument("--intra-op-threads", type=int, help="ONNX Runtime threads per instance (default: ONNX Runtime's choice)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from engine_builder.build import build_cpu_repository
    from engine_builder.triton_repository import CpuRepositorySettings

    try:
        settings = CpuRepositorySettings(
            max_batch_size=args.max_batch_size, instances=args.instances, intra_op_threads=args.intra_op_threads
        )
        build_cpu_repository(args.variant, args.repository, args.weights, settings)
    except (OsnetTritonError, ValueError) as exc:
        print(f"osnet-build: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
