"""Image sets for INT8 calibration and precision reports, as the served model's input pixels (uint8
[N,256,128,3]): a user's folder, or generated people."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from osnet_base.contract import IMAGE_FILE_SUFFIXES
from osnet_base.errors import OsnetTritonError
from osnet_base.image_decoding import ImageRejected, decode
from engine_builder.synthetic_people import person_jpegs

# Calibration and evaluation draw from disjoint generator seeds, so the report is held out.
CALIBRATION_SEED, EVALUATION_SEED = 11, 12


def preprocess_all(encoded: list[bytes]) -> np.ndarray:
    """Encoded images -> the pixels the served preprocessor makes of them (no size budgets: local files)."""
    return np.stack([decode(item) for item in encoded])


def folder_images(folder: Path, limit: int) -> np.ndarray:
    """Up to `limit` images of `folder` (sorted, recursive), decoded as served."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.is_file())[:limit]
    if not paths:
        raise OsnetTritonError(f"no images ({', '.join(IMAGE_FILE_SUFFIXES)}) found in {folder}")
    try:
        return preprocess_all([path.read_bytes() for path in paths])
    except ImageRejected as exc:
        raise OsnetTritonError(f"{folder}: {exc}") from None


def generated_images(count: int, seed: int) -> np.ndarray:
    return preprocess_all(person_jpegs(count, cameras=3, seed=seed))


def image_set(folder: Path | None, count: int, seed: int) -> np.ndarray:
    return folder_images(folder, count) if folder is not None else generated_images(count, seed)
