"""A deterministic multi-camera person dataset in Market-1501's layout, drawn by `synthetic_people`.

Market-1501 (Zheng et al., ICCV 2015, https://zheng-lab-anu.github.io/Project/project_reid.html):
identities seen by 2..6 cameras, each as a short tracklet of detector boxes; training and test
identities are disjoint; for every test identity and camera one box is a query and the rest go to
the gallery with distractor boxes (`0000`) and junk boxes (`-1`, bad detections).

Identities are numbered 1..train_identities for `bounding_box_train/` and on from there for the test
splits, and an identity's images depend only on (seed, identity): a smaller test split of the same
seed and `train_identities` holds the same people and files as the full one, never a training one.

  python -m engine_builder.synthetic_market --output data/synthetic_market --seed 0
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reid.market1501 import DISTRACTOR_PID, GALLERY_DIR, JUNK_PID, QUERY_DIR, SPLITS, TRAIN_DIR, MarketName
from osnet_base.errors import OsnetTritonError
from engine_builder.synthetic_people import (
    CROP_HEIGHT,
    CROP_WIDTH,
    apply_camera,
    draw_background,
    encode_jpeg,
    make_camera,
    render_person,
)

logger = logging.getLogger(__name__)

METADATA_FILE = "synthetic_market.json"
_SEQUENCES = 6  # Market-1501's cameras recorded sequences s1..s6
_FRAME_STEP = 5  # frames between two boxes of one tracklet


@dataclass(frozen=True, kw_only=True)
class SyntheticMarketSettings:
    """How many people, cameras and boxes; `seed` picks the world (cameras and people)."""

    train_identities: int = 200
    test_identities: int = 200
    cameras: int = 6
    min_cameras: int = 2  # per identity, so every query has a match in another camera
    min_shots: int = 2  # boxes per identity per camera
    max_shots: int = 5
    distractors: int = 100  # gallery boxes of no one (pid 0000), kept as negatives by the protocol
    junk: int = 50  # gallery fragments of test people (pid -1), ignored by the protocol
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_identities < 0 or self.test_identities < 0 or self.train_identities + self.test_identities == 0:
            raise ValueError("train_identities and test_identities must be >= 0, and not both 0")
        if self.train_identities + self.test_identities > 9999:
            raise ValueError("Market-1501 names hold 4-digit person ids: at most 9999 identities in all")
        if not 2 <= self.cameras <= 9:
            raise ValueError(f"cameras must be 2..9 (one digit in the file name), got {self.cameras}")
        if not 2 <= self.min_cameras <= self.cameras:
            raise ValueError(f"min_cameras must be 2..cameras ({self.cameras}), got {self.min_cameras}")
        if not 1 <= self.min_shots <= self.max_shots:
            raise ValueError(f"need 1 <= min_shots <= max_shots, got {self.min_shots}, {self.max_shots}")
        if self.test_identities > 0 and self.min_shots < 2:
            raise ValueError("test identities need min_shots >= 2: one box per camera is the query, the rest the gallery")
        if self.distractors < 0 or self.junk < 0:
            raise ValueError("distractors and junk must be >= 0")
        if self.junk > 0 and self.test_identities == 0:
            raise ValueError("junk boxes are fragments of test identities: junk needs test_identities > 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, got {self.jpeg_quality}")

    @property
    def train_pids(self) -> range:
        return range(1, self.train_identities + 1)

    @property
    def test_pids(self) -> range:
        return range(self.train_identities + 1, self.train_identities + self.test_identities + 1)


@dataclass(frozen=True, kw_only=True)
class PlannedImage:
    """One file to write: which split, its Market name, and what to draw (a person, junk or a distractor)."""

    split: str
    name: MarketName
    identity: int  # the person drawn; for junk, the test person it is a fragment of; 0 for distractors
    shot: int


def _tracklets(pid: int, settings: SyntheticMarketSettings) -> list[tuple[int, int, int, int]]:
    """(camera, sequence, first frame, boxes) of every camera that sees `pid`."""
    rng = np.random.default_rng([settings.seed, pid, 6])
    count = int(rng.integers(settings.min_cameras, settings.cameras + 1))
    cameras = sorted(int(c) + 1 for c in rng.choice(settings.cameras, size=count, replace=False))
    return [
        (camera, int(rng.integers(1, _SEQUENCES + 1)), int(rng.integers(0, 900_000)), int(rng.integers(settings.min_shots, settings.max_shots + 1)))
        for camera in cameras
    ]


def plan_dataset(settings: SyntheticMarketSettings, splits: Sequence[str] = SPLITS) -> list[PlannedImage]:
    """Every file of `splits`, in a fixed order; the plan of one identity does not depend on the others."""
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}: choose from {', '.join(SPLITS)}")
    planned: list[PlannedImage] = []
    if TRAIN_DIR in splits:
        for pid in settings.train_pids:
            for camera, sequence, first, boxes in _tracklets(pid, settings):
                planned += [
                    PlannedImage(split=TRAIN_DIR, name=MarketName(pid=pid, camid=camera, sequence=sequence, frame=first + shot * _FRAME_STEP, box=1), identity=pid, shot=shot)
                    for shot in range(boxes)
                ]
    if QUERY_DIR in splits or GALLERY_DIR in splits:
        for pid in settings.test_pids:
            for camera, sequence, first, boxes in _tracklets(pid, settings):
                query_shot = int(np.random.default_rng([settings.seed, pid, camera, 7]).integers(boxes))
                for shot in range(boxes):
                    split = QUERY_DIR if shot == query_shot else GALLERY_DIR
                    if split in splits:
                        name = MarketName(pid=pid, camid=camera, sequence=sequence, frame=first + shot * _FRAME_STEP, box=1)
                        planned.append(PlannedImage(split=split, name=name, identity=pid, shot=shot))
    if GALLERY_DIR in splits:
        planned += _plan_unmatched(settings)
    return planned


def _plan_unmatched(settings: SyntheticMarketSettings) -> list[PlannedImage]:
    """Distractors and junk; frames are drawn without replacement so no two names collide."""
    rng = np.random.default_rng([settings.seed, 0, 8])
    total = settings.distractors + settings.junk
    frames = rng.choice(1_000_000, size=total, replace=False)
    planned = []
    for index in range(total):
        junk = index >= settings.distractors
        name = MarketName(
            pid=JUNK_PID if junk else DISTRACTOR_PID,
            camid=int(rng.integers(1, settings.cameras + 1)),
            sequence=int(rng.integers(1, _SEQUENCES + 1)),
            frame=int(frames[index]),
            box=int(rng.integers(2, 10)),  # boxes 02.. : not a tracklet's main box 01
        )
        identity = int(rng.choice(settings.test_pids)) if junk else 0
        planned.append(PlannedImage(split=GALLERY_DIR, name=name, identity=identity, shot=100 + index))
    return planned


def render_planned(item: PlannedImage, seed: int) -> Image.Image:
    """The crop of `item`: the person, a fragment of one (junk), or the camera's empty scene (distractor)."""
    name = item.name
    if name.pid == DISTRACTOR_PID:
        rng = np.random.default_rng([seed, 0, name.camid, item.shot, 9])
        camera = make_camera(name.camid, seed)
        return apply_camera(draw_background(camera, rng), camera, rng)
    image = render_person(item.identity, name.camid, item.shot, seed)
    if name.pid != JUNK_PID:
        return image
    # A bad detection: the head and shoulders, the legs, or one side of the person, stretched to a box.
    rng = np.random.default_rng([seed, item.identity, name.camid, item.shot, 10])
    fragment = [(0, 0, CROP_WIDTH, CROP_HEIGHT * 0.4), (0, CROP_HEIGHT * 0.55, CROP_WIDTH, CROP_HEIGHT), (0, 0, CROP_WIDTH * 0.5, CROP_HEIGHT)][rng.integers(3)]
    return image.crop(tuple(int(v) for v in fragment)).resize((CROP_WIDTH, CROP_HEIGHT), Image.BILINEAR)


