"""osnet-build and osnet-check-trt: OSNet (torchreid weights) into a Triton model repository, and
whether the fused TensorRT plugins earn their place on this GPU.

  osnet-build [--variant V] [--weights W] [--precision fp32 fp16 int8] ...
      fp32: exports ONNX (checked against PyTorch) and writes `preprocess`, the CPU tensor model and
      the `osnet` ensemble. The CPU tensor model is `<variant>_fp32|bf16|int8`, served by the runtime
      --runtime names; `auto` measures the candidates here and serves the fastest within the precision
      floor, and `<model>/runtime_choice.md` says why. fp16 / int8: makes the precision graphs,
      writes their precision report (failing below the floor), rewrites them to the fused plugins
      (checked on CPU), and with TensorRT >= 10.9 and a GPU builds `<variant>_trt_fp16|int8` engines
      and points the `osnet` ensemble at INT8 (else FP16).
  osnet-check-trt [--variant V] ...
      with TensorRT and a GPU: engines with and without the fused plugins, cosine and img/s side by side.
Serve with: tritonserver --model-repository <repository>

Both tools parse the same argument groups into one `BuildSettings`, which refuses a setting it
cannot honour before any work starts.
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

    group = parser.add_argument_group("model")
    group.add_argument("--variant", default=REFERENCE_VARIANT, choices=sorted(VARIANTS), help="OSNet variant (default: %(default)s)")
    group.add_argument("--weights", type=Path, help=f"torchreid checkpoint (.pth state_dict or .pth.tar); default: the reference "
                       f"checkpoint for {REFERENCE_VARIANT} (weights/), seeded random weights for other variants")
    group.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                       help="Triton max_batch_size and engine profile max (default: %(default)s)")


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    from engine_builder.precision import CALIBRATION_METHODS, CPU_CALIBRATION_METHOD, TENSORRT_CALIBRATION_METHOD

    group = parser.add_argument_group("reduced precision")
    group.add_argument("--work-dir", type=Path, help="where precision graphs, reports and plans go (default: build/<variant>)")
    group.add_argument("--calib-dir", type=Path, help="INT8 calibration images (default: generated people)")
    group.add_argument("--eval-dir", type=Path, help="held-out images for the precision reports (default: generated people)")
    group.add_argument("--calib-method", choices=CALIBRATION_METHODS,
                       help=f"INT8 calibration of every INT8 graph, CPU and TensorRT (default: {CPU_CALIBRATION_METHOD} "
                            f"for the CPU graph, {TENSORRT_CALIBRATION_METHOD} for TensorRT's)")
    group.add_argument("--floor", type=parse_floor, action="append", default=[], metavar="P=MEAN,MIN,TOP1",
                       help="precision floor, e.g. int8=0.98,0.9,0.8 (defaults in engine_builder/precision.py)")


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    from engine_builder.build import PRECISIONS
    from engine_builder.cpu_runtimes import RUNTIME_CHOICES
    from engine_builder.triton_repository import building_venv
    from osnet_base.image_decoding import DEFAULT_BUDGETS

    group = parser.add_argument_group("serving")
    group.add_argument("--repository", type=Path, default=Path("triton_repo"), help="output model repository (default: %(default)s)")
    group.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS, help="models to build (default: fp32)")
    group.add_argument("--instances", type=int, default=1,
                       help="instances of the tensor model, CPU or TensorRT (default: %(default)s; preprocess: --preprocess-instances)")
    group.add_argument("--intra-op-threads", type=int,
                       help="runtime threads per CPU instance (default: every core for one instance, the cores shared out between several)")
    group.add_argument("--python-env", type=Path, default=building_venv(),
                       help="the Python environment (a venv folder) the python-backend models run in on the serving "
                            "machine (default: this venv, %(default)s)")
    group.add_argument("--runtime", default=DEFAULT_RUNTIME, choices=RUNTIME_CHOICES,
                       help="CPU runtime of the tensor model; auto: the fastest measured here within the floor (default: %(default)s)")
    group.add_argument("--jit-plugins", action="store_true", help="JIT (Python/CuPy) plugins instead of AOT PTX; served by the python backend")
    budgets = parser.add_argument_group("preprocessor", "what one request may make `preprocess` decode (defaults measured, see "
                                        "osnet_base/image_decoding.py), and how many threads decode")
    budgets.add_argument("--max-image-bytes", type=int, default=DEFAULT_BUDGETS.max_image_bytes, help="encoded bytes per image (default: %(default)s)")
    budgets.add_argument("--max-image-pixels", type=int, default=DEFAULT_BUDGETS.max_image_pixels, help="pixels per image (default: %(default)s)")
    budgets.add_argument("--max-request-pixels", type=int, default=DEFAULT_BUDGETS.max_request_pixels, help="pixels per request (default: %(default)s)")
    budgets.add_argument("--preprocess-instances", type=int, help="preprocess instances (default: one per 4 cores)")
    budgets.add_argument("--decode-threads", type=int, help="decode threads per preprocess instance (default: the cores shared out)")


def build_settings(args: argparse.Namespace, **fixed):
    """The BuildSettings of parsed `args`: the groups a tool added, then `fixed` values."""
    from engine_builder.build import BuildSettings

    from_args = {name: getattr(args, name) for name in (
        "variant", "weights", "max_batch_size", "work_dir", "calib_dir", "eval_dir", "calib_method", "repository",
        "instances", "intra_op_threads", "python_env", "runtime", "jit_plugins", "max_image_bytes", "max_image_pixels",
        "max_request_pixels", "preprocess_instances", "decode_threads") if hasattr(args, name)}
    if hasattr(args, "precision"):
        from_args["precisions"] = tuple(dict.fromkeys(args.precision))
    if hasattr(args, "floor"):
        from_args["floors"] = dict(args.floor)
    return BuildSettings(**from_args, **fixed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osnet-build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_serving_arguments(parser)
    add_precision_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def build_check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osnet-check-trt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_precision_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64], help="throughput batch sizes (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def run_build(args: argparse.Namespace) -> int:
    from engine_builder.build import build_repository

    settings = build_settings(args)
    result = build_repository(settings)
    if result.work_dir is not None:
        print(f"precision graphs and report in {result.work_dir}/ (precision_report.md)")
    if result.engines_skipped:
        print(f"osnet-build: engines not built: {result.engines_skipped}. The graphs above are what TensorRT >= 10.9 "
              "takes; run the same command where TensorRT and a GPU are (NVIDIA's Triton container).", file=sys.stderr)
    if result.served:
        print(f"repository {settings.repository}/: the `osnet` ensemble runs {result.served}; "
              f"serve it with: tritonserver --model-repository {settings.repository}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from engine_builder.build import build_precision_graphs
    from engine_builder.check_trt import check_engines, format_checks
    from engine_builder.tensorrt_build import TensorRTUnavailableError, engine_build_unavailable_reason

    settings = build_settings(args, precisions=("fp16", "int8"))
    reason = engine_build_unavailable_reason()
    if reason:
        raise TensorRTUnavailableError(f"check-trt needs TensorRT and a GPU, or TensorRT-RTX: {reason}")
    work_dir = settings.resolved_work_dir()
    graphs = build_precision_graphs(settings.variant, work_dir, settings.resolved_weights(), settings.precision_build())
    print(format_checks(check_engines(graphs, work_dir, args.batch_sizes, settings.eval_dir, settings.engine_build())))
    return 0


def _run(tool: str, parser: argparse.ArgumentParser, run, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (OsnetTritonError, ValueError) as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return _run("osnet-build", build_parser(), run_build, argv)


def check_trt_main(argv: list[str] | None = None) -> int:
    return _run("osnet-check-trt", build_check_parser(), run_check, argv)


if __name__ == "__main__":
    sys.exit(main())
