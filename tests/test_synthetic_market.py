"""The generated dataset: Market-1501's layout and names, disjoint identities, determinism."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
from PIL import Image

from reid.market1501 import GALLERY_DIR, QUERY_DIR, SPLITS, TRAIN_DIR, MarketName, parse_market_name, read_market_split
from osnet_base.errors import OsnetTritonError
from engine_builder.synthetic_market import METADATA_FILE, SyntheticMarketSettings, generate_synthetic_market
from engine_builder.synthetic_people import render_person

SMALL = SyntheticMarketSettings(train_identities=4, test_identities=3, cameras=4, max_shots=3, distractors=3, junk=2, seed=5)


@pytest.fixture(scope="module")
def small_market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    counts = generate_synthetic_market(root, SMALL, workers=2)
    return root, counts


def test_layout_names_and_metadata(small_market):
    root, counts = small_market
    assert sorted(p.name for p in root.iterdir()) == sorted([*SPLITS, METADATA_FILE])
    for split in SPLITS:
        files = sorted((root / split).iterdir())
        assert len(files) == counts[split] > 0
        for path in files:
            name = parse_market_name(path.name)
            assert name is not None and name.filename == path.name, path.name
            with Image.open(path) as image:
                assert (image.format, image.size, image.mode) == ("JPEG", (64, 128), "RGB")
    metadata = json.loads((root / METADATA_FILE).read_text())
    assert metadata["settings"]["seed"] == 5 and metadata["splits"] == counts
    assert metadata["train_pids"] == [1, 4] and metadata["test_pids"] == [5, 7]


def test_splits_follow_market_1501(small_market):
    root, _ = small_market
    train, query, gallery = (read_market_split(root, split) for split in SPLITS)
    assert set(train.pids) == {1, 2, 3, 4}
    assert set(query.pids) == {5, 6, 7}
    assert set(gallery.pids) == {-1, 0, 5, 6, 7}
    assert Counter(gallery.pids)[-1] == 2 and Counter(gallery.pids)[0] == 3
    # One query per identity and camera, and each query has a match seen by another camera.
    assert len(set(zip(query.pids, query.camids))) == len(query)
    for pid, camid in zip(query.pids, query.camids):
        assert any(p == pid and c != camid for p, c in zip(gallery.pids, gallery.camids))
    for split in (train, query, gallery):
        assert set(split.camids) <= {1, 2, 3, 4}


def test_same_settings_give_the_same_bytes_and_a_smaller_test_split_is_a_subset(small_market, tmp_path):
    root, _ = small_market
    smaller = dataclasses.replace(SMALL, test_identities=2, distractors=0, junk=0)
    generate_synthetic_market(tmp_path, smaller, splits=(QUERY_DIR, GALLERY_DIR))
    assert not (tmp_path / TRAIN_DIR).exists()
    for split in (QUERY_DIR, GALLERY_DIR):
        files = sorted((tmp_path / split).iterdir())
        assert files and {parse_market_name(p.name).pid for p in files} == {5, 6}
        for path in files:
            assert path.read_bytes() == (root / split / path.name).read_bytes()


def test_people_and_cameras_differ():
    first = render_person(1, camera=1, shot=0, seed=0)
    assert first.tobytes() == render_person(1, camera=1, shot=0, seed=0).tobytes()
    for other in (render_person(2, 1, 0, 0), render_person(1, 2, 0, 0), render_person(1, 1, 1, 0), render_person(1, 1, 0, 1)):
        assert other.tobytes() != first.tobytes()


def test_existing_split_is_not_mixed_with_another(small_market):
    root, counts = small_market
    with pytest.raises(OsnetTritonError, match="already holds"):
        generate_synthetic_market(root, SMALL, splits=(QUERY_DIR,))
    assert generate_synthetic_market(root, SMALL, splits=(QUERY_DIR,), overwrite=True) == {QUERY_DIR: counts[QUERY_DIR]}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"cameras": 10}, "cameras must be"),
        ({"min_cameras": 1}, "min_cameras"),
        ({"train_identities": 0, "test_identities": 0}, "not both 0"),
        ({"min_shots": 1, "max_shots": 1}, "min_shots >= 2"),
        ({"test_identities": 0}, "junk needs"),
    ],
)
def test_settings_are_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **changes)


def test_market_names_round_trip():
    assert parse_market_name("0002_c1s1_000451_03.jpg") == MarketName(pid=2, camid=1, sequence=1, frame=451, box=3)
    assert parse_market_name("-1_c3s2_012045_02.jpg").pid == -1
    assert MarketName(pid=-1, camid=3, sequence=2, frame=12045, box=2).filename == "-1_c3s2_012045_02.jpg"
    assert parse_market_name("person.jpg") is None
