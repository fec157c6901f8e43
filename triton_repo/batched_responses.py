"""Answers for the requests that dynamic batching hands one `execute` call, shared by the embedders.

`osnet-build` copies this file beside each python-backend `model.py`; the python backend puts the
model's version folder on `sys.path`.
"""
import numpy as np
import triton_python_backend_utils as pb_utils


def split_responses(requests, batch_sizes, outputs):
    """One response per request, in order: its rows of each output (`outputs`: name -> array over the
    whole batch), only the outputs it asked for (all of them when it named none)."""
    responses, start = [], 0
    for request, size in zip(requests, batch_sizes):
        stop = start + size
        wanted = set(request.requested_output_names()) or set(outputs)
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(array[start:stop])) for name, array in outputs.items() if name in wanted]
        responses.append(pb_utils.InferenceResponse(tensors))
        start = stop
    return responses


def invalid_argument(message):
    """A response refusing its own request's input: INVALID_ARG, `message` naming what is wrong."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def error_responses(requests, message):
    """The same error for every request: each must get an answer."""
    error = pb_utils.TritonError(message)
    return [pb_utils.InferenceResponse(error=error) for _ in requests]
