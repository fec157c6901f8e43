"""Reports of a load test: `summary.json`, a throughput/latency plot, and a sweep's knee.

Everything here reads the files locust wrote (`<prefix>_stats.csv`, `_stats_history.csv`,
`_failures.csv`) and the record our locustfile adds (`_run.json`: requests per second and per
worker, and locust's CPU warning). Nothing imports locust, whose import monkey-patches the standard library with
gevent; matplotlib is imported only to plot.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

AGGREGATED_ROW = "Aggregated"
MAX_FAILURE_MESSAGES = 5


@dataclass(frozen=True, kw_only=True)
class LoadTestSummary:
    """What one run measured. Latencies are locust's (rounded like its report); `None` when nothing was measured."""

    scenario: str
    model: str
    url: str
    batch_size: int
    users: int
    workers: int
    duration_s: int  # asked for
    elapsed_s: float  # first to last request, as locust measured it
    requests: int
    failures: int
    requests_per_s: float
    images_per_s: float  # images in correct answers per second
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    failure_messages: tuple[str, ...] = ()
    requests_by_worker: dict[str, int] = field(default_factory=dict)
    answered_by_server: dict[str, int] = field(default_factory=dict)  # several --url servers only
    generator_cpu_warning: bool = False  # the load generator ran above 90% CPU: it may be what limited the numbers
    exit_code: int | None = None  # locust's; None when it had to be killed
    timed_out: bool = False
    output_dir: str = ""
    files: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Requests were answered, none failed, and locust finished on its own with status 0."""
        return self.requests > 0 and self.failures == 0 and not self.timed_out and self.exit_code == 0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)


@dataclass(frozen=True)
class LocustTotals:
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None


def _number(text: str | None) -> float | None:
    # locust writes "N/A" for percentiles of an entry without requests.
    try:
        value = float(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None
    return value if value is None or math.isfinite(value) else None


def read_totals(stats_csv: Path) -> LocustTotals:
    """The `Aggregated` row of locust's `_stats.csv`; zero requests when locust measured none."""
    with stats_csv.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Name") == AGGREGATED_ROW]
    if not rows:
        return LocustTotals(0, 0, 0.0, None, None, None, None, None)
    row = rows[-1]
    requests = int(row["Request Count"])
    return LocustTotals(
        requests=requests,
        failures=int(row["Failure Count"]),
        requests_per_s=_number(row["Requests/s"]) or 0.0,
        p50_ms=_number(row["50%"]) if requests else None,
        p90_ms=_number(row["90%"]) if requests else None,
        p99_ms=_number(row["99%"]) if requests else None,
        mean_ms=_number(row["Average Response Time"]) if requests else None,
        max_ms=_number(row["Max Response Time"]) if requests else None,
    )


def read_failure_messages(failures_csv: Path, limit: int = MAX_FAILURE_MESSAGES) -> tuple[str, ...]:
    """The most frequent failures of `_failures.csv` as "N x message"."""
    if not failures_csv.is_file():
        return ()
    with failures_csv.open(newline="") as handle:
        rows = [(int(row["Occurrences"]), row["Error"]) for row in csv.DictReader(handle)]
    rows.sort(key=lambda item: -item[0])
    return tuple(f"{count} x {message}" for count, message in rows[:limit])


@dataclass(frozen=True)
class RunRecord:
    """What our locustfile adds to locust's files at the end of a run."""

    per_second: dict[int, tuple[int, int]]  # unix second -> (requests, failures) completed in it
    requests_by_worker: dict[str, int]  # distributed runs only
    answered_by_server: dict[str, int]  # runs against several servers only
    generator_cpu_warning: bool  # locust saw one of its processes above 90% CPU


def read_run_record(run_json: Path) -> RunRecord:
    """The record, or an empty one when locust was killed before writing it."""
    if not run_json.is_file():
        return RunRecord(per_second={}, requests_by_worker={}, answered_by_server={}, generator_cpu_warning=False)
    data = json.loads(run_json.read_text())
    counts = data.get("per_second", {})
    failures = {int(second): int(n) for second, n in counts.get("failures", {}).items()}
    return RunRecord(
        per_second={int(second): (int(n), failures.get(int(second), 0)) for second, n in counts.get("requests", {}).items()},
        requests_by_worker={str(worker): int(n) for worker, n in data.get("requests_by_worker", {}).items()},
        answered_by_server={str(url): int(n) for url, n in data.get("answered_by_server", {}).items()},
        generator_cpu_warning=bool(data.get("generator_cpu_warning", False)),
    )


