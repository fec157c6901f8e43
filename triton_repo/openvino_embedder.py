"""Triton python-backend model `<variant>_<precision>`: OSNet embeddings with OpenVINO on the CPU.

Copied to `<name>/1/model.py` by `osnet-build`, beside `model.onnx` (the FP32 graph, or the INT8
Q/DQ graph). The config's parameters INFERENCE_PRECISION_HINT (f32, bf16), PERFORMANCE_HINT,
NUM_STREAMS and INFERENCE_NUM_THREADS are OpenVINO properties, passed to `compile_model` as they are.
With more than one instance, each instance is its own stub process and OpenVINO's CPU pinning would
pin every one of them to the same first cores (measured: 2 instances ran at half the speed of 1),
so pinning is switched off there.
Dynamic batching hands `execute` several requests: they run as one batch, cut into one part per
stream that the streams run in parallel, and the result is split back per request.
"""
import json
import os

import numpy as np
import openvino as ov
import triton_python_backend_utils as pb_utils
from batched_responses import error_responses, split_responses

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


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        properties = {key: parameters[key]["string_value"] for key in OPENVINO_PROPERTIES if key in parameters}
        if sum(group.get("count", 1) for group in config.get("instance_group", [])) > 1:
            properties["ENABLE_CPU_PINNING"] = "NO"
        model_path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.compiled = ov.Core().compile_model(model_path, "CPU", properties)
        streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(streams)]
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        pb_utils.Logger.log_info(
            f"{args['model_name']}: OpenVINO {ov.get_version()} on {model_path}, {properties}, "
            f"{streams} stream(s) x {self.compiled.get_property('INFERENCE_NUM_THREADS')} threads"
        )

    def run(self, inputs):
        """All outputs for the requests' `inputs` taken as one batch, its parts run in parallel, one per stream."""
        parts = stream_parts(inputs, len(self.requests))
        running = self.requests[: len(parts)]
        for request, part in zip(running, parts):
            # share_inputs: OpenVINO reads the parts where they are (Triton's shared memory), no copy.
            request.start_async({self.input_name: part}, share_inputs=True)
        for request in running:
            request.wait()
        return [np.concatenate([request.get_tensor(name).data for request in running]) for name in self.output_names]

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        try:
            outputs = self.run(inputs)
        except Exception as exc:  # OpenVINO raises its own exception types
            return error_responses(requests, f"OpenVINO failed: {exc}")
        return split_responses(requests, [len(item) for item in inputs], dict(zip(self.output_names, outputs)))

    def finalize(self):
        self.requests = []
        self.compiled = None
