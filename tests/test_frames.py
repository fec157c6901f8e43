"""Frames and boxes through `osnet_frames`: a box embeds as the same box cut by the client and sent as
a lossless crop, boxes of frames from several cameras in flight together each get their own embedding,
and every bad box fails its own request only, named."""
from __future__ import annotations

import io
import json
import re
import threading
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from client.embedding_client import EmbeddingClient, InvalidInputError, encode_png
from crafted_images import crafted_tiff, encode, png_of_size
from engine_builder.synthetic_people import compose_frame, render_person
from osnet_base.contract import DEFAULT_MAX_BATCH_SIZE
from osnet_base.frame_boxes import pixel_boxes
from osnet_base.image_decoding import DEFAULT_BUDGETS

pytestmark = pytest.mark.server

CAMERAS = 4


@pytest.fixture
def client(triton_server):
    with EmbeddingClient(triton_server.grpc_url) as client:
        yield client


def people_frame(camera: int, frame: int, count: int, width: int = 480, height: int = 288):
    """A frame of `count` distinct people seen by `camera`, their crops, and their boxes."""
    people = [render_person(1000 * camera + 10 * frame + index, camera) for index in range(count)]
    image, boxes = compose_frame(people, width, height, camera=camera, seed=frame)
    return image, people, boxes


def test_a_box_embeds_as_the_client_cut_crop_sent_losslessly(client):
    image, _, boxes = people_frame(camera=1, frame=0, count=5)
    # Corners off the pixel grid, a box partly outside the frame, a box around two people, a tiny one.
    boxes = np.concatenate([boxes + np.float32([0.3, 0.6, -0.2, 0.4]), np.float32([[-20.5, 10, 60, 150], [0, 0, 300, 280],
                                                                                   [100.2, 50.7, 104.9, 55.1]])])
    frame = encode(image, "JPEG", quality=90)
    served = client.embed_frames([(frame, boxes)])[0]
    decoded = Image.open(io.BytesIO(frame)).convert("RGB")
    crops = [encode_png(np.asarray(decoded.crop(tuple(box)))) for box in pixel_boxes(boxes, *decoded.size, len(boxes)).tolist()]
    expected = client.embed_images(crops)
    cosines = np.sum(served * expected, axis=1)
    assert served.shape == (len(boxes), 512) and cosines.min() >= 0.9999, cosines.round(6)


def test_frames_from_four_cameras_in_flight_together_each_box_gets_its_own_embedding(triton_server, client):
    frames, expected = [], []
    for camera in range(CAMERAS):
        for number in range(3):
            image, people, boxes = people_frame(camera, number, count=1 + (camera + 2 * number) % 6)
            # Cameras 0 and 1 send PNG bytes, 2 and 3 decoded pixels (the client encodes them losslessly).
            frames.append((encode(image, "PNG") if camera < 2 else np.asarray(image), boxes))
            expected.append(client.embed_crops([np.asarray(person) for person in people]))
    every_expected = np.concatenate(expected)
    owner = np.concatenate([[(frame, box) for box in range(len(rows))] for frame, rows in enumerate(expected)])
    results: dict[tuple[int, int], list[np.ndarray]] = {}
    errors = []

    def camera_client(camera: int) -> None:
        mine = [index for index in range(len(frames)) if index // 3 == camera]
        try:
            with EmbeddingClient(triton_server.grpc_url) as own:
                for round_ in range(4):
                    for index, embeddings in zip(mine, own.embed_frames([frames[index] for index in mine])):
                        results.setdefault((index, round_), []).append(embeddings)
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=camera_client, args=(camera,)) for camera in range(CAMERAS)]
    for thread in threads:
        thread.start()
    every_frame_at_once = client.embed_frames(frames, concurrency=len(frames))
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    answers = [(index, embeddings) for (index, _), found in results.items() for embeddings in found]
    answers += list(enumerate(every_frame_at_once))
    assert len(answers) == len(frames) * 5
    for index, embeddings in answers:
        assert embeddings.shape == expected[index].shape
        for box, row in enumerate(embeddings):
            nearest = int(np.argmax(every_expected @ row))
            assert tuple(owner[nearest]) == (index, box), f"frame {index} box {box} got the embedding of {tuple(owner[nearest])}"
            assert row @ expected[index][box] >= 0.9999, (index, box)


