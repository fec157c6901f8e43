"""Triton python-backend model `osnet_frames`: one camera frame and a detector's boxes -> one embedding per box.

Copied to `osnet_frames/1/model.py` by `osnet-build`, beside contract.py, image_decoding.py and
frame_boxes.py, which say how a frame is decoded (the preprocessor's allowlist and budgets) and how a
box is cut and resized (as the preprocessor resizes a crop file). Inputs `FRAME` BYTES [1] and
`BOXES` FP32 [K,4]; outputs `EMBEDDING` and `FEATURES` FP32 [K,512], row i for box i.

The frame is decoded once and its K crops go to the tensor model the `osnet` ensemble runs, as uint8,
in one BLS request: the tensor model's dynamic batcher batches them with the crops of the other
frames (and cameras) in flight, which the instances of this model send in parallel. A frame or box
that cannot be served fails its own request with INVALID_ARG naming it; K = 0 is an empty answer.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from batched_responses import invalid_argument
from contract import BOXES_NAME, EMBEDDING_NAME, FEATURE_DIM, FEATURES_NAME, FRAME_NAME, INPUT_NAME
from frame_boxes import frame_crops
from image_decoding import DecodeBudgets, ImageRejected, harden_pillow

OUTPUT_NAMES = (EMBEDDING_NAME, FEATURES_NAME)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.budgets = DecodeBudgets.from_parameters(parameters)
        self.max_boxes = int(parameters["MAX_BOXES"])
        self.tensor_model = parameters["TENSOR_MODEL"]
        harden_pillow()
        pb_utils.Logger.log_info(f"{args['model_name']}: crops to {self.tensor_model}, at most {self.max_boxes} boxes "
                                 f"per frame, {self.budgets}")

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        wanted = [name for name in OUTPUT_NAMES if name in set(request.requested_output_names())] or list(OUTPUT_NAMES)
        try:
            frame = pb_utils.get_input_tensor_by_name(request, FRAME_NAME).as_numpy().reshape(-1)
            if len(frame) != 1:
                raise ImageRejected(f"{FRAME_NAME} holds {len(frame)} items: send one frame per request")
            crops = frame_crops(frame[0], pb_utils.get_input_tensor_by_name(request, BOXES_NAME).as_numpy(),
                                self.budgets, self.max_boxes)
        except ImageRejected as exc:
            return invalid_argument(str(exc))
        except Exception as exc:  # decode and cut convert every failure; this is the guard on that promise
            return invalid_argument(f"{FRAME_NAME} and {BOXES_NAME} could not be read: {type(exc).__name__}: {exc}")
        if len(crops) == 0:
            return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.empty((0, FEATURE_DIM), np.float32)) for name in wanted])
        embedded = pb_utils.InferenceRequest(
            model_name=self.tensor_model, requested_output_names=wanted, inputs=[pb_utils.Tensor(INPUT_NAME, crops)],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),  # a GPU engine answers on the host
        ).exec()
        if embedded.has_error():
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"{self.tensor_model} failed on the {len(crops)} crops of this frame: {embedded.error().message()}"))
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, pb_utils.get_output_tensor_by_name(embedded, name).as_numpy())
                                           for name in wanted])
