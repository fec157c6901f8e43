"""Image files for the preprocessor's tests: every kind of JPEG and PNG it must decode as torchreid
does, files of other formats, and the crafted files a hostile client sends; and torchreid's own
pipeline, which the served embeddings are held to."""
from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import torch
from PIL import Image

from engine_builder.preprocessing import preprocess_encoded
from engine_builder.synthetic_people import render_person


def torchreid_embeddings(model, encoded: list[bytes]) -> np.ndarray:
    """torchreid's FeatureExtractor pipeline in-process: PIL RGB, bilinear resize, normalise, eval OSNet, L2."""
    with torch.inference_mode():
        features = model(torch.stack([preprocess_encoded(item) for item in encoded]))
    return torch.nn.functional.normalize(features, dim=1).numpy()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 pixels [H,W] (gray), [H,W,2] (gray+alpha), [H,W,3] (RGB) or [H,W,4] (RGBA):
    Pillow writes 16 bits only for gray."""
    pixels = np.asarray(pixels, dtype=">u2")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def png_of_size(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size whose pixels are all zero: tiny to send, huge to decode."""
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def person(identity: int = 5, size: tuple[int, int] = (97, 211)) -> Image.Image:
    return render_person(identity, camera=1).resize(size)


@functools.cache
def accepted_kinds() -> dict[str, tuple[bytes, bytes]]:
    """name -> (what is sent, the 8-bit file torchreid's pipeline reads for the same picture)."""
    rgb = person()
    gray16 = (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    rgb16 = np.asarray(rgb).astype(np.uint16) * 257
    gray_alpha16 = np.stack([gray16, np.full_like(gray16, 40000)], axis=-1)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    kinds = {
        "jpeg": encode(rgb, "JPEG", quality=92),
        "jpeg_progressive": encode(rgb, "JPEG", quality=92, progressive=True),
        "jpeg_grayscale": encode(rgb.convert("L"), "JPEG"),
        "jpeg_cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "png": encode(rgb, "PNG"),
        "png_grayscale": encode(rgb.convert("L"), "PNG"),
        "png_rgba": encode(rgb.convert("RGBA"), "PNG"),
        "png_gray_alpha": encode(rgb.convert("LA"), "PNG"),
        "png_palette": encode(palette, "PNG"),
        "png_palette_transparency": encode(transparent, "PNG"),
        "png_1bit": encode(rgb.convert("1"), "PNG"),
    }
    pairs = {name: (data, data) for name, data in kinds.items()}
    pairs["png_16bit_gray"] = (png16(gray16), encode(rgb.convert("L"), "PNG"))
    pairs["png_16bit_rgb"] = (png16(rgb16), encode(rgb, "PNG"))
    pairs["png_16bit_gray_alpha"] = (png16(gray_alpha16), encode(rgb.convert("L"), "PNG"))
    return pairs


@functools.cache
def other_formats() -> dict[str, bytes]:
    """Files Pillow would decode, in formats the preprocessor refuses: name in the refusal -> file."""
    rgb = person()
    return {
        "TIFF": encode(rgb, "TIFF"), "GIF": encode(rgb, "GIF"), "BMP": encode(rgb, "BMP"), "WebP": encode(rgb, "WEBP"),
        "JPEG 2000": encode(rgb, "JPEG2000"), "IM": encode(rgb, "IM"), "DDS": encode(rgb, "DDS"), "ICO": encode(rgb, "ICO"),
        "PPM/PGM/PBM": encode(rgb, "PPM"), "QOI": encode(rgb, "QOI"), "SGI": encode(rgb, "SGI"),
    }


def crafted_im() -> bytes:
    """An IM header whose size has three numbers: Pillow's IM decoder raises TypeError on it."""
    return b"Image type: L image\r\nImage size (x*y): 1*2*3\r\n\x1a" + b"\x00" * 600


def crafted_tiff() -> bytes:
    """A TIFF whose strip offsets are a RATIONAL: Pillow's TIFF decoder raises TypeError on it."""
    def entry(tag: int, kind: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag, kind, 1) + value.ljust(4, b"\x00")

    short, long_ = (lambda v: struct.pack("<H", v)), (lambda v: struct.pack("<I", v))
    entries = [entry(256, 3, short(4)), entry(257, 3, short(4)), entry(258, 3, short(8)), entry(259, 3, short(1)),
               entry(262, 3, short(1)), entry(273, 5, long_(300)), entry(277, 3, short(1)), entry(278, 3, short(4)),
               entry(279, 4, long_(16))]
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + struct.pack("<I", 0) + b"\x00" * 300


def crafted_dds() -> bytes:
    """A DDS header with no pixel format flags: Pillow's DDS decoder raises NotImplementedError on it."""
    return (b"DDS " + struct.pack("<I", 124) + struct.pack("<3I", 0x1007, 16, 16) + b"\x00" * 56
            + struct.pack("<4I", 32, 0, 0, 0) + b"\x00" * 36)


def mutated(data: bytes, rng: np.random.Generator, flips: int = 4) -> bytes:
    """`data` with a few random bytes replaced, past the first 2 (so it still claims its format)."""
    corrupted = bytearray(data)
    for position in rng.integers(2, len(data), size=flips):
        corrupted[position] = int(rng.integers(0, 256))
    return bytes(corrupted)


def jpeg_with_scans(extra_scans: int) -> bytes:
    """A progressive JPEG with `extra_scans` copies of its last scan appended: libjpeg decodes every
    scan over the whole image, so such files cost far more to decode than their size suggests."""
    data = encode(person(size=(128, 256)), "JPEG", quality=90, progressive=True)
    last_scan = data.rindex(b"\xff\xda")
    return data[:-2] + data[last_scan:-2] * extra_scans + b"\xff\xd9"
