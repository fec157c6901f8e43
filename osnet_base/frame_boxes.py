"""A camera frame and a detector's boxes -> the model's input pixels, one crop per box.

The served `osnet_frames` model runs this file (the repository writer copies it beside its model.py,
with contract.py and image_decoding.py); the client and the tests cut boxes with it too, so a box cut
here and a box cut by the server are the same pixels. Standard library, NumPy and Pillow only.

A frame is decoded by the preprocessor's rules (JPEG and PNG only, within its budgets: see
image_decoding.py) and converted to RGB once. A box (x1, y1, x2, y2, frame pixels, x2 and y2
exclusive) covers the pixels it touches: its corners go out to whole pixels (floor of x1 and y1,
ceiling of x2 and y2) and are clipped to the frame. Each crop is then resized to 256x128 exactly as
the preprocessor resizes a decoded crop file, so a box embeds as its crop saved losslessly does.
Refused, by box (`ImageRejected`, naming BOXES[i]): corners that are not finite, inverted or
zero-area boxes, and boxes wholly outside the frame; also a BOXES tensor not shaped [K,4], and more
boxes than the model takes at once.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

if __package__:  # osnet_base.frame_boxes
    from .contract import BOXES_NAME, FRAME_NAME, INPUT_HEIGHT, INPUT_WIDTH
    from .image_decoding import DecodeBudgets, ImageRejected, load_rgb, open_item
else:  # copied beside a python-backend model.py
    from contract import BOXES_NAME, FRAME_NAME, INPUT_HEIGHT, INPUT_WIDTH
    from image_decoding import DecodeBudgets, ImageRejected, load_rgb, open_item


def _show(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{value:g}" for value in box.tolist()) + ")"


def pixel_boxes(boxes: object, width: int, height: int, max_boxes: int) -> np.ndarray:
    """`boxes` (x1, y1, x2, y2 [K,4]) checked against a `width` x `height` frame -> int64 [K,4] whole-pixel
    boxes inside it. Raises `ImageRejected` naming the first box that cannot be cut."""
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ImageRejected(f"{BOXES_NAME} has shape {list(boxes.shape)}: expected [K, 4] (x1, y1, x2, y2 in frame pixels)")
    if len(boxes) > max_boxes:
        raise ImageRejected(f"{BOXES_NAME} holds {len(boxes)} boxes, over the limit of {max_boxes} per frame (MAX_BOXES)")
    boxes = boxes.astype(np.float64)
    for index, box in enumerate(boxes):
        x1, y1, x2, y2 = box
        if not np.isfinite(box).all():
            raise ImageRejected(f"{BOXES_NAME}[{index}] = {_show(box)} has a corner that is not a finite number")
        if x2 < x1 or y2 < y1:
            raise ImageRejected(f"{BOXES_NAME}[{index}] = {_show(box)} is inverted: x2 must be >= x1 and y2 >= y1")
        if x2 == x1 or y2 == y1:
            raise ImageRejected(f"{BOXES_NAME}[{index}] = {_show(box)} has zero area")
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise ImageRejected(f"{BOXES_NAME}[{index}] = {_show(box)} lies wholly outside the {width}x{height} frame")
    whole = np.concatenate([np.floor(boxes[:, :2]), np.ceil(boxes[:, 2:])], axis=1)
    return np.clip(whole, 0, [width, height, width, height]).astype(np.int64)


def cut_boxes(frame: Image.Image, boxes: np.ndarray) -> np.ndarray:
    """The crops of whole-pixel `boxes` (from `pixel_boxes`) of an RGB frame -> uint8 [K,256,128,3]."""
    crops = np.empty((len(boxes), INPUT_HEIGHT, INPUT_WIDTH, 3), dtype=np.uint8)
    for index, box in enumerate(boxes.tolist()):
        crops[index] = np.asarray(frame.crop(box).resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BILINEAR))
    return crops


def decode_frame(encoded: object, budgets: DecodeBudgets | None) -> Image.Image:
    """One encoded frame -> RGB, by the preprocessor's rules; any failure is `ImageRejected` naming FRAME."""
    return load_rgb(open_item(encoded, 0, budgets, name=FRAME_NAME), FRAME_NAME)


def frame_crops(encoded: object, boxes: object, budgets: DecodeBudgets | None, max_boxes: int) -> np.ndarray:
    """An encoded frame and its boxes -> the model's input pixels, uint8 [K,256,128,3], as `osnet_frames`
    cuts them. The boxes are checked against the frame's header before any pixel is decoded."""
    image = open_item(encoded, 0, budgets, name=FRAME_NAME)
    try:
        whole = pixel_boxes(boxes, *image.size, max_boxes)
    except ImageRejected:
        image.close()
        raise
    if len(whole) == 0:
        image.close()
        return np.empty((0, INPUT_HEIGHT, INPUT_WIDTH, 3), dtype=np.uint8)
    return cut_boxes(load_rgb(image, FRAME_NAME), whole)
