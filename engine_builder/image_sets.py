"""Preprocessed image sets for INT8 calibration and precision reports: a user's folder, or generated people."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from osnet_base.errors import OsnetTritonError
from engine_builder.preprocessing import preprocess_encoded
from engine_builder.synthetic_people import person_jpegs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# Calibration and evaluation draw from disjoint generator seeds, so the report is held out.
CALIBRATION_SEED, EVALUATION_SEED = 11, 12


def preprocess_all(encoded: list[bytes]) -> np.ndarray:
    return torch.stack([preprocess_encoded(item) for item in encoded]).numpy()


def folder_images(folder: Path, limit: int) -> np.ndarray:
    """Up to `limit` images of `folder` (sorted, recursive), preprocessed as served."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    if not paths:
        raise OsnetTritonError(f"no images (jpg, png, bmp, webp) found in {folder}")
    return preprocess_all([path.read_bytes() for path in paths])


def generated_images(count: int, seed: int) -> np.ndarray:
    return preprocess_all(person_jpegs(count, cameras=3, seed=seed))


def image_set(folder: Path | None, count: int, seed: int) -> np.ndarray:
    return folder_images(folder, count) if folder is not None else generated_images(count, seed)
