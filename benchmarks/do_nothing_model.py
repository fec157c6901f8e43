"""A python-backend model that answers every request with constant rows of its outputs' shapes: unit
norm for float outputs (the supervisor's health probe must pass, or the server never turns ready),
zeros for the rest.

`benchmarks/cpu_serving.py` serves it in place of `preprocess` and of the tensor model, under the
configs `osnet-build` writes, to measure what the serving path costs by itself: tritonserver, the
ensemble, the python backend's copies and hand-offs, gRPC or shared memory, and the load generator.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.outputs = [(output["name"], np.dtype(pb_utils.triton_string_to_numpy(output["data_type"])), [int(d) for d in output["dims"]])
                        for output in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().shape[0]
            tensors = [pb_utils.Tensor(name, np.full((batch, *dims), 1 / np.sqrt(np.prod(dims)) if dtype.kind == "f" else 0, dtype))
                       for name, dtype, dims in self.outputs]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
