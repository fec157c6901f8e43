"""Triton python-backend model `preprocess`: encoded images -> OSNet input tensors.

Copied to `preprocess/1/model.py` by `osnet-build`. Matches torchreid's FeatureExtractor on a PIL
image: RGB, resize to 256x128 (PIL bilinear, aspect ratio not kept), /255, ImageNet mean/std, CHW.

Input `IMAGE` BYTES [N,1]: one encoded JPEG/PNG per batch item. Output `INPUT` FP32 [N,3,256,128].
A request with an undecodable or oversized image gets INVALID_ARG naming the item; the other
requests of the same batch are served normally.
"""
import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from contract import IMAGE_NAME, IMAGENET_MEAN, IMAGENET_STD, INPUT_NAME
from PIL import Image, UnidentifiedImageError

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


class InvalidImageError(ValueError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.max_image_pixels = int(config["parameters"]["MAX_IMAGE_PIXELS"]["string_value"])
        output = pb_utils.get_output_config_by_name(config, INPUT_NAME)
        _, self.height, self.width = output["dims"]
        # decode() enforces our tighter limit from the header, with a message naming the image;
        # PIL's own check would raise first, from inside Image.open, with a vaguer one.
        Image.MAX_IMAGE_PIXELS = None

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, IMAGE_NAME).as_numpy().reshape(-1)
            try:
                batch = np.stack([self.to_tensor(encoded, index) for index, encoded in enumerate(images)])
            except InvalidImageError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(INPUT_NAME, batch)]))
        return responses

    def to_tensor(self, encoded, index):
        image = self.decode(encoded, index)
        resized = image.resize((self.width, self.height), Image.BILINEAR)
        chw = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255.0
        return (chw - MEAN) / STD

    def decode(self, encoded, index):
        if not isinstance(encoded, bytes) or not encoded:
            raise InvalidImageError(f"IMAGE[{index}] is empty: expected the bytes of one JPEG or PNG file")
        try:
            image = Image.open(io.BytesIO(encoded))
            # The header gives the size before any pixel is decoded: refuse decompression bombs here.
            width, height = image.size
            if width * height > self.max_image_pixels:
                raise InvalidImageError(
                    f"IMAGE[{index}] is {width}x{height} pixels, over the limit of {self.max_image_pixels} "
                    "(MAX_IMAGE_PIXELS): send a person crop, not a whole frame"
                )
            return image.convert("RGB")
        except InvalidImageError:
            raise
        except UnidentifiedImageError:
            raise InvalidImageError(f"IMAGE[{index}] ({len(encoded)} bytes) is not in any image format we can decode") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidImageError(f"IMAGE[{index}] is not a decodable image ({len(encoded)} bytes): {exc}") from None
