"""The OSNet variants we build, and torchreid checkpoint loading.

Variants differ by data (the width table), not by code. `create_osnet` is the one entry point:
it returns an eval-mode model with either a user's torchreid checkpoint or a seeded initialisation.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import nn

from osnet_base.errors import CheckpointMismatchError, UnknownVariantError
from engine_builder.osnet import OSNet
from engine_builder.osnet_ain import OSNetAIN

logger = logging.getLogger(__name__)

# Channels of conv1 and of the three OSBlock stages, per width multiplier (torchreid's table).
OSNET_CHANNELS = {
    "x1_0": (64, 256, 384, 512),
    "x0_75": (48, 192, 288, 384),
    "x0_5": (32, 128, 192, 256),
    "x0_25": (16, 64, 96, 128),
}

VARIANTS: dict[str, Callable[[], nn.Module]] = {
    **{f"osnet_{width}": partial(OSNet, channels) for width, channels in OSNET_CHANNELS.items()},
    "osnet_ibn_x1_0": partial(OSNet, OSNET_CHANNELS["x1_0"], instance_norm=True),
    **{f"osnet_ain_{width}": partial(OSNetAIN, channels) for width, channels in OSNET_CHANNELS.items()},
}

def create_osnet(name: str, weights: str | Path | None = None, seed: int = 0) -> nn.Module:
    """Build variant `name` in eval mode, with torchreid `weights` or, without them, seeded random ones."""
    if name not in VARIANTS:
        raise UnknownVariantError(f"unknown OSNet variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VARIANTS[name]()
    if weights is None:
        logger.warning(
            "%s has no --weights: using a seeded random initialisation; its embeddings are NOT meaningful "
            "for re-identification (fine for plumbing, useless for search)",
            name,
        )
    else:
        load_torchreid_checkpoint(model, weights)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def read_checkpoint(path: str | Path) -> Mapping[str, torch.Tensor]:
    """A torchreid checkpoint's state_dict: a plain `.pth` state_dict or a `.pth.tar` dict holding one.

    Loaded with `weights_only=True`: a checkpoint is untrusted input and must not run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointMismatchError(f"checkpoint {path} is empty (0 bytes): an interrupted download or copy?")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for unusable files
        # Some of them carry no message at all (EOFError on a truncated file): name the type.
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise CheckpointMismatchError(
            f"checkpoint {path} cannot be read safely ({reason}); expected a file written by torch.save "
            "holding a state_dict, or a dict with 'state_dict'"
        ) from exc
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointMismatchError(f"checkpoint {path} holds neither a state_dict nor a dict with 'state_dict'")
    return checkpoint


def filter_torchreid_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All checkpoint surgery in one place: strip DataParallel's `module.`, drop the ID classifier."""
    filtered = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("classifier."):
            continue
        filtered[key] = value
    return filtered


def load_torchreid_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a torchreid checkpoint strictly; any missing, unexpected or mis-shaped key is an error naming them."""
    state_dict = filter_torchreid_state_dict(read_checkpoint(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} != model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit {type(model).__name__}"
            f" (is it another variant?):\n{_describe_keys('missing', missing)}"
            f"{_describe_keys('unexpected', unexpected)}{_describe_keys('mis-shaped', misshaped)}"
        )
    non_finite = sorted(key for key, value in state_dict.items() if value.is_floating_point() and not torch.isfinite(value).all())
    if non_finite:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds NaN or Inf weights (diverged training?):\n{_describe_keys('non-finite', non_finite)}"
        )
    model.load_state_dict(state_dict, strict=True)
    logger.info("loaded %d tensors from %s", len(state_dict), path)


def _describe_keys(kind: str, keys: list[str], shown: int = 20) -> str:
    if not keys:
        return ""
    more = f" ... and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"  {len(keys)} {kind} keys: {', '.join(keys[:shown])}{more}\n"
