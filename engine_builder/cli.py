"""osnet-build: turn OSNet (torchreid weights) into a Triton model repository.

  osnet-build [--variant V] [--weights W] [--precision fp32 fp16 int8] ...
      fp32: exports ONNX (checked against PyTorch) and writes `preprocess`, the CPU tensor model and
      the `osnet` ensemble. The CPU tensor model is `<variant>_fp32|bf16|int8`, served by the runtime
      --runtime names; `auto` measures the candidates here and serves the fastest within the precision
      floor, and `<model>/runtime_choice.md` says why. fp16 / int8: makes the precision graphs,
      writes their precision report (failing below the floor), rewrites them to the fused plugins
      (checked on CPU), and with TensorRT >= 10.9 and a GPU builds `<variant>_trt_fp16|int8` engines
      and points the `osnet` ensemble at INT8 (else FP16).
  osnet-build check-trt [--variant V] ...
      with TensorRT and a GPU: engines with and without the fused plugins, cosine and img/s side by side.
Serve with: tritonserver --model-repository <repository>
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from osnet_base.contract import DEFAULT_MAX_BATCH_SIZE, DEFAULT_RUNTIME
from osnet_base.errors import OsnetTritonError


def parse_floor(text: str):
    from engine_builder.precision import PrecisionFloor

    try:
        precision, values = text.split("=")
        mean, minimum, top1 = (float(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PRECISION=MEAN_COSINE,MIN_COSINE,TOP1 (e.g. int8=0.98,0.9,0.8), got {text!r}") from None
    return precision, PrecisionFloor(min_mean_cosine=mean, min_cosine=minimum, min_top1_agreement=top1)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from engine_builder.models import VARIANTS
    from engine_builder.reference_weights import REFERENCE_VARIANT

    parser.add_argument("--variant", default=REFERENCE_VARIANT, choices=sorted(VARIANTS), help="OSNet variant (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help=f"torchreid checkpoint (.pth state_dict or .pth.tar); default: the reference "
                        f"checkpoint for {REFERENCE_VARIANT} (weights/), seeded random weights for other variants")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="Triton max_batch_size and engine profile max (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, help="where precision graphs, reports and plans go (default: build/<variant>)")
    parser.add_argument("--calib-dir", type=Path, help="INT8 calibration images (default: generated people)")
    parser.add_argument("--eval-dir", type=Path, help="held-out images for the precision report (default: generated people)")
    parser.add_argument("--calib-method", default="percentile", choices=["minmax", "percentile", "entropy"], help="INT8 calibration (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    from engine_builder.cpu_runtimes import RUNTIME_CHOICES
    from engine_builder.triton_repository import building_venv

    parser = argparse.ArgumentParser(prog="osnet-build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repository", type=Path, default=Path("triton_repo"), help="output model repository (default: %(default)s)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "fp16", "int8"], help="models to build (default: fp32)")
    parser.add_argument("--instances", type=int, default=1, help="model instances per model (default: %(default)s)")
    parser.add_argument("--intra-op-threads", type=int, help="runtime threads per CPU instance (default: every core for one instance, the cores shared out between several)")
    parser.add_argument("--python-env", type=Path, default=building_venv(),
                        help="the Python environment (a venv folder) the python-backend models run in on the serving "
                             "machine (default: this venv, %(default)s)")
    parser.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIME_CHOICES,
                        help="CPU runtime of the tensor model; auto: the fastest measured here within the floor (default: %(default)s)")
    parser.add_argument("--jit-plugins", action="store_true", help="JIT (Python/CuPy) plugins instead of AOT PTX; served by the python backend")
    parser.add_argument("--floor", type=parse_floor, action="append", default=[], metavar="P=MEAN,MIN,TOP1",
                        help="precision floor, e.g. int8=0.98,0.9,0.8 (defaults in engine_builder/precision.py)")
    return parser


def build_check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osnet-build check-trt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64], help="throughput batch sizes (default: %(default)s)")
    return parser


def resolve_weights(args: argparse.Namespace) -> None:
    from engine_builder.reference_weights import default_weights

    if args.weights is None:
        args.weights = default_weights(args.variant)


def run_build(args: argparse.Namespace) -> int:
    from engine_builder.build import PrecisionBuildSettings, build_cpu_repository, build_precision_graphs
    from engine_builder.cpu_runtimes import RuntimeSelection
    from engine_builder.tensorrt_build import EngineBuildSettings, build_engine, tensorrt_unavailable_reason
    from engine_builder.triton_repository import CpuRepositorySettings, GpuRepositorySettings, write_tensorrt_models

    if "fp32" in args.precision:
        settings = CpuRepositorySettings(max_batch_size=args.max_batch_size, instances=args.instances,
                                         intra_op_threads=args.intra_op_threads, execution_env=args.python_env)
        selection = RuntimeSelection(runtime=args.runtime, eval_dir=args.eval_dir, calib_dir=args.calib_dir)
        build_cpu_repository(args.variant, args.repository, args.weights, settings, selection)
    reduced = tuple(p for p in args.precision if p != "fp32")
    if not reduced:
        return 0
    work_dir = args.work_dir or Path("build") / args.variant
    graphs = build_precision_graphs(
        args.variant, work_dir, args.weights,
        PrecisionBuildSettings(precisions=reduced, calib_dir=args.calib_dir, eval_dir=args.eval_dir,
                               calib_method=args.calib_method, aot_plugins=not args.jit_plugins, floors=dict(args.floor)),
    )
    print(f"precision graphs and report in {work_dir}/ (precision_report.md)")
    reason = tensorrt_unavailable_reason()
    if reason:
        print(f"osnet-build: engines not built: {reason}. The graphs above are what TensorRT >= 10.9 takes; "
              "run the same command where TensorRT and a GPU are (NVIDIA's Triton container).", file=sys.stderr)
        return 0
    engine_settings = EngineBuildSettings(max_batch_size=args.max_batch_size, timing_cache=work_dir / "timing.cache")
    plans = {precision: build_engine(graph, work_dir / f"{precision}.plan", engine_settings, plugins=True)
             for precision, graph in graphs.with_plugins.items()}
    served = write_tensorrt_models(args.repository, args.variant, plans,
                                   GpuRepositorySettings(max_batch_size=args.max_batch_size, instances=args.instances,
                                                         execution_env=args.python_env),
                                   jit_plugins=args.jit_plugins, report_dir=work_dir)
    print(f"engines in {args.repository}/; the `osnet` ensemble runs {served}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from engine_builder.build import PrecisionBuildSettings, build_precision_graphs
    from engine_builder.check_trt import check_engines, format_checks
    from engine_builder.tensorrt_build import TensorRTUnavailableError, tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        raise TensorRTUnavailableError(f"check-trt needs TensorRT and a GPU: {reason}")
    work_dir = args.work_dir or Path("build") / args.variant
    graphs = build_precision_graphs(
        args.variant, work_dir, args.weights,
        PrecisionBuildSettings(calib_dir=args.calib_dir, eval_dir=args.eval_dir, calib_method=args.calib_method),
    )
    print(format_checks(check_engines(graphs, work_dir, args.batch_sizes, args.eval_dir, args.max_batch_size)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    checking = bool(argv) and argv[0] == "check-trt"
    args = (build_check_parser() if checking else build_parser()).parse_args(argv[1:] if checking else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        resolve_weights(args)
        return run_check(args) if checking else run_build(args)
    except (OsnetTritonError, ValueError) as exc:
        print(f"osnet-build: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
