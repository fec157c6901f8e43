"""osnet-loadtest: locust load tests of the served models over gRPC, with reports people read.

  run     one headless run: locust's CSV and HTML report, summary.json, throughput/latency plot
  sweep   one run per user count, then the knee: the most images/s whose p99 stays under an objective

Every run is bounded in time and targets 127.0.0.1:8001 unless --url names another server.
Exit status: 0 when every request was answered correctly (and, for sweep, a knee was found), else 1.

  osnet-loadtest run --users 4 --duration-s 20
  osnet-loadtest sweep --users 1,2,4,8 --duration-s 20 --p99-objective-ms 100
  osnet-loadtest run --scenario tensor --batch-size 8 --users 2 --workers 2
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from osnet_base.arguments import add_dataclass_arguments, dataclass_from_arguments
from osnet_base.errors import OsnetTritonError

DEFAULT_OUTPUT_ROOT = Path("loadtest_output")


def _user_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated user counts such as 1,2,4,8, got {text!r}") from None
    if not counts:
        raise argparse.ArgumentTypeError("expected at least one user count")
    return counts


# What each LoadTestSettings field means to someone at a terminal; the flags, types and defaults are the dataclass's.
FLAG_HELP = {
    "url": "Triton gRPC host:port; several comma-separated share the load (least-loaded healthy server, one retry elsewhere)",
    "scenario": "ensemble: JPEG bytes to the `osnet` ensemble; tensor: uint8 pixels to the tensor model",
    "model": "model to call (None: osnet for ensemble; the one served tensor model for tensor)",
    "batch_size": "images per request",
    "spawn_rate": "users started per second (None: all within the first second)",
    "duration_s": "seconds of load per run",
    "workers": "locust worker processes under one master; 0 runs a single process",
    "image_pool": "distinct images cycled through",
    "request_timeout_s": "deadline of one call",
    "grace_s": "time beyond --duration-s allowed to start and stop before everything is killed",
    "check_target": "one real request before the run, for a clear error instead of a run of failures",
    "check_answers": "ask the first server for every request's answer before the run, and fail any answer that differs",
}


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    from loadtest.runner import LoadTestSettings

    group = parser.add_argument_group("load test")
    add_dataclass_arguments(group, LoadTestSettings, exclude=("output_dir", "users"), help=FLAG_HELP)
    group.add_argument("--output", type=Path, help=f"report folder (default: {DEFAULT_OUTPUT_ROOT}/<command>-<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osnet-loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="one headless load test", description="One headless locust run against Triton over gRPC.")
    add_settings_arguments(run)
    run.add_argument("--users", type=int, default=4, help="concurrent closed-loop users = requests in flight (default: %(default)s)")
    run.set_defaults(run=run_once)
    sweep = commands.add_parser("sweep", help="step the user count and report the knee",
                                description="One run per user count; the knee is the most images/s whose p99 stays under the objective.")  # fmt: skip
    add_settings_arguments(sweep)
    sweep.add_argument("--users", type=_user_counts, default=[1, 2, 4, 8], help="comma-separated user counts (default: 1,2,4,8)")
    sweep.add_argument("--p99-objective-ms", type=float, default=100.0, help="latency objective for the knee (default: %(default)s)")
    sweep.set_defaults(run=run_sweep_command)
    return parser


def load_settings(args: argparse.Namespace, users: int):
    from loadtest.runner import LoadTestSettings

    output = args.output or DEFAULT_OUTPUT_ROOT / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    return dataclass_from_arguments(LoadTestSettings, args, output_dir=output, users=users)


def run_once(args: argparse.Namespace) -> int:
    from loadtest.runner import format_summary, run_load_test

    summary = run_load_test(load_settings(args, args.users))
    print(format_summary(summary))
    return 0 if summary.passed else 1


def run_sweep_command(args: argparse.Namespace) -> int:
    from loadtest.runner import SweepSettings, format_sweep, run_sweep

    # A distributed sweep step cannot have more workers than users: steps use min(workers, users).
    base = load_settings(args, max(args.users))
    result = run_sweep(SweepSettings(base=base, user_counts=args.users, p99_objective_ms=args.p99_objective_ms))
    print(format_sweep(result))
    print(f"reports: {result.files['table']}, {result.files['plot']}, and one folder per step")
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (OsnetTritonError, ValueError) as exc:
        print(f"osnet-loadtest: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
