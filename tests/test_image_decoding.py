"""What the preprocessor decodes and refuses (osnet_base/image_decoding.py), in-process: the rules the
served `preprocess` model runs, and the pixels the client and the calibration sets get from them."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from crafted_images import (
    accepted_kinds,
    crafted_dds,
    crafted_im,
    crafted_tiff,
    encode,
    jpeg_with_scans,
    mutated,
    other_formats,
    person,
    png_of_size,
)
from engine_builder.preprocessing import preprocess_encoded
from osnet_base.contract import IMAGENET_MEAN, IMAGENET_STD
from osnet_base.image_decoding import (
    DEFAULT_BUDGETS,
    MAX_JPEG_SCANS,
    DecodeBudgets,
    ImageRejected,
    ParallelDecoder,
    decode,
    decode_item,
    open_item,
    open_request,
    pixels_of_array,
)

pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")


def torchreid_pixels(encoded: bytes) -> np.ndarray:
    """The pixels torchreid's FeatureExtractor normalises, recovered from its output."""
    normalised = preprocess_encoded(encoded).numpy().transpose(1, 2, 0)
    return np.rint((normalised * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)) * 255).astype(np.uint8)


@pytest.mark.parametrize("kind", sorted(accepted_kinds()))
def test_each_accepted_kind_gives_torchreids_pixels(kind):
    sent, reference = accepted_kinds()[kind]
    pixels = decode(sent, DEFAULT_BUDGETS)
    assert pixels.shape == (256, 128, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, torchreid_pixels(reference))


def test_pil_would_clip_a_16_bit_gray_png_to_white():
    # Why 16-bit gray needs its own conversion: the picture torchreid's pipeline makes of it is blank.
    sent, reference = accepted_kinds()["png_16bit_gray"]
    assert (torchreid_pixels(sent) == 255).mean() > 0.9
    assert not np.array_equal(torchreid_pixels(sent), torchreid_pixels(reference))


@pytest.mark.parametrize("name", sorted(other_formats()))
def test_other_formats_are_refused_by_name(name):
    data = other_formats()[name]
    Image.open(io.BytesIO(data)).load()  # Pillow would decode it: the allowlist is what refuses it
    with pytest.raises(ImageRejected, match=rf"^IMAGE\[0\] is a {name} file: the preprocessor decodes only JPEG and PNG$"):
        open_item(data, 0, DEFAULT_BUDGETS)


@pytest.mark.parametrize(("data", "raises", "name"), [(crafted_im(), TypeError, "IM"), (crafted_tiff(), TypeError, "TIFF"),
                                                       (crafted_dds(), NotImplementedError, "DDS")], ids=["im", "tiff", "dds"])
def test_crafted_files_never_reach_the_decoders_they_break(data, raises, name):
    with pytest.raises(raises):  # what these files do to the decoder of their format
        Image.open(io.BytesIO(data)).load()
    with pytest.raises(ImageRejected, match=rf"IMAGE\[3\] is a {name} file"):
        open_item(data, 3, DEFAULT_BUDGETS)


def test_unknown_bytes_are_refused_with_their_first_bytes():
    with pytest.raises(ImageRejected, match=r"IMAGE\[1\] \(23 bytes, starting 64 65 66 69 6e 69 74 65\) is not a JPEG or PNG"):
        open_item(b"definitely not an image", 1, DEFAULT_BUDGETS)
    with pytest.raises(ImageRejected, match=r"IMAGE\[2\] is empty"):
        open_item(b"", 2, DEFAULT_BUDGETS)


def test_every_failure_of_a_broken_file_is_its_own_items_refusal():
    rng = np.random.default_rng(0)
    sources = [encode(person(), "JPEG"), encode(person(), "JPEG", progressive=True), encode(person(), "PNG"),
               encode(person().convert("P"), "PNG")]
    outcomes = {"decoded": 0, "refused": 0}
    for source in sources:
        for _ in range(150):
            data = mutated(source, rng)
            try:
                pixels = decode_item(open_item(data, 7, DEFAULT_BUDGETS), 7)
            except ImageRejected as exc:
                assert str(exc).startswith("IMAGE[7] ")
                outcomes["refused"] += 1
            else:
                assert pixels.shape == (256, 128, 3)
                outcomes["decoded"] += 1
    assert outcomes["refused"] > 50 and outcomes["decoded"] > 50, outcomes


