"""The CPU inference sessions that the served tensor models run and that `--runtime auto` measures.

One module for both, so the measurement cannot drift from what is served: the python-backend
models (`triton_repo/onnxruntime_embedder.py`, `openvino_embedder.py`) import the copy of this file
that `osnet-build` writes beside their `model.py`, and `engine_builder.cpu_runtimes` imports it from
here. It runs inside Triton's python-backend stub, so it imports only NumPy and the runtime itself.

`parameters` are the tensor model's config parameters as strings (what `CpuRuntime.config_parameters`
writes into config.pbtxt); `instances` is the model's instance count, since each instance is a stub
process of its own and what suits one process does not suit several.
"""
import numpy as np

OPENVINO_PROPERTIES = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")


def stream_parts(inputs, streams):
    """The batch that `inputs` (one array per request, in order) make, cut into at most `streams`
    contiguous parts of near-equal size. A part inside one request is a view of it; only a part
    spanning several requests is copied: two batch-32 requests on two streams are not concatenated."""
    total = sum(len(batch) for batch in inputs)
    count = min(streams, total)
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
    """ONNX Runtime on the CPU: one intra-op pool (INTRA_OP_THREADS, else a thread per core), no inter-op pool."""

    def __init__(self, model_path, parameters, instances):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if "INTRA_OP_THREADS" in parameters:
            options.intra_op_num_threads = int(parameters["INTRA_OP_THREADS"])
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.properties = {"inter_op_num_threads": "1", "intra_op_num_threads": str(options.intra_op_num_threads)}
        self.version = f"ONNX Runtime {ort.__version__}"

    def run(self, inputs, output_names):
        """`output_names` for the requests' `inputs` (one array each) taken as one batch."""
        batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        return self.session.run(output_names, {self.input_name: batch})


class OpenVinoSession:
    """OpenVINO on the CPU: a batch cut into one part per stream, the parts run in parallel."""

    def __init__(self, model_path, parameters, instances):
        import openvino as ov

        self.properties = {key: parameters[key] for key in OPENVINO_PROPERTIES if key in parameters}
        if instances > 1:
            # Each instance's OpenVINO would pin its threads to the same first cores (measured: 2
            # instances ran at half the speed of 1).
            self.properties["ENABLE_CPU_PINNING"] = "NO"
        self.compiled = ov.Core().compile_model(str(model_path), "CPU", dict(self.properties))
        streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(streams)]
        self.input_name = self.compiled.inputs[0].get_any_name()
        self.version = (f"OpenVINO {ov.get_version()}, {streams} stream(s) x "
                        f"{self.compiled.get_property('INFERENCE_NUM_THREADS')} threads")

    def run(self, inputs, output_names):
        parts = stream_parts(inputs, len(self.requests))
        running = self.requests[: len(parts)]
        for request, part in zip(running, parts):
            # share_inputs: OpenVINO reads the parts where they are (Triton's shared memory), no copy.
            request.start_async({self.input_name: part}, share_inputs=True)
        for request in running:
            request.wait()
        return [np.concatenate([request.get_tensor(name).data for request in running]) for name in output_names]

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
