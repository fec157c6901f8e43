"""Deterministic synthetic person crops, so demos, tests and load tests need no download.

Each identity has its own build and clothing (shirt and trouser colours, a stripe pattern, a bag);
each camera its own background, illumination and colour cast; each shot a small pose jitter.
The same (identity, camera, shot, seed) always gives the same pixels.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CROP_WIDTH, CROP_HEIGHT = 64, 128


@dataclass(frozen=True)
class Identity:
    skin: tuple[int, int, int]
    shirt: tuple[int, int, int]
    trousers: tuple[int, int, int]
    stripe: tuple[int, int, int] | None
    bag: tuple[int, int, int] | None
    width_scale: float
    height_scale: float


@dataclass(frozen=True)
class Camera:
    background: tuple[int, int, int]
    brightness: float
    cast: tuple[float, float, float]
    blur: float


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def make_identity(identity: int, seed: int = 0) -> Identity:
    rng = np.random.default_rng([seed, identity, 1])
    return Identity(
        skin=tuple(int(v) for v in rng.integers(90, 240, size=3)),
        shirt=_colour(rng),
        trousers=_colour(rng),
        stripe=_colour(rng) if rng.random() < 0.5 else None,
        bag=_colour(rng) if rng.random() < 0.4 else None,
        width_scale=float(rng.uniform(0.8, 1.2)),
        height_scale=float(rng.uniform(0.9, 1.05)),
    )


def make_camera(camera: int, seed: int = 0) -> Camera:
    rng = np.random.default_rng([seed, camera, 2])
    return Camera(
        background=tuple(int(v) for v in rng.integers(40, 200, size=3)),
        brightness=float(rng.uniform(0.7, 1.25)),
        cast=tuple(float(v) for v in rng.uniform(0.85, 1.15, size=3)),
        blur=float(rng.uniform(0.0, 1.2)),
    )


def render_person(identity: int, camera: int = 0, shot: int = 0, seed: int = 0) -> Image.Image:
    """An RGB crop of `identity` as seen by `camera`; `shot` varies pose and position slightly."""
    person, view = make_identity(identity, seed), make_camera(camera, seed)
    rng = np.random.default_rng([seed, identity, camera, shot, 3])
    image = Image.new("RGB", (CROP_WIDTH, CROP_HEIGHT), view.background)
    draw = ImageDraw.Draw(image)
    for _ in range(3):  # background clutter, so crops are not flat fields
        x0, y0 = rng.integers(0, CROP_WIDTH), rng.integers(0, CROP_HEIGHT)
        draw.rectangle([x0, y0, x0 + rng.integers(4, 20), y0 + rng.integers(4, 30)], fill=_colour(rng))

    cx = CROP_WIDTH / 2 + rng.uniform(-4, 4)
    top = 8 + rng.uniform(-3, 3)
    scale_y = person.height_scale * CROP_HEIGHT / 128
    half_width = 13 * person.width_scale

    def y(v: float) -> float:
        return top + v * scale_y

    draw.ellipse([cx - 7, y(0), cx + 7, y(16)], fill=person.skin)
    draw.rectangle([cx - half_width, y(17), cx + half_width, y(62)], fill=person.shirt)
    if person.stripe is not None:
        for row in range(22, 60, 9):
            draw.rectangle([cx - half_width, y(row), cx + half_width, y(row + 3)], fill=person.stripe)
    stride = rng.uniform(-4, 4)
    draw.rectangle([cx - half_width + 1, y(62), cx - 1, y(112)], fill=person.trousers)
    draw.rectangle([cx + 1 + stride / 2, y(62), cx + half_width - 1 + stride, y(112)], fill=person.trousers)
    if person.bag is not None:
        draw.rectangle([cx + half_width - 2, y(35), cx + half_width + 8, y(58)], fill=person.bag)

    pixels = np.asarray(image, dtype=np.float32) * view.brightness * np.array(view.cast, dtype=np.float32)
    pixels += rng.normal(0, 4, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(view.blur)) if view.blur > 0.3 else image


def encode_jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def person_jpegs(count: int, cameras: int = 2, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEG crops: identities cycle, each seen by every camera in turn."""
    return [encode_jpeg(render_person(i // cameras, camera=i % cameras, seed=seed)) for i in range(count)]