@dataclass(frozen=True)
class HistoryRow:
    unix_s: int
    users: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


def read_history(history_csv: Path) -> list[HistoryRow]:
    """The `Aggregated` rows of `_stats_history.csv`: about one a second, latencies over a trailing 10 s."""
    if not history_csv.is_file():
        return []
    with history_csv.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Name") == AGGREGATED_ROW]
    if not rows:
        return []
    return [
        HistoryRow(
            unix_s=int(row["Timestamp"]),
            users=int(row["User Count"]),
            p50_ms=_number(row["50%"]),
            p90_ms=_number(row["90%"]),
            p99_ms=_number(row["99%"]),
        )
        for row in rows
    ]


def plot_run(
    history_csv: Path,
    run_json: Path,
    png: Path,
    *,
    batch_size: int,
    title: str,
    p99_objective_ms: float | None = None,
) -> Path:
    """Throughput (images/s, failures/s, users) above latency (p50, p90, p99) over the run's time."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    history = read_history(history_csv)
    per_second = read_run_record(run_json).per_second
    figure = Figure(figsize=(9, 6), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    figure.suptitle(title)
    start = min([*per_second, *([history[0].unix_s] if history else [])], default=0)
    # The first and last seconds are partial (spawning, stopping): drawn, they would show a ramp and
    # a cliff that no user saw.
    seconds = sorted(per_second)[1:-1] if len(per_second) > 2 else sorted(per_second)
    if seconds:
        times = [second - start + 0.5 for second in seconds]  # a second's count, drawn at its middle
        images = [(per_second[s][0] - per_second[s][1]) * batch_size for s in seconds]
        failures = [per_second[s][1] for s in seconds]
        top.plot(times, images, color="tab:blue", label="images/s")
        if any(failures):
            top.plot(times, failures, color="tab:red", label="failures/s")
        top.set_ylim(0, 1.15 * max(*images, *failures, 1))  # headroom, so peaks do not hide under the frame
    if history:
        times = [row.unix_s - start for row in history]
        users_axis = top.twinx()
        users_axis.step(times, [row.users for row in history], where="post", color="tab:gray", alpha=0.6, label="users")
        users_axis.set_ylabel("users")
        users_axis.set_ylim(bottom=0)
        users_axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        for name, color in (("p50_ms", "tab:green"), ("p90_ms", "tab:orange"), ("p99_ms", "tab:red")):
            values = [getattr(row, name) for row in history]
            bottom.plot(times, [math.nan if v is None else v for v in values], color=color, label=name[:3])
        handles, labels = top.get_legend_handles_labels()
        extra_handles, extra_labels = users_axis.get_legend_handles_labels()
        top.legend(handles + extra_handles, labels + extra_labels, loc="lower right")
    if p99_objective_ms is not None:
        bottom.axhline(p99_objective_ms, color="tab:red", linestyle="--", linewidth=1, label="p99 objective")
    if history or p99_objective_ms is not None:
        bottom.legend(loc="upper right")
    if not seconds and not history:
        top.text(0.5, 0.5, "no statistics were recorded", ha="center", va="center", transform=top.transAxes)
    top.set_ylabel("per second")
    if not seconds:
        top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    bottom.set_ylabel("latency, ms (trailing 10 s)")
    bottom.set_xlabel("time since start, s")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    return png


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def format_summary(summary: LoadTestSummary) -> str:
    """A few lines for a terminal: what ran, how fast, how slow at the tail, and whether it passed."""
    workers = f", {summary.workers} workers" if summary.workers else ""
    failed_share = 100.0 * summary.failures / summary.requests if summary.requests else 0.0
    lines = [
        f"load test: {summary.model} ({summary.scenario}, batch {summary.batch_size}) at {summary.url}, "
        f"{summary.users} users{workers}, {summary.duration_s} s",
        f"  requests  {summary.requests} ({summary.failures} failed, {failed_share:.1f}%)   "
        f"{summary.requests_per_s:.1f} requests/s   {summary.images_per_s:.1f} images/s",
        f"  latency   p50 {_ms(summary.p50_ms)}   p90 {_ms(summary.p90_ms)}   p99 {_ms(summary.p99_ms)}   "
        f"(mean {_ms(summary.mean_ms)}, max {_ms(summary.max_ms)})",
    ]
    if summary.requests_by_worker:
        counts = ", ".join(str(count) for count in summary.requests_by_worker.values())
        lines.append(f"  workers   requests per worker: {counts}")
    if summary.answered_by_server:
        counts = ", ".join(f"{url} {count}" for url, count in summary.answered_by_server.items())
        lines.append(f"  servers   answered by each: {counts}")
    lines += [f"  failure   {message}" for message in summary.failure_messages]
    if summary.generator_cpu_warning:
        lines.append("  note      the load generator ran above 90% CPU, so it may have limited these numbers (try --workers)")
    if summary.timed_out:
        lines.append("  locust did not finish in time and was killed; the numbers cover what it wrote before")
    lines.append(f"  report    {summary.files.get('html', '')}  (and summary.json, CSVs, plot in {summary.output_dir})")
    lines.append(f"  result    {'PASSED' if summary.passed else 'FAILED'}")
    return "\n".join(lines)


def find_knee(steps: Sequence[LoadTestSummary], p99_objective_ms: float) -> LoadTestSummary | None:
    """The clean step (no failures) with the most images/s whose p99 stays under the objective."""
    eligible = [s for s in steps if s.passed and s.p99_ms is not None and s.p99_ms < p99_objective_ms]
    return max(eligible, key=lambda s: s.images_per_s, default=None)


def sweep_table(steps: Sequence[LoadTestSummary]) -> str:
    """A markdown table of the steps, as pasted into the README."""
    lines = ["| users | images/s | p50 ms | p99 ms | failures |", "| ---: | ---: | ---: | ---: | ---: |"]
    for step in steps:
        p50 = "n/a" if step.p50_ms is None else f"{step.p50_ms:.0f}"
        p99 = "n/a" if step.p99_ms is None else f"{step.p99_ms:.0f}"
        lines.append(f"| {step.users} | {step.images_per_s:.1f} | {p50} | {p99} | {step.failures} |")
    return "\n".join(lines)


def plot_sweep(steps: Sequence[LoadTestSummary], png: Path, *, p99_objective_ms: float, knee: LoadTestSummary | None, title: str) -> Path:
    """Images/s and p99 against the user count, with the objective and the knee marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="constrained")
    throughput = figure.subplots()
    figure.suptitle(title)
    users = [s.users for s in steps]
    throughput.plot(users, [s.images_per_s for s in steps], marker="o", color="tab:blue", label="images/s")
    throughput.set_xlabel("users (requests in flight)")
    throughput.set_ylabel("images/s", color="tab:blue")
    throughput.set_ylim(bottom=0)
    throughput.set_xscale("log", base=2)
    throughput.set_xticks(users, [str(u) for u in users])
    throughput.grid(alpha=0.3)
    latency = throughput.twinx()
    latency.plot(users, [math.nan if s.p99_ms is None else s.p99_ms for s in steps], marker="s", color="tab:red", label="p99")
    latency.axhline(p99_objective_ms, color="tab:red", linestyle="--", linewidth=1, label=f"p99 objective {p99_objective_ms:g} ms")
    latency.set_ylabel("p99 latency, ms", color="tab:red")
    latency.set_ylim(bottom=0)
    if knee is not None:
        throughput.plot([knee.users], [knee.images_per_s], marker="o", markersize=14, fillstyle="none", color="black")
        throughput.annotate(
            f"knee: {knee.images_per_s:.1f} images/s", (knee.users, knee.images_per_s),
            xytext=(10, -18), textcoords="offset points", ha="left",
        )
    handles, labels = throughput.get_legend_handles_labels()
    extra_handles, extra_labels = latency.get_legend_handles_labels()
    throughput.legend(handles + extra_handles, labels + extra_labels, loc="lower right")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    return png