BAD_BOXES = {
    "not a number": ([np.nan, 10, 50, 100], r"BOXES\[1\] = \(nan, 10, 50, 100\) has a corner that is not a finite number"),
    "infinite": ([0, 10, np.inf, 100], r"BOXES\[1\] = \(0, 10, inf, 100\) has a corner that is not a finite number"),
    "inverted": ([60, 10, 20, 100], r"BOXES\[1\] = \(60, 10, 20, 100\) is inverted"),
    "zero area": ([20, 10, 20, 100], r"BOXES\[1\] = \(20, 10, 20, 100\) has zero area"),
    "wholly outside": ([500, 10, 560, 100], r"BOXES\[1\] = \(500, 10, 560, 100\) lies wholly outside the 480x288 frame"),
    "left of the frame": ([-60, 10, 0, 100], r"BOXES\[1\] = \(-60, 10, 0, 100\) lies wholly outside the 480x288 frame"),
}


@pytest.mark.parametrize("case", list(BAD_BOXES))
def test_each_bad_box_is_refused_by_name(client, case):
    image, _, boxes = people_frame(camera=0, frame=1, count=3)
    corners, message = BAD_BOXES[case]
    bad = np.concatenate([boxes[:1], np.float32([corners]), boxes[1:]])
    frame = encode(image, "PNG")
    with pytest.raises(InvalidInputError, match=rf"frame 1: {message}"):
        client.embed_frames([(frame, boxes), (frame, bad)])
    assert client.embed_frames([(frame, boxes)])[0].shape == (3, 512)


def test_no_boxes_is_an_empty_answer_and_too_many_are_refused(client):
    image, _, boxes = people_frame(camera=0, frame=2, count=2)
    frame = encode(image, "PNG")
    empty, two = client.embed_frames([(frame, np.zeros((0, 4), np.float32)), (frame, boxes)])
    assert empty.shape == (0, 512) and two.shape == (2, 512)
    at_limit = np.repeat(boxes[:1], DEFAULT_MAX_BATCH_SIZE, axis=0)
    assert client.embed_frames([(frame, at_limit)])[0].shape == (DEFAULT_MAX_BATCH_SIZE, 512)
    with pytest.raises(InvalidInputError, match=rf"BOXES holds {DEFAULT_MAX_BATCH_SIZE + 1} boxes, over the limit of "
                                                rf"{DEFAULT_MAX_BATCH_SIZE} per frame \(MAX_BOXES\)"):
        client.embed_frames([(frame, np.repeat(boxes[:1], DEFAULT_MAX_BATCH_SIZE + 1, axis=0))])


def test_the_preprocessors_budgets_and_allowlist_hold_for_frames(client):
    box = np.float32([[0, 0, 64, 128]])
    width = 2000
    height = DEFAULT_BUDGETS.max_image_pixels // width
    assert client.embed_frames([(png_of_size(width, height), box)])[0].shape == (1, 512)
    with pytest.raises(InvalidInputError, match=rf"FRAME is {width}x{height + 1} pixels, over the limit of "
                                                rf"{DEFAULT_BUDGETS.max_image_pixels} \(MAX_IMAGE_PIXELS\)$"):
        client.embed_frames([(png_of_size(width, height + 1), box)])
    with pytest.raises(InvalidInputError, match=r"FRAME is \d+ bytes, over the limit .*\(MAX_IMAGE_BYTES\)"):
        client.embed_frames([(png_of_size(64, 128) + b"\x00" * DEFAULT_BUDGETS.max_image_bytes, box)])
    with pytest.raises(InvalidInputError, match=r"FRAME is a TIFF file: the preprocessor decodes only JPEG and PNG"):
        client.embed_frames([(crafted_tiff(), box)])
    with pytest.raises(InvalidInputError, match=r"FRAME is not a decodable PNG image"):
        noise = np.random.default_rng(0).integers(0, 256, (288, 480, 3), dtype=np.uint8)
        client.embed_frames([(encode(Image.fromarray(noise), "PNG")[:100_000], box)])  # cut off in its pixel data


