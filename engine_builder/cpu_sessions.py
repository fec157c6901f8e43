"""The CPU inference sessions that the served tensor models run and that `--runtime auto` measures.

One module for both, so the measurement cannot drift from what is served: the python-backend
model (`triton_repo/cpu_embedder.py`) imports the copy of this file
that `osnet-build` writes beside its `model.py`, and `engine_builder.cpu_runtimes` imports it from
here. It runs inside Triton's python-backend stub, so it imports only NumPy and the runtime itself.

`parameters` are the tensor model's config parameters as strings (what `CpuRuntime.config_parameters`
writes into config.pbtxt); `instances` is the model's instance count, since each instance is a stub
process of its own and what suits one process does not suit several.
"""
import itertools
import os
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

# Images per OpenVINO inference. Measured in-process on 2 cores (img/s, chunks of 2 / 4 / 8): osnet_x0_25
# BF16 at batches of 2-5 in turn 758 / 512 / 303, steady 32: 1248 / 1180 / 1219; osnet_x1_0 INT8 at
# batches of 1-8 in turn 246 / 181 / -, steady 32: 323 / 353 / -. Small chunks suit dynamic batching's
# small, changing batches; padding a chunk costs little at 2.
OPENVINO_CHUNK = 2
# Images per ONNX Runtime run (see OnnxRuntimeSession). One single-threaded session, osnet_x1_0, 2 cores:
# 92 img/s at batches of 2-4, 78 at 16, 70 at 32 (a small batch's activations stay in cache). Two sessions
# on batch 32, in alternating rounds, parts of 4 against halves of 16: osnet_x1_0 149-163 against 90-125
# img/s, osnet_x0_25 957-1041 against 800-1054; on batch 64, 1096-1234 against 946-1021 (osnet_x0_25).
ONNXRUNTIME_PART_IMAGES = 4
OPENVINO_PROPERTIES = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")


def positive_parameter(parameters, name, default):
    """A count from the config: refused when the model loads (so the server never reports it ready), not at
    its first request."""
    value = int(parameters.get(name, default))
    if value < 1:
        raise ValueError(f"config parameter {name} must be >= 1, got {value}")
    return value


