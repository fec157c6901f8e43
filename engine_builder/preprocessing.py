"""In-process preprocessing identical to torchreid's FeatureExtractor, as the reference pipeline.

torchreid builds `Resize((256, 128)) -> ToTensor() -> Normalize(ImageNet)` with torchvision on a
PIL image; on PIL input, torchvision's Resize is PIL's bilinear resize. This is the same arithmetic
in PyTorch without torchvision (which has no CPU wheel here). The served `preprocess` model is an
independent NumPy implementation; tests hold the two together.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from engine_builder.models import INPUT_HEIGHT, INPUT_WIDTH

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_image(image: Image.Image) -> torch.Tensor:
    """A PIL image -> normalised [3, 256, 128] FP32 tensor."""
    resized = image.convert("RGB").resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BILINEAR)
    tensor = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def preprocess_encoded(encoded: bytes) -> torch.Tensor:
    return preprocess_image(Image.open(io.BytesIO(encoded)))
