"""Triton python-backend model `<variant>_fp32` or `<variant>_int8`: OSNet embeddings with ONNX Runtime on the CPU.

Copied to `<name>/1/model.py` by `osnet-build`, beside `model.onnx` (the FP32 graph, or the INT8 Q/DQ
graph). Dynamic batching hands `execute` several requests: they are concatenated, run as one batch,
and split back.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from batched_responses import error_responses, split_responses


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if "INTRA_OP_THREADS" in parameters:
            options.intra_op_num_threads = int(parameters["INTRA_OP_THREADS"]["string_value"])
        model_path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        pb_utils.Logger.log_info(f"{args['model_name']}: ONNX Runtime {ort.__version__} on {model_path}")

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        try:
            batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
            outputs = self.session.run(self.output_names, {self.input_name: batch})
        except Exception as exc:  # ORT raises its own exception types
            return error_responses(requests, f"ONNX Runtime failed: {exc}")
        return split_responses(requests, [len(item) for item in inputs], dict(zip(self.output_names, outputs)))
