"""Encoded person crops -> the model's input pixels, and the rules for what is decoded at all.

The served `preprocess` model runs this file (the repository writer copies it beside its model.py,
as it does contract.py); the client fits pixel crops with `fit_to_input`, and the in-process pipeline
of the benchmark decodes with it too, so all of them produce the same pixels. Standard library,
NumPy and Pillow only; NumPy < 2 in the python backend (see notes/triton-on-cpu.md).

Pixels are torchreid's FeatureExtractor's: the image converted to RGB, resized to 256x128 with PIL's
bilinear filter (aspect ratio not kept), as uint8 [256,128,3]. The graph does /255, mean and std.

What is decoded (every refusal is `ImageRejected`, naming the item; nothing else escapes):
- only JPEG and PNG, identified by Pillow's JPEG and PNG plugins alone: none of Pillow's ~40 other
  decoders (TIFF, IM, DDS, JPEG 2000, EPS, ...) ever parses a client's bytes. Other formats are
  refused, and named when their signature is known;
- within the budgets (`DecodeBudgets`): encoded bytes and pixels per image, pixels per request,
  all checked from the bytes and the headers before any pixel of the request is decoded;
- JPEGs with at most `MAX_JPEG_SCANS` scans: libjpeg decodes every scan over the whole image, so a
  small progressive file of thousands of scans holds a decoder for seconds;
- 16-bit grayscale PNGs are reduced to 8 bits by their high byte, as Pillow itself reduces 16-bit
  RGB, RGBA and gray+alpha PNGs (PIL's own RGB conversion would clip them to white). Pixel modes
  that neither format should produce are refused by name.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

if __package__:  # osnet_base.image_decoding
    from .contract import IMAGE_FORMATS, INPUT_HEIGHT, INPUT_WIDTH
else:  # copied beside a python-backend model.py, with the copy of contract.py
    from contract import IMAGE_FORMATS, INPUT_HEIGHT, INPUT_WIDTH

MAX_JPEG_SCANS = 100  # libjpeg's progressive default is 10; an EXIF thumbnail adds its own
# Text and ICC chunks are inflated while the header is read; we use neither. Pillow's defaults allow
# 1 MiB per chunk and 64 MiB in all, inflated before any budget could be checked.
MAX_PNG_TEXT_CHUNK_BYTES, MAX_PNG_TEXT_BYTES = 256 << 10, 1 << 20
# Modes JPEG and PNG decode to, that convert("RGB") turns into the image's colours (alpha dropped,
# CMYK and palettes converted, as torchreid's pipeline does); the 16-bit grays are reduced first.
RGB_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L"})
ACCEPTED, EITHER = " and ".join(IMAGE_FORMATS), " or ".join(IMAGE_FORMATS)

# First bytes of formats a client may send by mistake, to name them in the refusal.
_SIGNATURES = (
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (0, b"II+\x00", "BigTIFF"), (0, b"MM\x00+", "BigTIFF"),
    (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"), (8, b"WEBP", "WebP"), (0, b"BM", "BMP"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (0, b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"), (0, b"\xff\x0a", "JPEG XL"),
    (0, b"DDS ", "DDS"), (0, b"Image type", "IM"), (0, b"Image size", "IM"), (0, b"8BPS", "Photoshop PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"), (0, b"icns", "ICNS"), (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"), (0, b"%PDF", "PDF"), (4, b"ftypavif", "AVIF"), (4, b"ftypheic", "HEIC"),
    (4, b"ftypmif1", "HEIF"), (0, b"qoif", "QOI"), (0, b"v/1\x01", "OpenEXR"), (0, b"SIMPLE  =", "FITS"),
    (0, b"\x01\xda", "SGI"), (0, b"BLP", "BLP"),
)


class ImageRejected(ValueError):
    """An item the preprocessor will not decode; the message names the item and says why."""


@dataclass(frozen=True, kw_only=True)
class DecodeBudgets:
    """The most a request may make the preprocessor read and decode; see DEFAULT_BUDGETS for why."""

    max_image_bytes: int
    max_image_pixels: int
    max_request_pixels: int

    def __post_init__(self) -> None:
        for name in BUDGET_NAMES:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(f"max_request_pixels ({self.max_request_pixels}) must hold at least one image of "
                             f"max_image_pixels ({self.max_image_pixels})")

    def as_parameters(self) -> dict[str, str]:
        """The budgets as the config parameters of the models that decode (MAX_IMAGE_BYTES, ...)."""
        return {name.upper(): str(getattr(self, name)) for name in BUDGET_NAMES}

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> DecodeBudgets:
        return cls(**{name: int(parameters[name.upper()]) for name in BUDGET_NAMES})


BUDGET_NAMES = ("max_image_bytes", "max_image_pixels", "max_request_pixels")


# Measured on this project's 2-core machine (Pillow 13, one thread): JPEG decodes, converts and
# resizes at 3.4 ms per megapixel (a smooth photo, baseline) to 9.6 (noise, baseline) and ~37 (noise,
# progressive, as much as fits 1 MiB: the worst legal case); PNG at 5-14 ms/MP. So the largest image
# costs at most ~80 ms of one core, and the largest request ~80 ms of the two decode threads (the
# benchmark measures it): no legal request holds the preprocessor much longer than 100 ms. 2.1 MP holds
# a whole 1080p frame, far more than any person crop; 64 crops of 256x256 fit one request. 1 MiB holds
# a 2 MP photo at JPEG quality 95; it also bounds what a request makes the python backend copy into its
# shared memory (Triton 2.51 has no gRPC size limit of its own, and that region never shrinks).
DEFAULT_BUDGETS = DecodeBudgets(max_image_bytes=1 << 20, max_image_pixels=2_100_000, max_request_pixels=4_200_000)


def harden_pillow() -> None:
    """What the server process sets once: our budgets replace Pillow's bomb check (which would raise from
    inside Image.open with a vaguer message), and PNG text chunks are capped."""
    Image.MAX_IMAGE_PIXELS = None
    PngImagePlugin.MAX_TEXT_CHUNK = MAX_PNG_TEXT_CHUNK_BYTES
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES


def signature_name(encoded: bytes) -> str | None:
    """The format `encoded` announces in its first bytes, if it is one we know by name."""
    for offset, magic, name in _SIGNATURES:
        if encoded[offset : offset + len(magic)] == magic:
            return name
    if len(encoded) >= 3 and encoded[:1] == b"P" and encoded[1:2] in b"1234567" and encoded[2:3].isspace():
        return "PPM/PGM/PBM"
    return None


def _refuse_format(encoded: bytes, item: str) -> ImageRejected:
    name = signature_name(encoded)
    if name is not None:
        return ImageRejected(f"{item} is a {name} file: the preprocessor decodes only {ACCEPTED}")
    return ImageRejected(f"{item} ({len(encoded)} bytes, starting {encoded[:8].hex(' ')}) is not a {EITHER} "
                         f"file: the preprocessor decodes only {ACCEPTED}")


def open_item(encoded: object, index: int, budgets: DecodeBudgets | None, *, name: str | None = None) -> Image.Image:
    """Item `index` of a request, identified and checked from its bytes and header; no pixel is decoded.
    `budgets` None: no size limits (trusted local files). `name`: what the messages call the item
    (default IMAGE[index]; `osnet_frames` says FRAME)."""
    item = name or f"IMAGE[{index}]"
    crop_hint = "" if name else ": send a person crop, not a whole frame"
    if not isinstance(encoded, bytes) or not encoded:
        raise ImageRejected(f"{item} is empty: expected the bytes of one {EITHER} file")
    if budgets is not None and len(encoded) > budgets.max_image_bytes:
        raise ImageRejected(f"{item} is {len(encoded)} bytes, over the limit of {budgets.max_image_bytes} "
                            f"(MAX_IMAGE_BYTES){crop_hint}")
    try:
        image = Image.open(io.BytesIO(encoded), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise _refuse_format(encoded, item) from None
    except Exception as exc:  # a header that breaks its parser, however it breaks it
        raise ImageRejected(f"{item} is not a decodable {EITHER} file ({len(encoded)} bytes): "
                            f"{type(exc).__name__}: {exc}") from None
    width, height = image.size
    if budgets is not None and width * height > budgets.max_image_pixels:
        raise ImageRejected(f"{item} is {width}x{height} pixels, over the limit of {budgets.max_image_pixels} "
                            f"(MAX_IMAGE_PIXELS){crop_hint}")
    if image.format != "PNG":  # JPEG, or MPO: a JPEG with more pictures after the first
        scans = encoded.count(b"\xff\xda")  # start-of-scan markers; entropy-coded data never holds one
        if scans > MAX_JPEG_SCANS:
            raise ImageRejected(f"{item} is a JPEG of {scans} scans, over the limit of {MAX_JPEG_SCANS}")
    if image.mode not in RGB_CONVERTIBLE_MODES and image.mode not in SIXTEEN_BIT_GRAY_MODES:
        raise ImageRejected(f"{item} is a {image.format} of pixel mode {image.mode}, which the preprocessor "
                            "does not convert to RGB")
    return image


def open_request(items: Sequence[object], budgets: DecodeBudgets | None) -> list[Image.Image]:
    """Every item of one request opened and checked, and their pixels held to the request's budget,
    before any of them is decoded. Raises `ImageRejected` for the first item that fails."""
    images = [open_item(encoded, index, budgets) for index, encoded in enumerate(items)]
    pixels = sum(image.size[0] * image.size[1] for image in images)
    if budgets is not None and pixels > budgets.max_request_pixels:
        raise ImageRejected(f"the request's {len(images)} images hold {pixels} pixels, over the limit of "
                            f"{budgets.max_request_pixels} per request (MAX_REQUEST_PIXELS): send fewer per request; "
                            "nothing was decoded")
    return images


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image in RGB, as torchreid converts it; 16-bit grays reduced to 8 bits first."""
    if image.mode in SIXTEEN_BIT_GRAY_MODES:
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


