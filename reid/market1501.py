"""Market-1501's layout and file naming, shared by the dataset generator, training, evaluation and search.

A Market-1501 root holds `bounding_box_train/` (training identities), `query/` and
`bounding_box_test/` (the gallery; held-out identities). A file is named
`PPPP_cCsS_FFFFFF_NN.jpg`: person id (4 digits; `-1` for junk boxes, `0000` for distractors),
camera C, sequence S, frame FFFFFF, box NN (e.g. `0002_c1s1_000451_03.jpg`, `-1_c3s2_012045_02.jpg`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from osnet_base.errors import OsnetTritonError

TRAIN_DIR, QUERY_DIR, GALLERY_DIR = "bounding_box_train", "query", "bounding_box_test"
SPLITS = (TRAIN_DIR, QUERY_DIR, GALLERY_DIR)
JUNK_PID, DISTRACTOR_PID = -1, 0

_NAME = re.compile(r"^(-1|\d{4})_c(\d+)s(\d+)_(\d{6})_(\d{2})\.jpg$")


class MarketLayoutError(OsnetTritonError):
    """A folder or file name that does not follow Market-1501's layout."""


@dataclass(frozen=True, kw_only=True)
class MarketName:
    pid: int
    camid: int
    sequence: int
    frame: int
    box: int

    def __post_init__(self) -> None:
        if self.pid < JUNK_PID or self.pid > 9999:
            raise ValueError(f"pid must be -1 (junk), 0 (distractor) or 1..9999, got {self.pid}")
        if not 1 <= self.camid <= 9 or not 1 <= self.sequence <= 9:
            raise ValueError(f"camera and sequence are one digit >= 1, got c{self.camid}s{self.sequence}")
        if not 0 <= self.frame <= 999_999 or not 0 <= self.box <= 99:
            raise ValueError(f"frame is 6 digits and box 2 digits, got {self.frame}, {self.box}")

    @property
    def filename(self) -> str:
        pid = "-1" if self.pid == JUNK_PID else f"{self.pid:04d}"
        return f"{pid}_c{self.camid}s{self.sequence}_{self.frame:06d}_{self.box:02d}.jpg"


def parse_market_name(name: str) -> MarketName | None:
    """The fields of a Market-1501 file name, or None when `name` is not one."""
    match = _NAME.match(name)
    if match is None:
        return None
    pid, camid, sequence, frame, box = match.groups()
    return MarketName(pid=int(pid), camid=int(camid), sequence=int(sequence), frame=int(frame), box=int(box))


@dataclass(frozen=True, kw_only=True)
class MarketSplit:
    """The images of one split folder, sorted by file name, with their identities and cameras."""

    paths: tuple[Path, ...]
    pids: tuple[int, ...]
    camids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.paths) == len(self.pids) == len(self.camids):
            raise ValueError("paths, pids and camids must have the same length")

    def __len__(self) -> int:
        return len(self.paths)


def read_market_split(root: str | Path, split: str) -> MarketSplit:
    """All `*.jpg` of `root/split`; every one must be named the Market-1501 way."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise MarketLayoutError(f"{folder} is not a folder: expected a Market-1501 root holding {', '.join(SPLITS)}")
    paths, names = [], []
    for path in sorted(folder.glob("*.jpg")):
        name = parse_market_name(path.name)
        if name is None:
            raise MarketLayoutError(f"{path} is not named PPPP_cCsS_FFFFFF_NN.jpg like Market-1501's images")
        paths.append(path)
        names.append(name)
    if not paths:
        raise MarketLayoutError(f"{folder} holds no .jpg images")
    return MarketSplit(paths=tuple(paths), pids=tuple(n.pid for n in names), camids=tuple(n.camid for n in names))
