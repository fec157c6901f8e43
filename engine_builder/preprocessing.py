"""In-process preprocessing identical to torchreid's FeatureExtractor, as the reference pipeline.

torchreid builds `Resize((256, 128)) -> ToTensor() -> Normalize(ImageNet)` with torchvision on a
PIL image; on PIL input, torchvision's Resize is PIL's bilinear resize. This is the same arithmetic
in PyTorch without torchvision (which has no CPU wheel here). What is served is split in two and
written independently: the `preprocess` model decodes and resizes to uint8 pixels
(osnet_base/image_decoding.py), the graph normalises (engine_builder/export.PixelNormalization);
tests hold them to this.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from osnet_base.contract import IMAGENET_MEAN, IMAGENET_STD, INPUT_HEIGHT, INPUT_WIDTH


def resize_image(image: Image.Image) -> torch.Tensor:
    """A PIL image -> RGB resized to the model's input, [3, 256, 128] uint8 (what a training cache holds)."""
    resized = image.convert("RGB").resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BILINEAR)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [..., 3, H, W] -> /255, ImageNet mean and std, FP32."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images.float().div(255) - mean) / std


def normalize_pixels(pixels: np.ndarray) -> torch.Tensor:
    """Served input pixels, uint8 [N, H, W, 3] -> the FeatureExtractor's FP32 [N, 3, H, W]."""
    return normalize_images(torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2))


def preprocess_image(image: Image.Image) -> torch.Tensor:
    """A PIL image -> normalised [3, 256, 128] FP32 tensor."""
    return normalize_images(resize_image(image))


def preprocess_encoded(encoded: bytes) -> torch.Tensor:
    return preprocess_image(Image.open(io.BytesIO(encoded)))