def test_a_bad_box_fails_its_own_request_and_no_other_clients(triton_server):
    good = [people_frame(camera, 0, count=4) for camera in range(3)]
    encoded = [(encode(image, "PNG"), boxes) for image, _, boxes in good]
    with EmbeddingClient(triton_server.grpc_url) as client:
        expected = [client.embed_crops([np.asarray(person) for person in people]) for _, people, _ in good]
    stop = threading.Event()
    outcomes: Counter = Counter()
    bad_outcomes: Counter = Counter()

    def good_client(slot: int) -> None:
        with EmbeddingClient(triton_server.grpc_url) as client:
            while not stop.is_set():
                index = slot % len(encoded)
                try:
                    embeddings = client.embed_frames([encoded[index]])[0]
                    outcomes["ok" if np.sum(embeddings * expected[index], axis=1).min() >= 0.9999 else "wrong"] += 1
                except Exception as exc:  # counted: a good request must not fail
                    outcomes[f"failed: {exc}"[:200]] += 1
                slot += 1

    def bad_client() -> None:
        cases = list(BAD_BOXES.values())
        with EmbeddingClient(triton_server.grpc_url) as client:
            for step in range(10_000):
                if stop.is_set():
                    return
                frame, boxes = encoded[step % len(encoded)]
                corners, message = cases[step % len(cases)]
                try:
                    client.embed_frames([(frame, np.concatenate([boxes[:1], np.float32([corners]), boxes[1:]]))])
                    bad_outcomes["served"] += 1
                except InvalidInputError as exc:
                    bad_outcomes["named" if re.search(message, str(exc)) else str(exc)] += 1

    threads = [threading.Thread(target=good_client, args=(slot,)) for slot in range(4)] + [threading.Thread(target=bad_client)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert set(outcomes) == {"ok"} and outcomes["ok"] >= 20, outcomes
    assert set(bad_outcomes) == {"named"} and bad_outcomes["named"] >= 10, bad_outcomes


def test_osnet_client_embed_frames_reads_a_folder_and_a_boxes_file(triton_server, client, tmp_path, capsys):
    from client.cli import main

    folder, rows, expected = tmp_path / "frames", [], []
    for camera in (1, 2):
        (folder / f"cam{camera}").mkdir(parents=True)
        for number in range(2):
            image, _, boxes = people_frame(camera, number, count=2 + number)
            name = f"cam{camera}/{number:06d}.jpg"
            (folder / name).write_bytes(encode(image, "JPEG", quality=90))
            rows += [{"frame": name, "camera": camera, "x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)}
                     for x1, y1, x2, y2 in boxes.tolist()]
            expected.append(client.embed_frames([((folder / name).read_bytes(), boxes)])[0])
    order = np.random.default_rng(0).permutation(len(rows))  # rows of one frame need not be together
    rows, expected = [rows[i] for i in order], np.concatenate(expected)[order]
    (tmp_path / "boxes.csv").write_text("frame,camera,x1,y1,x2,y2\n" + "".join(
        f"{r['frame']},{r['camera']},{r['x1']},{r['y1']},{r['x2']},{r['y2']}\n" for r in rows))
    (tmp_path / "boxes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for boxes_file in ("boxes.csv", "boxes.jsonl"):
        output = tmp_path / boxes_file.replace(".", "_")
        assert main(["embed-frames", str(folder), "--boxes", str(tmp_path / boxes_file), "-o", str(output),
                     "--url", triton_server.grpc_url]) == 0
        assert f"embedded {len(rows)} boxes of 4 frames from 2 cameras" in capsys.readouterr().out
        np.testing.assert_allclose(np.load(output.with_suffix(".npy")), expected, atol=1e-6)
        assert output.with_suffix(".csv").read_text().splitlines()[1].startswith(f"{rows[0]['frame']},{rows[0]['camera']},")
    rows[3] = {**rows[3], "x2": rows[3]["x1"] - 5}
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["embed-frames", str(folder), "--boxes", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "bad"),
                 "--url", triton_server.grpc_url]) == 1
    assert re.search(rf"osnet-client: error: {rows[3]['frame']}: BOXES\[\d\] = .* is inverted", capsys.readouterr().err)
    (tmp_path / "bad.csv").write_text("frame,camera,x1,y1,x2,y2\ncam1/000000.jpg,1,1,2,three,4\n")
    assert main(["embed-frames", str(folder), "--boxes", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "bad"),
                 "--url", triton_server.grpc_url]) == 1
    assert "bad.csv line 2: the corners" in capsys.readouterr().err