def batch_parts(inputs, count):
    """The batch that `inputs` (one array per request, in order) make, cut into `count` contiguous parts
    of near-equal size. A part inside one request is a view of it; only a part spanning several
    requests is copied: a batch-32 request is not concatenated with its neighbours."""
    total = sum(len(batch) for batch in inputs)
    sizes = [total // count + (part < total % count) for part in range(count)]
    parts, index, offset = [], 0, 0
    for size in sizes:
        pieces = []
        while size > 0:
            take = min(size, len(inputs[index]) - offset)
            pieces.append(inputs[index][offset : offset + take])
            size -= take
            offset += take
            if offset == len(inputs[index]):
                index, offset = index + 1, 0
        parts.append(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
    return parts


class OnnxRuntimeSession:
    """ONNX Runtime on the CPU: STREAMS sessions (default: one per thread), the instance's INTRA_OP_THREADS
    (default: a thread per core) shared out between them, no inter-op pool.

    A batch is cut into parts of about PART_IMAGES images (and at least one part per session), and each
    session takes the next part as soon as it is done with its last. Sessions of one thread each run on
    their own: one session of 2 threads waits at every layer for its slower thread. Taking parts in
    turn means that a session preempted by the server, the decoder or a client does fewer parts while
    the others do more, instead of the whole batch waiting for it."""

    def __init__(self, model_path, parameters, instances):
        import onnxruntime as ort

        threads = positive_parameter(parameters, "INTRA_OP_THREADS", len(os.sched_getaffinity(0)))
        streams = positive_parameter(parameters, "STREAMS", threads)
        self.part_images = positive_parameter(parameters, "PART_IMAGES", ONNXRUNTIME_PART_IMAGES)
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = max(1, threads // streams)
        self.sessions = [ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"]) for _ in range(streams)]
        # The caller works through the parts too.
        self.pool = ThreadPoolExecutor(max_workers=streams - 1, thread_name_prefix="onnxruntime") if streams > 1 else None
        self.input_name = self.sessions[0].get_inputs()[0].name
        self.properties = {"inter_op_num_threads": "1", "intra_op_num_threads": str(options.intra_op_num_threads),
                           "sessions": str(streams), "PART_IMAGES": str(self.part_images)}
        self.version = (f"ONNX Runtime {ort.__version__}, {streams} session(s) x {options.intra_op_num_threads} thread(s), "
                        f"parts of {self.part_images}")

    def run(self, inputs, output_names):
        """`output_names` for the requests' `inputs` (one array each) taken as one batch."""
        total = sum(len(batch) for batch in inputs)
        parts = batch_parts(inputs, max(min(len(self.sessions), total), -(-total // self.part_images)))
        results = [None] * len(parts)
        claims = itertools.count()  # next() on it is atomic: each part is claimed once

        def take_parts(session):
            while (index := next(claims)) < len(parts):
                results[index] = session.run(output_names, {self.input_name: parts[index]})

        helpers = [self.pool.submit(take_parts, session) for session in self.sessions[1 : len(parts)]]
        try:
            take_parts(self.sessions[0])
        finally:
            wait(helpers)  # none may still be writing `results` when this call returns or raises
        for helper in helpers:
            helper.result()
        if len(results) == 1:
            return results[0]
        return [np.concatenate([result[index] for result in results]) for index in range(len(output_names))]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
        self.sessions = []


class OpenVinoSession:
    """OpenVINO on the CPU, compiled for a fixed batch of CHUNK images: a batch runs as chunks of CHUNK,
    the last one padded, spread over the compiled model's streams. OpenVINO keeps one graph per stream
    and re-plans it whenever the batch size it runs changes, which dynamic batching does at every call:
    with a dynamic batch dimension, batches of 2 to 5 in turn ran at 363 img/s against 924 at a steady 8
    (osnet_x0_25 BF16, 2 cores); in chunks of 2, at 758."""

    def __init__(self, model_path, parameters, instances):
        import openvino as ov

        self.properties = {key: parameters[key] for key in OPENVINO_PROPERTIES if key in parameters}
        if instances > 1:
            # Each instance's OpenVINO would pin its threads to the same first cores (measured: 2
            # instances ran at half the speed of 1).
            self.properties["ENABLE_CPU_PINNING"] = "NO"
        self.chunk = positive_parameter(parameters, "CHUNK", OPENVINO_CHUNK)
        core = ov.Core()
        model = core.read_model(str(model_path))
        shape = model.inputs[0].get_partial_shape()
        shape[0] = self.chunk
        model.reshape({model.inputs[0]: shape})
        self.compiled = core.compile_model(model, "CPU", dict(self.properties))
        self.requests = []  # one per chunk of the largest batch so far
        self.input_name = self.compiled.inputs[0].get_any_name()
        self.properties["CHUNK"] = str(self.chunk)
        self.version = (f"OpenVINO {ov.get_version()}, {int(self.compiled.get_property('NUM_STREAMS'))} stream(s) x "
                        f"{self.compiled.get_property('INFERENCE_NUM_THREADS')} threads, chunks of {self.chunk}")

    def run(self, inputs, output_names):
        batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        total, chunk = len(batch), self.chunk
        chunks = -(-total // chunk)
        while len(self.requests) < chunks:
            self.requests.append(self.compiled.create_infer_request())
        running = self.requests[:chunks]
        for index, request in enumerate(running):
            part = batch[index * chunk : (index + 1) * chunk]
            if len(part) < chunk:
                part = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)])
            # share_inputs: OpenVINO reads a chunk where it is (for a batch of one request: Triton's shared memory), no copy.
            request.start_async({self.input_name: part}, share_inputs=True)
        for request in running:
            request.wait()
        return [np.concatenate([request.get_tensor(name).data for request in running])[:total] for name in output_names]

    def close(self):
        self.requests = []
        self.compiled = None


SESSIONS = {"onnxruntime": OnnxRuntimeSession, "openvino": OpenVinoSession}


def open_session(engine, model_path, parameters, instances):
    return SESSIONS[engine](model_path, parameters, instances)


def describe_session(session):
    """The log line that says what a served model runs; tests compare its properties with the build's.
    KEY=VALUE, not JSON: Triton's log escapes every double quote."""
    properties = ", ".join(f"{key}={value}" for key, value in sorted(session.properties.items()))
    return f"{session.version}; session properties: {properties}"
