"""A folder of camera frames and a boxes file -> one embedding per box, through `osnet_frames`.

The boxes file has one row per box: the frame (its file name inside the folder), the camera that took
it, and the box's corners x1, y1, x2, y2 in the frame's pixels. As CSV, with that header line:

    frame,camera,x1,y1,x2,y2
    cam1/000001.jpg,1,104,40,168,168

or as JSON: one object per line with those keys, or a list of such objects. Each frame is read and
sent once, with all of its boxes; embeddings come back in the file's row order.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.embedding_client import EmbeddingClient, InvalidInputError, read_image_bytes
from osnet_base.contract import FEATURE_DIM, FRAMES_MODEL

BOX_COLUMNS = ("frame", "camera", "x1", "y1", "x2", "y2")


@dataclass(frozen=True)
class BoxRow:
    frame: str  # the frame's file, relative to the frames folder
    camera: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the frame's pixels


def _row(values: dict, where: str) -> BoxRow:
    missing = [column for column in BOX_COLUMNS if column not in values or values[column] in (None, "")]
    if missing:
        raise InvalidInputError(f"{where}: no {', '.join(missing)} (each row needs {', '.join(BOX_COLUMNS)})")
    try:
        box = tuple(float(values[column]) for column in BOX_COLUMNS[2:])
    except (TypeError, ValueError):
        raise InvalidInputError(f"{where}: the corners {[values[c] for c in BOX_COLUMNS[2:]]} are not all numbers") from None
    if not all(math.isfinite(corner) for corner in box):
        raise InvalidInputError(f"{where}: the corners {list(box)} are not all finite")
    return BoxRow(frame=str(values["frame"]), camera=str(values["camera"]), box=box)


def read_boxes_file(path: Path) -> list[BoxRow]:
    """The rows of a CSV (`.csv`) or JSON boxes file; a malformed row is an error naming its line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [_row(values, f"{path} line {reader.line_num}") for values in reader]
    try:
        whole = json.loads(text)
        objects = [(f"{path} item {index}", item) for index, item in enumerate(whole if isinstance(whole, list) else [whole])]
    except json.JSONDecodeError:  # JSON Lines: one object per line
        objects = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    objects.append((f"{path} line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise InvalidInputError(f"{path} line {number} is not JSON: {exc.msg}") from None
    for where, item in objects:
        if not isinstance(item, dict):
            raise InvalidInputError(f"{where} is not an object with keys {', '.join(BOX_COLUMNS)}")
    return [_row(item, where) for where, item in objects]


def embed_frame_folder(client: EmbeddingClient, folder: Path, rows: Sequence[BoxRow], concurrency: int = 8,
                       model: str = FRAMES_MODEL) -> np.ndarray:
    """One embedding per row, in order: each frame of `folder` named in `rows` sent once with its boxes."""
    if not rows:
        raise InvalidInputError("the boxes file holds no boxes")
    by_frame: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_frame.setdefault(row.frame, []).append(index)
    frames = []
    for name, indices in by_frame.items():
        path = folder / name
        if not path.is_file():
            raise InvalidInputError(f"frame {name} (box row {indices[0]}) is not a file in {folder}")
        frames.append((read_image_bytes(path), np.array([rows[index].box for index in indices], dtype=np.float32)))
    embeddings = np.empty((len(rows), FEATURE_DIM), dtype=np.float32)
    for indices, answer in zip(by_frame.values(), client.embed_frames(frames, model=model, concurrency=concurrency, names=list(by_frame))):
        embeddings[indices] = answer
    return embeddings
