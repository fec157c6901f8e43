"""The reference checkpoint: osnet_x0_25 trained on the generated Market-1501-layout dataset.

No pretrained OSNet or ReID dataset can be downloaded where this project is built, so
`weights/osnet_x0_25_synthetic_market.pth` (torchreid format, ~1 MB) is trained here on
`engine_builder.synthetic_market` data by `engine_builder.train`, and committed with its metrics
(`.json` beside it). The demo, the tests and the precision reports use it by default, so their
embeddings mean something: crops of one person seen by different cameras are the most similar.

It was trained on identities 1..REFERENCE_DATASET.train_identities of seed REFERENCE_DATASET.seed;
`held_out_dataset` describes test splits of the same world made only of people it never saw.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from osnet_base.errors import OsnetTritonError
from engine_builder.synthetic_market import SyntheticMarketSettings

REFERENCE_VARIANT = "osnet_x0_25"
REFERENCE_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "osnet_x0_25_synthetic_market.pth"
REFERENCE_METRICS = REFERENCE_WEIGHTS.with_suffix(".json")
REFERENCE_DATASET = SyntheticMarketSettings()  # the generator's defaults, seed 0


def reference_weights() -> Path:
    """The committed checkpoint's path; a clear error where the checkout lacks it."""
    if not REFERENCE_WEIGHTS.is_file():
        raise OsnetTritonError(
            f"the reference checkpoint {REFERENCE_WEIGHTS} is missing: it is committed under weights/ in the "
            "repository; rebuild it with `python -m engine_builder.train` (see its --help)"
        )
    return REFERENCE_WEIGHTS


def held_out_dataset(test_identities: int, distractors: int = 0, junk: int = 0) -> SyntheticMarketSettings:
    """Settings for query/gallery splits of the reference world holding only people the checkpoint never saw.

    Generate them with `splits=(QUERY_DIR, GALLERY_DIR)`: test identities are numbered after the
    training ones, and each person's images depend only on the seed and their number.
    """
    return dataclasses.replace(REFERENCE_DATASET, test_identities=test_identities, distractors=distractors, junk=junk)


def default_weights(variant: str) -> Path | None:
    """What a build uses without --weights: the reference checkpoint for its variant, else nothing
    (a seeded initialisation, which `create_osnet` warns about)."""
    return reference_weights() if variant == REFERENCE_VARIANT else None
