"""Load tests of the served models: locust over gRPC, with reports people read.

- `loadtest.locustfile`: the locust User (gevent-patched gRPC through tritonclient).
- `loadtest.workload`: what a request sends (a pool of distinct crops) and how an answer is checked.
- `loadtest.runner`: `run_load_test(LoadTestSettings(...)) -> LoadTestSummary` and `run_sweep`,
  which run locust as bounded subprocesses (optionally one master and N local workers).
- `loadtest.report`: `summary.json`, the throughput/latency plot and the sweep's knee.
- `loadtest.cli`: the `osnet-loadtest` command (`run`, `sweep`).

Nothing heavy is imported here, so `import loadtest` stays cheap.
"""
