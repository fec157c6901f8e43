"""Triton python-backend model `<variant>_fp32|bf16|int8`: OSNet embeddings on the CPU, with ONNX Runtime or OpenVINO.

Copied to `<name>/1/model.py` by `osnet-build`, beside `model.onnx` (the FP32 graph, or the INT8
Q/DQ graph) and `cpu_sessions.py`, which builds the session exactly as `--runtime auto` measured it.
The config parameter ENGINE names the runtime; the other parameters are its settings.
Dynamic batching hands `execute` several requests: they run as one batch and are split back.
"""
import json
import os

import triton_python_backend_utils as pb_utils
from batched_responses import error_responses, split_responses
from cpu_sessions import describe_session, open_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        instances = sum(group.get("count", 1) for group in config.get("instance_group", []))
        model_path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.engine = parameters["ENGINE"]
        self.session = open_session(self.engine, model_path, parameters, instances)
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        pb_utils.Logger.log_info(f"{args['model_name']}: {model_path}: {describe_session(self.session)}")

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        try:
            outputs = self.session.run(inputs, self.output_names)
        except Exception as exc:  # each runtime raises its own exception types
            return error_responses(requests, f"{self.engine} failed: {exc}")
        return split_responses(requests, [len(item) for item in inputs], dict(zip(self.output_names, outputs)))

    def finalize(self):
        self.session.close()