def fit_to_input(image: Image.Image) -> np.ndarray:
    """A decoded image -> the model's input pixels, uint8 [256,128,3] RGB."""
    return np.asarray(to_rgb(image).resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BILINEAR))


def load_rgb(image: Image.Image, item: str) -> Image.Image:
    """Decode an opened image, in RGB; any failure is `ImageRejected` naming `item`."""
    try:
        image.load()
        return to_rgb(image)
    except Exception as exc:  # crafted files make decoders raise all sorts: each stays its own item's error
        raise ImageRejected(f"{item} is not a decodable {image.format} image: {type(exc).__name__}: {exc}") from None
    finally:
        image.close()


def decode_item(image: Image.Image, index: int) -> np.ndarray:
    """Decode an opened item into the model's input pixels; any failure is `ImageRejected` naming it."""
    return np.asarray(load_rgb(image, f"IMAGE[{index}]").resize((INPUT_WIDTH, INPUT_HEIGHT), Image.BILINEAR))


class ParallelDecoder:
    """Decodes many opened items at once on `threads` threads, the caller's among them: Pillow releases
    the GIL while it decodes and resizes. The items are dealt out round-robin, one part per thread,
    so a batch of crops costs `threads - 1` hand-offs, not one per item."""

    def __init__(self, threads: int):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="decode") if threads > 1 else None

    def decode(self, work: Sequence[tuple[Image.Image, int]]) -> list[np.ndarray | ImageRejected]:
        """For each (opened image, its index in its request) of `work`, in order: its pixels, or why it failed."""
        parts = min(self.threads, len(work))
        if parts <= 1:
            return _decode_part(work)
        jobs = [self._pool.submit(_decode_part, work[part::parts]) for part in range(1, parts)]
        decoded = [_decode_part(work[0::parts]), *(job.result() for job in jobs)]
        return [decoded[position % parts][position // parts] for position in range(len(work))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _decode_part(work: Sequence[tuple[Image.Image, int]]) -> list[np.ndarray | ImageRejected]:
    outcomes: list[np.ndarray | ImageRejected] = []
    for image, index in work:
        try:
            outcomes.append(decode_item(image, index))
        except ImageRejected as exc:
            outcomes.append(exc)
        except Exception as exc:  # decode_item converts every failure; this guards that promise, never a thread
            outcomes.append(ImageRejected(f"IMAGE[{index}] could not be decoded: {type(exc).__name__}: {exc}"))
    return outcomes


def decode(encoded: bytes, budgets: DecodeBudgets | None = None) -> np.ndarray:
    """One encoded image -> uint8 [256,128,3], as the served preprocessor decodes it."""
    return decode_item(open_item(encoded, 0, budgets), 0)


def pixels_of_array(crop: np.ndarray, index: int = 0) -> np.ndarray:
    """A decoded crop (uint8 [H,W,3] RGB, [H,W,4] RGBA or [H,W] gray, e.g. cut from a frame) -> the model's
    input pixels, resized exactly as the preprocessor resizes a decoded file."""
    crop = np.asarray(crop)
    if crop.dtype != np.uint8 or not (crop.ndim == 2 or (crop.ndim == 3 and crop.shape[2] in (3, 4))) or 0 in crop.shape:
        raise ImageRejected(f"crop {index} is {crop.dtype} of shape {crop.shape}: expected uint8 [H,W,3] RGB, "
                            "[H,W,4] RGBA or [H,W] gray")
    if crop.shape[:2] == (INPUT_HEIGHT, INPUT_WIDTH) and crop.ndim == 3 and crop.shape[2] == 3:
        return crop  # already the input: PIL's resize to the same size copies the pixels unchanged
    return fit_to_input(Image.fromarray(np.ascontiguousarray(crop)))
