"""Triton python-backend model `preprocess`: encoded images -> the model's input pixels.

Copied to `preprocess/1/model.py` by `osnet-build`, beside contract.py and image_decoding.py, which
say what is decoded and how: JPEG and PNG only, within the budgets, RGB resized as torchreid's
FeatureExtractor does. Input `IMAGE` BYTES [N,1]; output `INPUT` UINT8 [N,256,128,3] (the tensor
model's graph normalises).

Dynamic batching hands `execute` several requests. Each is first opened and held to its budgets (a
refused request decodes nothing), then the images of all of them are decoded together on
DECODE_THREADS threads (`ParallelDecoder`: Pillow releases the GIL while it decodes and resizes).
Every request gets its own answer: an item that fails, however it fails, fails its own request
with INVALID_ARG naming it, and the other requests of the batch are served.
"""
import ctypes
import ctypes.util
import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
from batched_responses import invalid_argument
from contract import IMAGE_NAME, INPUT_NAME
from image_decoding import DecodeBudgets, ImageRejected, ParallelDecoder, harden_pillow, open_request

# After a batch that carried this many bytes or decoded this many pixels, the memory it took goes back
# to the system: glibc would keep it in the process's and the decode threads' arenas (the server runs
# with a high trim threshold, see osnet_base/triton_server.py). A trim after such a batch costs ~1 ms.
GIVE_BACK_AFTER_BYTES, GIVE_BACK_AFTER_PIXELS = 4 << 20, 2_000_000
GIVE_BACK_DELAY_S = 0.2
ERRORS_NAMED_PER_REQUEST = 3


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.budgets = DecodeBudgets.from_parameters(parameters)
        threads = int(parameters["DECODE_THREADS"])
        self.decoder = ParallelDecoder(threads)
        harden_pillow()
        libc = ctypes.util.find_library("c")
        self.malloc_trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None  # glibc only
        self.trim_lock, self.trim_timer = threading.Lock(), None
        pb_utils.Logger.log_info(f"{args['model_name']}: {threads} decode thread(s), {self.budgets}")

    def execute(self, requests):
        try:
            responses, work_bytes, decoded_pixels = self._answer(requests)
        except Exception as exc:  # a fault of ours, not of an input: still one answer for each request
            error = pb_utils.TritonError(f"preprocess failed: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        if work_bytes > GIVE_BACK_AFTER_BYTES or decoded_pixels > GIVE_BACK_AFTER_PIXELS:
            self._give_back_memory_soon()
        return responses

    def _give_back_memory_soon(self):
        """Trim glibc's heaps once this batch's requests are gone: the stub holds their inputs (the bytes
        as NumPy objects) until `execute` has returned, so a trim from inside it frees little."""
        with self.trim_lock:
            if self.malloc_trim is None or self.trim_timer is not None:
                return
            self.trim_timer = threading.Timer(GIVE_BACK_DELAY_S, self._trim)
            self.trim_timer.daemon = True
            self.trim_timer.start()

    def _trim(self):
        with self.trim_lock:
            self.trim_timer = None
        self.malloc_trim(0)

    def _answer(self, requests):
        """One response per request, the bytes the requests carried, and the pixels decoded for them."""
        responses = [None] * len(requests)
        opened = []  # (slot, images) of the requests within their budgets
        work_bytes = 0
        for slot, request in enumerate(requests):
            try:
                items = pb_utils.get_input_tensor_by_name(request, IMAGE_NAME).as_numpy().reshape(-1)
                work_bytes += sum(len(item) for item in items if isinstance(item, bytes))
                opened.append((slot, open_request(items, self.budgets)))
            except ImageRejected as exc:
                responses[slot] = invalid_argument(str(exc))
            except Exception as exc:  # one request's input never fails the others
                responses[slot] = invalid_argument(f"{IMAGE_NAME} could not be read: {type(exc).__name__}: {exc}")
        work = [(image, index) for _, images in opened for index, image in enumerate(images)]
        decoded_pixels = sum(image.size[0] * image.size[1] for image, _ in work)
        results = iter(self.decoder.decode(work))
        for slot, images in opened:
            items = [next(results) for _ in images]
            errors = [str(item) for item in items if isinstance(item, ImageRejected)]
            if errors:
                more = len(errors) - ERRORS_NAMED_PER_REQUEST
                responses[slot] = invalid_argument("; ".join(errors[:ERRORS_NAMED_PER_REQUEST]) + (f"; and {more} more" if more > 0 else ""))
            else:
                responses[slot] = pb_utils.InferenceResponse([pb_utils.Tensor(INPUT_NAME, np.stack(items))])
        return responses, work_bytes, decoded_pixels

    def finalize(self):
        if self.trim_timer is not None:
            self.trim_timer.cancel()
        self.decoder.close()
