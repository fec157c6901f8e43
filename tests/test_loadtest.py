"""Load tests end to end: build a small repository, serve it, run locust against it, read the reports.

The server tests use osnet_x0_25 (the smallest variant) so the 2-core machine spends its time on the
load generator and the server's plumbing, not on convolutions; the whole file takes about a minute.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from osnet_base.triton_server import TritonServerConfig, TritonServerProcess, find_free_port
from loadtest.cli import main as loadtest_main
from loadtest.report import LoadTestSummary, find_knee, read_run_record, sweep_table
from loadtest.runner import (
    LoadTestError,
    LoadTestSettings,
    SweepSettings,
    format_summary,
    run_load_test,
    run_sweep,
)
from loadtest.workload import ResponseCheckError, build_workload, check_embedding

LOADTEST_VARIANT = "osnet_x0_25"


@pytest.fixture(scope="module")
def loadtest_repository(tmp_path_factory):
    from engine_builder.build import build_cpu_repository
    from engine_builder.cpu_runtimes import BASELINE_RUNTIME, RuntimeSelection

    return build_cpu_repository(LOADTEST_VARIANT, tmp_path_factory.mktemp("loadtest_repo"),
                                selection=RuntimeSelection(runtime=BASELINE_RUNTIME))


@pytest.fixture(scope="module")
def server(loadtest_repository):
    with TritonServerProcess(TritonServerConfig(model_repository=loadtest_repository)) as server:
        yield server


@pytest.fixture(autouse=True)
def no_locust_left_behind(tmp_path):
    yield
    # Our children, and any orphan that ran in this test's folder (locust runs with its output folder as cwd).
    candidates = [*psutil.Process().children(recursive=True), *psutil.process_iter()]
    leftovers = {p.pid for p in candidates if _is_locust(p, tmp_path)}
    assert not leftovers, f"locust processes left running: {sorted(leftovers)}"


def _is_locust(process: psutil.Process, folder: Path) -> bool:
    try:
        command = " ".join(process.cmdline())
        if "locust" not in command:
            return False
        return process.ppid() == psutil.Process().pid or str(folder) in command or process.cwd().startswith(str(folder))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def html_report_stats(html: Path) -> dict:
    """The statistics locust embeds in its HTML report (`window.templateArgs = {...}`), parsed as JSON."""
    text = html.read_text()
    marker = "window.templateArgs = "
    start = text.index(marker) + len(marker)
    args, _ = json.JSONDecoder().raw_decode(text, start)
    return args


def aggregated_row(stats_csv: Path) -> dict[str, str]:
    with stats_csv.open(newline="") as handle:
        return next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")


def unit_rows(count: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, 512)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# --- response checks and settings, no server ---------------------------------------------------


def test_check_embedding_accepts_unit_rows_and_rejects_bad_answers():
    check_embedding(unit_rows(3), 3)
    nan = unit_rows(3)
    nan[1, 7] = np.nan
    for bad, batch, what in [
        (None, 3, "no EMBEDDING"),
        (unit_rows(2), 3, "shape"),
        (unit_rows(3)[:, :256], 3, "shape"),
        (nan, 3, "NaN"),
        (unit_rows(3) * 1.01, 3, "unit-norm"),
        (np.zeros((3, 512), np.float32), 3, "unit-norm"),
    ]:
        with pytest.raises(ResponseCheckError, match=what):
            check_embedding(bad, batch)


def test_workload_cycles_through_distinct_images():
    workload = build_workload(scenario="ensemble", model="osnet", batch_size=4, image_pool=18)
    assert workload.distinct_images == 16 and all(b.shape == (4, 1) for b in workload.batches)
    assert len({image for batch in workload.batches for image in batch[:, 0]}) == 16
    tensors = build_workload(scenario="tensor", model="m", batch_size=2, image_pool=4)
    assert tensors.batches[0].shape == (2, 256, 128, 3) and tensors.batches[0].dtype == np.uint8
    assert not np.array_equal(tensors.batches[0][0], tensors.batches[0][1])


def test_settings_default_to_loopback_and_refuse_nonsense(tmp_path):
    assert LoadTestSettings(output_dir=tmp_path).url.startswith("127.0.0.1:")
    for bad in [
        {"url": "http://127.0.0.1:8001"},
        {"url": "127.0.0.1"},
        {"scenario": "http"},
        {"users": 0},
        {"duration_s": 0},
        {"duration_s": 2.5},
        {"users": 1, "workers": 2},
        {"batch_size": 8, "image_pool": 4},
        {"spawn_rate": 0},
    ]:
        with pytest.raises(ValueError):
            LoadTestSettings(output_dir=tmp_path, **bad)


def step(users: int, images_per_s: float, p99_ms: float, failures: int = 0) -> LoadTestSummary:
    return LoadTestSummary(
        scenario="ensemble", model="osnet", url="127.0.0.1:8001", batch_size=1, users=users, workers=0,
        duration_s=20, elapsed_s=20.0, requests=100, failures=failures, requests_per_s=images_per_s,
        images_per_s=images_per_s, p50_ms=p99_ms / 2, p90_ms=p99_ms, p99_ms=p99_ms, mean_ms=p99_ms / 2,
        max_ms=p99_ms, exit_code=1 if failures else 0,
    )  # fmt: skip


def test_knee_is_the_most_throughput_under_the_objective_without_failures():
    steps = [step(1, 20, 40), step(2, 35, 70), step(4, 50, 95, failures=3), step(8, 52, 180)]
    assert find_knee(steps, 100.0).users == 2
    assert find_knee(steps, 200.0).users == 8
    assert find_knee(steps, 30.0) is None
    assert "| 4 | 50.0 | 48 | 95 | 3 |" in sweep_table(steps)


def test_no_server_at_the_url_is_a_clear_error_not_a_run(tmp_path):
    settings = LoadTestSettings(output_dir=tmp_path, url=f"127.0.0.1:{find_free_port()}", duration_s=5, request_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(LoadTestError, match="failed before the load test"):
        run_load_test(settings)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "locust.log").exists()


# --- against a real server ---------------------------------------------------------------------


@pytest.mark.server
def test_headless_run_writes_reports_that_parse(server, tmp_path):
    summary = run_load_test(LoadTestSettings(output_dir=tmp_path, url=server.grpc_url, users=2, duration_s=10))

    assert summary.passed, format_summary(summary)
    assert summary.failures == 0 and summary.requests > 0 and summary.images_per_s > 0
    assert summary.p50_ms <= summary.p90_ms <= summary.p99_ms <= summary.max_ms
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["requests"] == summary.requests and saved["passed"] is True
    assert {"requests_per_s", "images_per_s", "p50_ms", "p90_ms", "p99_ms", "failures"} <= saved.keys()

    # locust's own files hold the final numbers, equal to the summary's.
    row = aggregated_row(tmp_path / "locust_stats.csv")
    assert int(row["Request Count"]) == summary.requests and int(row["Failure Count"]) == 0
    with (tmp_path / "locust_stats_history.csv").open(newline="") as handle:
        assert len([r for r in csv.DictReader(handle) if r["Name"] == "Aggregated"]) >= 5
    per_second = read_run_record(tmp_path / "locust_run.json").per_second  # what the plot draws
    assert sum(requests for requests, _ in per_second.values()) == summary.requests
    report = html_report_stats(tmp_path / "report.html")
    assert report["requests_statistics"][-1]["num_requests"] == summary.requests
    assert report["host"] == server.grpc_url

    with Image.open(tmp_path / "throughput_latency.png") as plot:
        plot.verify()
        assert plot.format == "PNG" and plot.size[0] > 400
    assert "PASSED" in format_summary(summary)


@pytest.mark.server
def test_distributed_run_counts_requests_from_every_worker(server, tmp_path):
    status = loadtest_main([
        "run", "--url", server.grpc_url, "--scenario", "tensor", "--batch-size", "4",
        "--users", "2", "--workers", "2", "--duration-s", "8", "--output", str(tmp_path),
    ])  # fmt: skip

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert status == 0, summary
    assert summary["model"] == f"{LOADTEST_VARIANT}_fp32"  # found on the server: the tensor scenario named none
    by_worker = summary["requests_by_worker"]
    assert len(by_worker) == 2 and min(by_worker.values()) > 0, by_worker
    assert sum(by_worker.values()) == summary["requests"] > 0
    assert summary["images_per_s"] == pytest.approx(4 * summary["requests_per_s"], rel=1e-3)


@pytest.mark.server
def test_sweep_reports_each_step_and_the_knee(server, tmp_path):
    base = LoadTestSettings(output_dir=tmp_path, url=server.grpc_url, duration_s=3)
    result = run_sweep(SweepSettings(base=base, user_counts=(1, 2), p99_objective_ms=10_000))

    assert [s.users for s in result.steps] == [1, 2] and all(s.passed for s in result.steps)
    assert result.knee is max(result.steps, key=lambda s: s.images_per_s)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["knee_users"] == result.knee.users and len(saved["steps"]) == 2
    assert "knee:" in (tmp_path / "sweep.md").read_text()
    with Image.open(tmp_path / "sweep.png") as plot:
        plot.verify()
    assert (tmp_path / "users-2" / "summary.json").is_file()


@pytest.mark.server
def test_a_run_past_its_deadline_is_killed_and_fails(server, tmp_path):
    # After its run time locust still pauses 1.25 s for its CSV writer, so it always overruns 0.1 s of grace.
    settings = LoadTestSettings(output_dir=tmp_path, url=server.grpc_url, users=1, duration_s=3, grace_s=0.1)
    started = time.monotonic()
    summary = run_load_test(settings)
    elapsed_s = time.monotonic() - started

    assert summary.timed_out and summary.exit_code is None and not summary.passed
    # The deadline, then SIGTERM (locust writes its CSVs) and at worst SIGKILL, 5 s apart; plus the preflight.
    assert elapsed_s < settings.deadline_s + 12
    assert json.loads((tmp_path / "summary.json").read_text())["timed_out"] is True


@pytest.mark.server
def test_unknown_model_fails_before_the_run(server, tmp_path):
    with pytest.raises(LoadTestError, match="does not serve model 'osnet_x9_fp32'.*osnet"):
        run_load_test(LoadTestSettings(output_dir=tmp_path, url=server.grpc_url, scenario="tensor", model="osnet_x9_fp32"))


@pytest.mark.server
def test_server_stopped_mid_run_ends_on_time_with_failures(loadtest_repository, tmp_path):
    duration_s, grace_s = 10, 15
    with TritonServerProcess(TritonServerConfig(model_repository=loadtest_repository)) as doomed:
        command = [
            sys.executable, "-m", "loadtest.cli", "run", "--url", doomed.grpc_url, "--users", "2",
            "--duration-s", str(duration_s), "--grace-s", str(grace_s), "--output", str(tmp_path),
        ]  # fmt: skip
        started = time.monotonic()
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            history = tmp_path / "locust_stats_history.csv"
            # Stop the server once requests are being answered, well inside the run.
            while time.monotonic() - started < duration_s and not (history.is_file() and _answered(history) > 0):
                time.sleep(0.2)
            doomed.stop()
            output, _ = run.communicate(timeout=duration_s + grace_s + 15)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    elapsed_s = time.monotonic() - started

    assert run.returncode != 0, output
    assert elapsed_s < duration_s + grace_s, output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"] > 0 and summary["requests"] > summary["failures"] and not summary["passed"]
    assert not summary["timed_out"]
    assert "UNAVAILABLE" in " ".join(summary["failure_messages"]), summary["failure_messages"]
    assert "FAILED" in output


def _answered(history_csv: Path) -> int:
    with history_csv.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Name") == "Aggregated"]
    return int(rows[-1]["Total Request Count"]) if rows else 0
