"""CPU runtimes: choosing one by measurement, and serving each from a real tritonserver.

The selection rules are pure functions tested on made-up measurements; the served tests build
osnet_x0_25 (the smallest variant) so the 2-core machine spends its time on plumbing.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from client.embedding_client import EmbeddingClient
from osnet_base.triton_server import TritonServerConfig, TritonServerProcess
from engine_builder.cli import build_parser
from engine_builder.cpu_runtimes import (
    BASELINE_RUNTIME,
    RUNTIMES,
    SERVING_FLOOR,
    RuntimeChoice,
    RuntimeMeasurement,
    RuntimeSelection,
    RuntimeSelectionError,
    RuntimeUnavailableError,
    available_runtimes,
    choose_runtime,
    cpu_capabilities,
    openvino_installed,
    read_runtime_choice,
    resolve_candidates,
    unavailable_reason,
    write_runtime_choice,
)
from engine_builder.precision import PrecisionFloor
from engine_builder.triton_repository import (
    CPU_TENSOR_MODEL_SOURCE,
    CpuRepositorySettings,
    cpu_tensor_model_config,
    served_tensor_model,
    tensor_model_name,
    write_model,
)

VARIANT = "osnet_x0_25"
NO_BF16 = frozenset({"FP32", "INT8", "BIN", "WINOGRAD", "EXPORT_IMPORT"})
needs_openvino = pytest.mark.skipif(not openvino_installed(), reason="OpenVINO is not installed")


def measured(runtime: str, images_per_s: float | None, mean_cosine: float = 1.0, min_cosine: float = 1.0,
             within_floor: bool = True, error: str | None = None) -> RuntimeMeasurement:
    return RuntimeMeasurement(runtime=runtime, precision=RUNTIMES[runtime].precision, images_per_s=images_per_s,
                              batch_size=32, mean_cosine=mean_cosine, min_cosine=min_cosine, top1_agreement=1.0,
                              within_floor=within_floor, error=error)


# --- choosing -------------------------------------------------------------------------------------

def test_the_fastest_within_the_floor_is_chosen_and_the_reason_says_why():
    chosen, reason = choose_runtime([
        measured("onnxruntime-fp32", 82.0),
        measured("openvino-fp32", 51.0),
        measured("openvino-bf16", 217.0, mean_cosine=0.99999),
        measured("openvino-int8", 150.0, mean_cosine=0.9995),
    ], SERVING_FLOOR)
    assert chosen == "openvino-bf16"
    assert "217.0 img/s" in reason and "2.65x onnxruntime-fp32" in reason and "fastest of 4" in reason


def test_a_candidate_under_the_floor_is_never_chosen_however_fast():
    chosen, reason = choose_runtime([
        measured("onnxruntime-fp32", 82.0),
        measured("openvino-int8", 900.0, mean_cosine=0.97, min_cosine=0.8, within_floor=False),
        measured("openvino-bf16", None, error="RuntimeError: no bf16 kernels\nstack"),
    ], SERVING_FLOOR)
    assert chosen == "onnxruntime-fp32"
    assert "openvino-int8 below the floor (mean cosine 0.970000" in reason and "openvino-bf16 failed (RuntimeError" in reason


def test_a_more_precise_candidate_within_the_margin_is_kept():
    chosen, reason = choose_runtime([measured("openvino-bf16", 200.0), measured("openvino-int8", 205.0, mean_cosine=0.9995)],
                                    SERVING_FLOOR, margin=0.05)
    assert chosen == "openvino-bf16" and "openvino-int8 was 2.5% faster" in reason
    chosen, _ = choose_runtime([measured("openvino-bf16", 200.0), measured("openvino-int8", 230.0, mean_cosine=0.9995)],
                               SERVING_FLOOR, margin=0.05)
    assert chosen == "openvino-int8"


def test_without_bf16_the_choice_is_never_slower_than_onnxruntime_fp32():
    candidates = [runtime.name for runtime in available_runtimes(NO_BF16, has_openvino=True)]
    assert "openvino-bf16" not in candidates and BASELINE_RUNTIME in candidates
    rng = np.random.default_rng(0)
    for _ in range(500):
        measurements = [measured(name, float(rng.uniform(10, 300)), within_floor=bool(rng.random() < 0.7) or name == BASELINE_RUNTIME)
                        for name in candidates]
        chosen, _ = choose_runtime(measurements, SERVING_FLOOR)
        speed = {m.runtime: m.images_per_s for m in measurements}
        assert speed[chosen] >= speed[BASELINE_RUNTIME]
        assert next(m for m in measurements if m.runtime == chosen).within_floor


def test_no_candidate_within_the_floor_is_an_error_naming_each():
    with pytest.raises(RuntimeSelectionError, match="onnxruntime-int8 below the floor.*openvino-fp32 failed"):
        choose_runtime([measured("onnxruntime-int8", 50.0, mean_cosine=0.9, within_floor=False),
                        measured("openvino-fp32", None, error="boom")], SERVING_FLOOR)


def test_bf16_needs_the_cpu_capability_and_openvino_needs_installing():
    assert "no BF16" in unavailable_reason(RUNTIMES["openvino-bf16"], NO_BF16, has_openvino=True)
    assert unavailable_reason(RUNTIMES["openvino-bf16"], NO_BF16 | {"BF16"}, has_openvino=True) is None
    assert unavailable_reason(RUNTIMES["openvino-fp32"], NO_BF16, has_openvino=False) == "OpenVINO is not installed"
    assert [r.name for r in available_runtimes(frozenset(), has_openvino=False)] == ["onnxruntime-fp32", "onnxruntime-int8"]


def test_an_explicit_runtime_that_cannot_run_here_is_refused_and_auto_skips_it():
    with pytest.raises(RuntimeUnavailableError, match="openvino-bf16 cannot run here: this CPU has no BF16"):
        resolve_candidates(RuntimeSelection(runtime="openvino-bf16"), NO_BF16, has_openvino=True)
    auto = resolve_candidates(RuntimeSelection(runtime="auto"), NO_BF16, has_openvino=True)
    assert [r.name for r in auto] == ["onnxruntime-fp32", "openvino-fp32", "onnxruntime-int8", "openvino-int8"]


@pytest.mark.parametrize("bad", [{"runtime": "tensorflow"}, {"runtime": "auto", "candidates": ()},
                                 {"runtime": "auto", "candidates": ("openvino-fp16",)}, {"seconds_per_candidate": -1},
                                 {"calibration_method": "guess"}])
def test_selection_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        RuntimeSelection(**bad)


def test_the_choice_record_is_written_beside_the_model(tmp_path):
    measurements = (measured("onnxruntime-fp32", 82.0), measured("openvino-bf16", 217.0, mean_cosine=0.99999))
    chosen, reason = choose_runtime(measurements, SERVING_FLOOR)
    choice = RuntimeChoice(runtime=chosen, precision="bf16", reason=reason, floor=SERVING_FLOOR, measurements=measurements,
                           cpu_capabilities=("BF16", "FP32"), load_average_1min=0.5)
    json_path, markdown_path = write_runtime_choice(tmp_path / "osnet_x1_0_bf16", choice)
    record = read_runtime_choice(json_path.parent)
    assert record["runtime"] == "openvino-bf16" and record["reason"] == reason
    assert [m["images_per_s"] for m in record["measurements"]] == [82.0, 217.0]
    text = markdown_path.read_text()
    assert text.startswith("# CPU runtime: openvino-bf16") and "| openvino-bf16 | 217.0 | 32 | 0.999990 |" in text


def test_runtime_option_defaults_to_auto():
    assert build_parser().parse_args([]).runtime == "auto"
    assert build_parser().parse_args(["--runtime", "openvino-int8"]).runtime == "openvino-int8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--runtime", "openvino-fp16"])


# --- served by a real tritonserver ------------------------------------------------------------------

@pytest.fixture(scope="module")
def x0_25():
    from engine_builder.models import create_osnet

    return create_osnet(VARIANT)


@pytest.fixture(scope="module")
def evaluation(x0_25):
    from engine_builder.build import pytorch_embeddings
    from engine_builder.image_sets import EVALUATION_SEED, image_set

    images = image_set(None, 16, EVALUATION_SEED)
    return images, pytorch_embeddings(x0_25, images)


@pytest.fixture(scope="module")
def fp32_graph(tmp_path_factory, x0_25):
    from engine_builder.build import make_cpu_graphs

    return make_cpu_graphs(x0_25, {"fp32"}, tmp_path_factory.mktemp("graphs"), RuntimeSelection())["fp32"]


def _session_embeddings(engine, graph, parameters, requests):
    from engine_builder.cpu_sessions import open_session

    session = open_session(engine, graph, {"ENGINE": engine, **parameters}, 1)
    try:
        return session.run(requests, ["EMBEDDING"])[0]
    finally:
        session.close()


# (sessions, images per part): as many parts as sessions; more parts than sessions, taken in turn.
@pytest.mark.parametrize(("streams", "part_images"), [("4", "4"), ("2", "1")])
def test_onnxruntime_sessions_split_a_batch_across_requests_and_join_it_in_order(fp32_graph, evaluation, streams, part_images):
    images, reference = evaluation
    requests = [images[:3], images[3:5], images[5:6]]  # parts that cross the requests' edges
    whole = _session_embeddings("onnxruntime", fp32_graph, {"STREAMS": "1", "PART_IMAGES": "64"}, requests)
    split = _session_embeddings("onnxruntime", fp32_graph, {"INTRA_OP_THREADS": streams, "STREAMS": streams,
                                                            "PART_IMAGES": part_images}, requests)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    assert np.sum(split * reference[:6], axis=1).min() >= 0.9999


@pytest.mark.parametrize(("engine", "parameter"), [("onnxruntime", "PART_IMAGES"), ("onnxruntime", "STREAMS"),
                                                    ("onnxruntime", "INTRA_OP_THREADS"),
                                                    pytest.param("openvino", "CHUNK", marks=needs_openvino)])
def test_a_session_refuses_a_count_below_one_when_it_opens(fp32_graph, engine, parameter):
    from engine_builder.cpu_sessions import open_session

    with pytest.raises(ValueError, match=f"{parameter} must be >= 1, got 0"):
        open_session(engine, fp32_graph, {"ENGINE": engine, parameter: "0"}, 1)


def test_onnxruntime_session_that_failed_a_batch_runs_the_next(fp32_graph, evaluation):
    from engine_builder.cpu_sessions import open_session

    images, reference = evaluation
    session = open_session("onnxruntime", fp32_graph, {"ENGINE": "onnxruntime", "STREAMS": "2", "PART_IMAGES": "1"}, 1)
    try:
        with pytest.raises(Exception, match="data type"):  # ONNX Runtime's own error
            session.run([images[:3].astype(np.float32)], ["EMBEDDING"])
        embeddings = session.run([images[:4]], ["EMBEDDING"])[0]
    finally:
        session.close()
    assert np.sum(embeddings * reference[:4], axis=1).min() >= 0.9999


@needs_openvino
@pytest.mark.parametrize("chunk", ["1", "2", "4"])
def test_openvino_chunks_pad_the_last_and_return_only_the_batch(fp32_graph, evaluation, chunk):
    images, reference = evaluation
    requests = [images[:3], images[3:5]]  # 5 images: a padded last chunk for 2 and 4
    served = _session_embeddings("openvino", fp32_graph, {"INFERENCE_PRECISION_HINT": "f32", "CHUNK": chunk}, requests)
    assert served.shape == (5, 512)
    assert np.sum(served * reference[:5], axis=1).min() >= 0.9999


# Every runtime's python-backend model in one repository, under names of their own; OpenVINO with
# two streams (a batch split and joined back), with one, and as two instances.
# name: (runtime, streams, instances, min cosine vs PyTorch FP32)
SERVED = {
    "ort_fp32": ("onnxruntime-fp32", None, 1, 0.9999),
    "ov_fp32_two_streams": ("openvino-fp32", 2, 1, 0.9999),
    "ov_bf16_one_stream": ("openvino-bf16", 1, 1, 0.999),
    "ort_int8": ("onnxruntime-int8", None, 1, 0.99),
    "ov_int8": ("openvino-int8", None, 1, 0.99),
    "ov_int8_two_instances": ("openvino-int8", 1, 2, 0.99),
}


@pytest.fixture(scope="module")
def every_runtime_server(tmp_path_factory, x0_25):
    from engine_builder.build import make_cpu_graphs

    root = tmp_path_factory.mktemp("runtimes")
    graphs = make_cpu_graphs(x0_25, {"fp32", "int8"}, root, RuntimeSelection(calibration_images=8))
    repository = root / "repository"
    capabilities, has_openvino = cpu_capabilities(), openvino_installed()
    for name, (runtime_name, streams, instances, _) in SERVED.items():
        runtime = RUNTIMES[runtime_name]
        if unavailable_reason(runtime, capabilities, has_openvino) is not None:
            continue
        settings = CpuRepositorySettings(max_batch_size=32, streams=streams, instances=instances)
        config = cpu_tensor_model_config(name, settings, runtime.config_parameters(None, streams))
        version_dir = write_model(repository, config, CPU_TENSOR_MODEL_SOURCE)
        shutil.copyfile(graphs[runtime.graph], version_dir / "model.onnx")
    with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
        yield server


@pytest.mark.server
@pytest.mark.parametrize("model", sorted(SERVED))
def test_each_runtime_serves_embeddings_close_to_pytorch_fp32(every_runtime_server, evaluation, model):
    runtime, _, _, min_cosine = SERVED[model]
    reason = unavailable_reason(RUNTIMES[runtime], cpu_capabilities(), openvino_installed())
    if reason is not None:
        pytest.skip(f"{runtime}: {reason}")
    images, reference = evaluation
    with EmbeddingClient(every_runtime_server.grpc_url) as client:
        served = client.embed_tensors(images, model)
    cosines = np.sum(served * reference, axis=1)
    assert served.shape == (len(images), 512)
    assert cosines.min() >= min_cosine, cosines
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


@pytest.mark.server
@needs_openvino
def test_concurrent_requests_split_over_streams_each_get_their_own_embedding(every_runtime_server, evaluation):
    images, reference = evaluation

    def embed_alone(index: int) -> np.ndarray:
        with EmbeddingClient(every_runtime_server.grpc_url) as client:
            return client.embed_tensors(images[index : index + 1], "ov_fp32_two_streams")[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        served = np.stack(list(pool.map(embed_alone, range(len(images)))))
    assert np.all(np.argmax(served @ reference.T, axis=1) == np.arange(len(images)))
    assert np.sum(served * reference, axis=1).min() >= 0.9999


def served_session_properties(log: str, model: str) -> list[dict]:
    """What each instance of `model` logged it runs (cpu_sessions.describe_session)."""
    marker = "; session properties: "
    lines = [line.split(marker, 1)[1].rstrip('"') for line in log.splitlines() if f"{model}: " in line and marker in line]
    return [dict(item.split("=", 1) for item in line.split(", ")) for line in lines]


@pytest.mark.server
@needs_openvino
def test_openvino_pins_threads_only_when_it_is_the_only_instance(every_runtime_server):
    # Instances are separate processes: with pinning, each would pin its streams to the same first cores.
    log = every_runtime_server.log_tail(4000)
    two, one = served_session_properties(log, "ov_int8_two_instances"), served_session_properties(log, "ov_int8")
    assert len(two) == 2 and all(properties["ENABLE_CPU_PINNING"] == "NO" for properties in two), log
    assert len(one) == 1 and "ENABLE_CPU_PINNING" not in one[0], log


@pytest.mark.server
@needs_openvino
@pytest.mark.parametrize("instances", [1, 2])
def test_runtime_choice_measured_the_session_the_server_runs(tmp_path, instances):
    from engine_builder.build import build_cpu_repository

    repository = build_cpu_repository(
        VARIANT, tmp_path / "repository", settings=CpuRepositorySettings(max_batch_size=16, instances=instances),
        selection=RuntimeSelection(runtime="openvino-fp32", evaluation_images=8))
    model = served_tensor_model(repository)
    choice = read_runtime_choice(repository / model)
    measured = choice["measurements"][0]["session_properties"]
    assert choice["measurements"][0]["batch_size"] == 16  # the served maximum, not 32
    assert choice["instances"] == instances and measured["INFERENCE_PRECISION_HINT"] == "f32"
    assert ("ENABLE_CPU_PINNING" in measured) == (instances > 1)
    with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server:
        served = served_session_properties(server.log_tail(4000), model)
    assert served == [measured] * instances


@pytest.mark.server
def test_auto_without_bf16_serves_its_choice_through_the_ensemble(tmp_path, x0_25):
    from engine_builder.build import build_cpu_repository, pytorch_embeddings
    from engine_builder.image_sets import preprocess_all
    from engine_builder.synthetic_people import person_jpegs

    # A CPU without BF16, as far as the choice goes: only what such a CPU runs is a candidate.
    candidates = tuple(r.name for r in available_runtimes(cpu_capabilities() - {"BF16"}, openvino_installed()))
    selection = RuntimeSelection(runtime="auto", candidates=candidates, seconds_per_candidate=0.6,
                                 evaluation_images=16, calibration_images=8)
    repository = build_cpu_repository(VARIANT, tmp_path / "repository", settings=CpuRepositorySettings(max_batch_size=32),
                                      selection=selection)
    served = served_tensor_model(repository)
    record = read_runtime_choice(repository / served)
    speeds = {m["runtime"]: m["images_per_s"] for m in record["measurements"]}
    assert set(speeds) == set(candidates) and "openvino-bf16" not in speeds
    assert served == tensor_model_name(VARIANT, RUNTIMES[record["runtime"]].precision)
    assert speeds[record["runtime"]] >= speeds[BASELINE_RUNTIME]
    assert (repository / served / "runtime_choice.md").read_text().startswith(f"# CPU runtime: {record['runtime']}")
    assert sorted(p.name for p in repository.iterdir()) == sorted(["osnet", "osnet_frames", "preprocess", served])

    jpegs = person_jpegs(4, cameras=2)
    with TritonServerProcess(TritonServerConfig(model_repository=repository)) as server, EmbeddingClient(server.grpc_url) as client:
        embeddings = client.embed_images(jpegs)
    # The build held its choice to the floor on its own held-out images; these are others.
    assert np.sum(embeddings * pytorch_embeddings(x0_25, preprocess_all(jpegs)), axis=1).min() >= SERVING_FLOOR.min_cosine

    # An explicit runtime below its floor fails the build and leaves the served repository as it was.
    strict = RuntimeSelection(runtime="onnxruntime-int8", calibration_images=8, evaluation_images=16,
                              floor=PrecisionFloor(min_mean_cosine=0.99999, min_cosine=0.9999, min_top1_agreement=1.0))
    before = json.dumps(record)
    with pytest.raises(RuntimeSelectionError, match="onnxruntime-int8 drifts too far from PyTorch FP32"):
        build_cpu_repository(VARIANT, repository, settings=CpuRepositorySettings(max_batch_size=32), selection=strict)
    assert served_tensor_model(repository) == served and json.dumps(read_runtime_choice(repository / served)) == before


def activation_scales(graph_path: Path) -> dict[str, float]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(graph_path).graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    # Activations are quantized per tensor: a scalar scale on each QuantizeLinear of a non-weight input.
    return {node.input[0]: float(initializers[node.input[1]]) for node in graph.node
            if node.op_type == "QuantizeLinear" and node.input[0] not in initializers and initializers[node.input[1]].size == 1}


def test_calib_method_entropy_changes_the_cpu_int8_graph(tmp_path, x0_25):
    from engine_builder.build import make_cpu_graphs

    scales = {}
    for method in ("minmax", "entropy"):
        graphs = make_cpu_graphs(x0_25, {"fp32", "int8"}, tmp_path / method,
                                 RuntimeSelection(calibration_images=8, calibration_method=method))
        scales[method] = activation_scales(graphs["int8"])
    assert scales["minmax"].keys() == scales["entropy"].keys() and len(scales["minmax"]) > 50
    changed = [name for name in scales["minmax"] if not np.isclose(scales["minmax"][name], scales["entropy"][name])]
    # Entropy calibration clips long tails that minmax keeps (ONNX Runtime's own entropy settings
    # changed none: see precision.ENTROPY_HISTOGRAM); it never widens a range.
    assert len(changed) > len(scales["minmax"]) / 5
    assert all(scales["entropy"][name] <= scales["minmax"][name] * (1 + 1e-6) for name in scales["minmax"])