def _write(job: tuple[Path, PlannedImage, int, int]) -> None:
    path, item, seed, quality = job
    path.write_bytes(encode_jpeg(render_planned(item, seed), quality=quality))


def generate_synthetic_market(
    root: str | Path,
    settings: SyntheticMarketSettings,
    splits: Sequence[str] = SPLITS,
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write `splits` under `root` (Market-1501 layout) and `synthetic_market.json`; returns images per split.

    A split folder that already holds .jpg files is an error unless `overwrite`, which deletes them
    first: files of another size or seed must not mix into the split.
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    root = Path(root)
    planned = plan_dataset(settings, splits)
    for split in splits:
        folder = root / split
        existing = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        if existing and not overwrite:
            raise OsnetTritonError(f"{folder} already holds {len(existing)} images: pass overwrite (--force) to replace them")
        for path in existing:
            path.unlink()
        folder.mkdir(parents=True, exist_ok=True)
    jobs = [(root / item.split / item.name.filename, item, settings.seed, settings.jpeg_quality) for item in planned]
    if workers == 1:
        for job in jobs:
            _write(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write, jobs, chunksize=64))
    counts = {split: sum(item.split == split for item in planned) for split in splits}
    metadata = {
        "generator": "engine_builder.synthetic_market",
        "settings": asdict(settings),
        "splits": counts,
        "train_pids": [settings.train_pids.start, settings.train_pids.stop - 1] if settings.train_identities else None,
        "test_pids": [settings.test_pids.start, settings.test_pids.stop - 1] if settings.test_identities else None,
    }
    (root / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info("wrote %s under %s", ", ".join(f"{count} {split}" for split, count in counts.items()), root)
    return counts


def build_parser() -> argparse.ArgumentParser:
    defaults = SyntheticMarketSettings()
    parser = argparse.ArgumentParser(prog="python -m engine_builder.synthetic_market", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="dataset root to write")
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=value, help=f"(default: {value})")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to write (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace the images of split folders that already hold some")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = SyntheticMarketSettings(**{field: getattr(args, field) for field in asdict(SyntheticMarketSettings())})
        counts = generate_synthetic_market(args.output, settings, args.splits, workers=args.workers, overwrite=args.force)
    except (OsnetTritonError, ValueError) as exc:
        print(f"synthetic_market: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: " + ", ".join(f"{split} {count}" for split, count in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
