"""Triton python-backend model `<variant>_<precision>` for engines built with JIT plugins.

An AOT-plugin engine is served by Triton's C++ TensorRT backend (`platform: tensorrt_plan`). An
engine whose plugins are JIT (`--jit-plugins`) calls back into Python, so it must be deserialized
in a process that imported `kernels.tensorrt_plugins`: this model, in the project's venv.
Copied to `<name>/1/model.py` by `osnet-build`, beside `model.plan`.
"""
import json
import os

import cupy
import numpy as np
import tensorrt as trt
import triton_python_backend_utils as pb_utils
from batched_responses import error_responses, split_responses
from contract import INPUT_NAME

from kernels.tensorrt_plugins import register_plugins


class TritonPythonModel:
    def initialize(self, args):
        register_plugins()
        config = json.loads(args["model_config"])
        device = int(args["model_instance_device_id"])
        cupy.cuda.Device(device).use()
        plan = os.path.join(args["model_repository"], args["model_version"], "model.plan")
        with open(plan, "rb") as handle:
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(handle.read())
        self.context = self.engine.create_execution_context()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.output_names = [output["name"] for output in config["output"]]
        self.feature_dim = int(config["output"][0]["dims"][0])

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy() for request in requests]
        try:
            with self.stream:  # the upload, the engine and the download in one stream's order
                batch = cupy.asarray(np.concatenate(inputs))
                outputs = {name: cupy.empty((len(batch), self.feature_dim), dtype=cupy.float32) for name in self.output_names}
                self.context.set_input_shape(INPUT_NAME, batch.shape)
                self.context.set_tensor_address(INPUT_NAME, batch.data.ptr)
                for name, array in outputs.items():
                    self.context.set_tensor_address(name, array.data.ptr)
                if not self.context.execute_async_v3(self.stream.ptr):
                    raise RuntimeError("TensorRT execution failed")
                host = {name: cupy.asnumpy(array, stream=self.stream) for name, array in outputs.items()}
            self.stream.synchronize()
        except Exception as exc:  # any CUDA or TensorRT failure
            return error_responses(requests, f"TensorRT failed: {exc}")
        return split_responses(requests, [len(item) for item in inputs], host)

    def finalize(self):
        self.context = None
        self.engine = None