def test_budgets_are_checked_from_the_bytes_and_headers():
    budgets = DecodeBudgets(max_image_bytes=20_000, max_image_pixels=40_000, max_request_pixels=100_000)
    jpeg = encode(person(size=(100, 200)), "JPEG")
    assert len(jpeg) < 20_000
    with pytest.raises(ImageRejected, match=r"IMAGE\[0\] is 20001 bytes, over the limit of 20000 \(MAX_IMAGE_BYTES\)"):
        open_item(jpeg + b"\x00" * (20_001 - len(jpeg)), 0, budgets)
    open_item(png_of_size(200, 200), 0, budgets)
    with pytest.raises(ImageRejected, match=r"IMAGE\[0\] is 201x200 pixels, over the limit of 40000 \(MAX_IMAGE_PIXELS\)"):
        open_item(png_of_size(201, 200), 0, budgets)
    # 3 x 40,000 pixels is over the request's 100,000; the broken last item is never decoded, nor even read past its header.
    broken = png_of_size(200, 200)[:60]
    assert len(open_request([png_of_size(200, 200), png_of_size(200, 200)], budgets)) == 2
    with pytest.raises(ImageRejected, match=r"3 images hold 120000 pixels, over the limit of 100000 per request \(MAX_REQUEST_PIXELS\)"):
        open_request([png_of_size(200, 200), png_of_size(200, 200), broken], budgets)


def test_a_jpeg_of_too_many_scans_is_refused():
    assert decode(jpeg_with_scans(MAX_JPEG_SCANS - 20), DEFAULT_BUDGETS).shape == (256, 128, 3)
    with pytest.raises(ImageRejected, match=rf"IMAGE\[0\] is a JPEG of {MAX_JPEG_SCANS + 10} scans, over the limit of {MAX_JPEG_SCANS}"):
        open_item(jpeg_with_scans(MAX_JPEG_SCANS), 0, DEFAULT_BUDGETS)


@pytest.mark.parametrize("bad", [{"max_image_bytes": 0}, {"max_request_pixels": 10, "max_image_pixels": 20}])
def test_budgets_refuse_nonsense(bad):
    values = {"max_image_bytes": 1, "max_image_pixels": 1, "max_request_pixels": 1} | bad
    with pytest.raises(ValueError):
        DecodeBudgets(**values)


def test_pixel_crops_fit_as_the_preprocessor_fits_a_decoded_file():
    crop = np.asarray(person(size=(61, 143)))
    np.testing.assert_array_equal(pixels_of_array(crop), decode(encode(Image.fromarray(crop), "PNG")))
    gray = crop[..., 0]
    np.testing.assert_array_equal(pixels_of_array(gray), decode(encode(Image.fromarray(gray), "PNG")))
    rgba = np.dstack([crop, np.full(crop.shape[:2], 200, np.uint8)])
    np.testing.assert_array_equal(pixels_of_array(rgba), decode(encode(Image.fromarray(rgba), "PNG")))
    exact = np.asarray(person(size=(128, 256)))
    assert pixels_of_array(exact) is exact
    np.testing.assert_array_equal(pixels_of_array(exact), decode(encode(Image.fromarray(exact), "PNG")))
    for bad in (crop.astype(np.float32), crop[..., :2], np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageRejected, match="crop 4 is"):
            pixels_of_array(bad, 4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_parallel_decoder_keeps_the_order_and_each_items_own_outcome(threads):
    good = [encode(person(identity, size=(40 + identity, 90)), "JPEG") for identity in range(7)]
    broken = encode(person(), "PNG")[:120]  # a valid header, then nothing
    items = good[:3] + [broken] + good[3:]
    work = [(open_item(data, index, DEFAULT_BUDGETS), index) for index, data in enumerate(items)]
    decoder = ParallelDecoder(threads)
    try:
        outcomes = decoder.decode(work)
    finally:
        decoder.close()
    assert isinstance(outcomes[3], ImageRejected) and str(outcomes[3]).startswith("IMAGE[3] is not a decodable PNG")
    for outcome, data in zip(outcomes[:3] + outcomes[4:], good):
        np.testing.assert_array_equal(outcome, decode(data))
