"""Train an OSNet on a Market-1501-layout dataset, torchreid-style, on CPU, and write a torchreid checkpoint.

What torchreid's image engine does for OSNet, without torchvision: 256x128 input, random flip,
zero-pad-and-crop translation and random erasing, a linear ID classifier on the 512-d feature,
cross-entropy with label smoothing (eps 0.1) plus, optionally, batch-hard triplet loss on a PK
sampler (P identities x K images), AMSGrad with a linear warmup and a cosine decay.
The model has no classifier of its own (`create_osnet` drops torchreid's), so training adds one and
the checkpoint stores it as `classifier.weight`/`classifier.bias`, as torchreid would. The held-out
split (`query/`, `bounding_box_test/`) is evaluated with the Market-1501 protocol at the end.

  python -m engine_builder.synthetic_market --output data/synthetic_market
  python -m engine_builder.train --data data/synthetic_market --output weights/osnet_x0_25_synthetic_market.pth
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reid.evaluation import RetrievalMetrics, chance_level, evaluate_retrieval
from reid.market1501 import GALLERY_DIR, JUNK_PID, QUERY_DIR, TRAIN_DIR, MarketSplit, read_market_split
from osnet_base.arguments import add_dataclass_arguments, dataclass_from_arguments
from osnet_base.errors import OsnetTritonError
from engine_builder.models import VARIANTS, create_osnet
from osnet_base.contract import INPUT_HEIGHT, INPUT_WIDTH
from engine_builder.preprocessing import normalize_images, resize_image
from engine_builder.synthetic_market import METADATA_FILE

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """One training run; `seed` fixes initialisation, sampling and augmentation."""

    variant: str = "osnet_x0_25"
    epochs: int = 30
    batch_size: int = 64
    instances_per_identity: int = 4  # K of the PK sampler; P = batch_size / K
    learning_rate: float = 0.003
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    triplet_weight: float = 0.0  # > 0 adds batch-hard triplet on PK batches; 0: softmax only, shuffled batches
    triplet_margin: float = 0.3
    pad: int = 10  # torchreid's `random_crop`: zero-pad then crop back at a random offset
    random_erase: float = 0.5  # probability per image
    bf16: bool = True  # bfloat16 autocast, FP32 master weights: ~1.7x faster on AVX-512 BF16 CPUs
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of: {', '.join(VARIANTS)}")
        if self.epochs < 1 or self.threads < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError("need epochs >= 1, threads >= 1 and 0 <= warmup_epochs < epochs")
        if self.batch_size < 2 or self.instances_per_identity < 2 or self.batch_size % self.instances_per_identity:
            raise ValueError("batch_size must be a multiple of instances_per_identity, both >= 2")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0 and weight_decay >= 0")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.random_erase <= 1:
            raise ValueError("label_smoothing must be in [0, 1) and random_erase in [0, 1]")
        if self.triplet_weight < 0 or self.triplet_margin <= 0 or self.pad < 0:
            raise ValueError("triplet_weight and pad must be >= 0, triplet_margin > 0")


@dataclass(frozen=True, kw_only=True)
class ImageCache:
    """A split decoded once: uint8 [N, 3, 256, 128] at the model's input size, with its labels."""

    images: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray


def load_split(split: MarketSplit) -> ImageCache:
    """Decode and resize every image of `split` like the served preprocessing, keeping uint8 to save memory."""
    images = torch.empty((len(split), 3, INPUT_HEIGHT, INPUT_WIDTH), dtype=torch.uint8)
    for index, path in enumerate(split.paths):
        with Image.open(path) as image:
            images[index] = resize_image(image)
    return ImageCache(images=images, pids=np.asarray(split.pids), camids=np.asarray(split.camids))


def pk_batches(labels: np.ndarray, identities: int, instances: int, rng: np.random.Generator) -> list[np.ndarray]:
    """torchreid's RandomIdentitySampler: batches of `identities` labels x `instances` images each.

    Each label's images are shuffled and cut into groups of `instances` (a label with fewer images is
    sampled with replacement, the remainder dropped); batches draw distinct labels until fewer than
    `identities` labels have groups left.
    """
    groups: dict[int, list[np.ndarray]] = {}
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        if len(indices) < instances:
            indices = rng.choice(indices, size=instances, replace=True)
        groups[int(label)] = [indices[i : i + instances] for i in range(0, len(indices) - instances + 1, instances)]
    batches = []
    while True:
        available = [label for label, left in groups.items() if left]
        if len(available) < identities:
            return batches
        chosen = rng.choice(available, size=identities, replace=False)
        batches.append(np.concatenate([groups[int(label)].pop() for label in chosen]))


def shuffled_batches(count: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(count)
    return [order[i : i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]


def augment(images: torch.Tensor, settings: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """uint8 batch -> normalised FP32 batch with random flip, pad-and-crop and random erasing."""
    count, _, height, width = images.shape
    flip = torch.rand(count, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if settings.pad:
        padded = F.pad(images, (settings.pad,) * 4)
        offsets = torch.randint(0, 2 * settings.pad + 1, (count, 2), generator=generator).tolist()
        images = torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])
    batch = normalize_images(images)
    for index in range(count):
        if torch.rand(1, generator=generator).item() >= settings.random_erase:
            continue
        # torchreid's RandomErasing: 2-40% of the area, aspect 0.3-3.3; filled with 0, the mean colour
        # after normalisation, so the erased patch carries no colour cue.
        area = height * width * (0.02 + 0.38 * torch.rand(1, generator=generator).item())
        aspect = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * torch.rand(1, generator=generator).item())
        erase_h, erase_w = min(height, round(math.sqrt(area * aspect))), min(width, round(math.sqrt(area / aspect)))
        top = int(torch.randint(0, height - erase_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - erase_w + 1, (1,), generator=generator))
        batch[index, :, top : top + erase_h, left : left + erase_w] = 0.0
    return batch


def batch_hard_triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """torchreid's TripletLoss: for each anchor, its farthest positive against its nearest negative."""
    squared = features.pow(2).sum(1, keepdim=True)
    distances = (squared + squared.T - 2 * features @ features.T).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    hardest_positive = distances.masked_fill(~same, float("-inf")).max(1).values
    hardest_negative = distances.masked_fill(same, float("inf")).min(1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.inference_mode()
def embed_cache(model: nn.Module, cache: ImageCache, batch_size: int = 128) -> np.ndarray:
    """L2-normalised eval embeddings of a cached split, as the served model computes them."""
    model.eval()
    outputs = [model(normalize_images(cache.images[i : i + batch_size])) for i in range(0, len(cache.images), batch_size)]
    return F.normalize(torch.cat(outputs), dim=1).numpy()


def evaluate_model(model: nn.Module, query: ImageCache, gallery: ImageCache) -> RetrievalMetrics:
    similarity = embed_cache(model, query) @ embed_cache(model, gallery).T
    return evaluate_retrieval(similarity, query.pids, query.camids, gallery.pids, gallery.camids)


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    checkpoint: Path
    metrics_file: Path
    report: dict


def train(data: str | Path, output: str | Path, settings: TrainSettings, command: str | None = None) -> TrainResult:
    """Train on `data/bounding_box_train`, evaluate on `data/query` + `data/bounding_box_test`, save.

    Writes `output` (torchreid checkpoint: `state_dict` with the classifier, `epoch`, `rank1`, `mAP`)
    and `output` with suffix .json (settings, dataset, timings, held-out metrics and chance level).
    """
    data, output = Path(data), Path(output)
    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)

    train_split = read_market_split(data, TRAIN_DIR)
    keep = [i for i, pid in enumerate(train_split.pids) if pid > 0]  # no junk or distractors as training identities
    train_cache = load_split(
        MarketSplit(
            paths=tuple(train_split.paths[i] for i in keep),
            pids=tuple(train_split.pids[i] for i in keep),
            camids=tuple(train_split.camids[i] for i in keep),
        )
    )
    identities = np.unique(train_cache.pids)
    labels = np.searchsorted(identities, train_cache.pids)  # torchreid relabels pids to 0..C-1
    query_cache = load_split(read_market_split(data, QUERY_DIR))
    gallery_split = read_market_split(data, GALLERY_DIR)
    gallery_cache = load_split(gallery_split)
    logger.info(
        "%s: %d training images of %d identities; held out: %d queries, %d gallery images (%.0f s to load)",
        data, len(labels), len(identities), len(query_cache.pids), len(gallery_cache.pids), time.perf_counter() - started,
    )

    model = create_osnet(settings.variant, seed=settings.seed).train()
    random_init = evaluate_model(model, query_cache, gallery_cache)
    model.train()
    classifier = nn.Linear(model.feature_dim, len(identities))
    nn.init.normal_(classifier.weight, 0, 0.01)  # torchreid's initialisation of its classifier
    nn.init.zeros_(classifier.bias)
    model.to(memory_format=torch.channels_last)  # faster oneDNN convolutions on CPU
    parameters = [*model.parameters(), *classifier.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, amsgrad=True)

    identities_per_batch = settings.batch_size // settings.instances_per_identity
    # PK epochs vary by a batch or two with the draw; the schedule's length is one draw's.
    steps_per_epoch = len(
        pk_batches(labels, identities_per_batch, settings.instances_per_identity, np.random.default_rng(settings.seed))
        if settings.triplet_weight > 0
        else shuffled_batches(len(labels), settings.batch_size, np.random.default_rng(settings.seed))
    )
    if steps_per_epoch == 0:
        raise OsnetTritonError(f"{data}/{TRAIN_DIR} is too small for one batch of {settings.batch_size}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(settings.epochs * steps_per_epoch, settings.warmup_epochs * steps_per_epoch)
    )
    training_started = time.perf_counter()
    history = []
    for epoch in range(1, settings.epochs + 1):
        epoch_started = time.perf_counter()
        batches = (
            pk_batches(labels, identities_per_batch, settings.instances_per_identity, rng)
            if settings.triplet_weight > 0
            else shuffled_batches(len(labels), settings.batch_size, rng)
        )
        totals = {"loss": 0.0, "softmax": 0.0, "triplet": 0.0, "accuracy": 0.0}
        for batch in batches:
            images = augment(train_cache.images[batch], settings, generator).contiguous(memory_format=torch.channels_last)
            targets = torch.from_numpy(labels[batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                features = model(images)
                logits = classifier(features)
            features, logits = features.float(), logits.float()
            softmax = F.cross_entropy(logits, targets, label_smoothing=settings.label_smoothing)
            triplet = batch_hard_triplet_loss(features, targets, settings.triplet_margin) if settings.triplet_weight > 0 else torch.zeros(())
            loss = softmax + settings.triplet_weight * triplet
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            totals["loss"] += loss.item()
            totals["softmax"] += softmax.item()
            totals["triplet"] += triplet.item()
            totals["accuracy"] += (logits.argmax(1) == targets).float().mean().item()
        seconds = time.perf_counter() - epoch_started
        record = {"epoch": epoch, **{k: v / len(batches) for k, v in totals.items()}, "seconds": seconds,
                  "images_per_s": len(batches) * settings.batch_size / seconds}
        history.append(record)
        logger.info(
            "epoch %d/%d: loss %.3f (softmax %.3f, triplet %.3f), train accuracy %.1f%%, %.0f img/s, %.0f s elapsed",
            epoch, settings.epochs, record["loss"], record["softmax"], record["triplet"], 100 * record["accuracy"],
            record["images_per_s"], time.perf_counter() - training_started,
        )
    training_seconds = time.perf_counter() - training_started

    model.to(memory_format=torch.contiguous_format)
    trained = evaluate_model(model, query_cache, gallery_cache)
    chance = chance_level(query_cache.pids, query_cache.camids, gallery_cache.pids, gallery_cache.camids)
    state_dict = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    state_dict["classifier.weight"] = classifier.weight.detach().clone()
    state_dict["classifier.bias"] = classifier.bias.detach().clone()
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": state_dict, "epoch": settings.epochs, "rank1": trained.cmc[1], "mAP": trained.mean_average_precision,
         "num_classes": len(identities)},
        output,
    )
    _check_reloads(model, output, settings.variant, query_cache)

    report = {
        "checkpoint": output.name,
        "checkpoint_bytes": output.stat().st_size,
        "checkpoint_sha256": hashlib.sha256(output.read_bytes()).hexdigest(),
        "variant": settings.variant,
        "command": command,
        "settings": asdict(settings),
        "dataset": _dataset_description(data, labels, identities, query_cache, gallery_cache),
        "protocol": "Market-1501: same identity and camera as the query excluded, junk (-1) ignored, distractors (0) kept as negatives",
        "held_out": {"trained": trained.as_dict(), "random_init": random_init.as_dict(), "chance": chance.as_dict()},
        "training_seconds": round(training_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "history": history,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                        "threads": settings.threads},
    }
    metrics_file = output.with_suffix(".json")
    metrics_file.write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "held-out rank-1 %.1f%%, mAP %.1f%% (random init %.1f%% / %.1f%%, chance %.1f%% / %.1f%%); %s, %s",
        100 * trained.cmc[1], 100 * trained.mean_average_precision, 100 * random_init.cmc[1],
        100 * random_init.mean_average_precision, 100 * chance.cmc[1], 100 * chance.mean_average_precision, output, metrics_file,
    )
    return TrainResult(checkpoint=output, metrics_file=metrics_file, report=report)


def _check_reloads(model: nn.Module, checkpoint: Path, variant: str, cache: ImageCache) -> None:
    """The checkpoint must load through the serving path (`create_osnet`) and give the same embeddings."""
    sample = ImageCache(images=cache.images[:8], pids=cache.pids[:8], camids=cache.camids[:8])
    reloaded = create_osnet(variant, weights=checkpoint)
    difference = np.abs(embed_cache(model, sample) - embed_cache(reloaded, sample)).max()
    if difference > 1e-5:
        raise OsnetTritonError(f"{checkpoint} reloads with embeddings {difference:.2e} away from the trained model's")


def _dataset_description(data: Path, labels: np.ndarray, identities: np.ndarray, query: ImageCache, gallery: ImageCache) -> dict:
    generated = data / METADATA_FILE
    return {
        "root": str(data),
        "generator": json.loads(generated.read_text()) if generated.is_file() else None,
        "train_images": len(labels),
        "train_identities": len(identities),
        "query_images": len(query.pids),
        "gallery_images": len(gallery.pids),
        "gallery_junk": int(np.sum(gallery.pids == JUNK_PID)),
        "gallery_distractors": int(np.sum(gallery.pids == 0)),
        "test_identities": len(np.unique(query.pids)),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine_builder.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Market-1501-layout root (bounding_box_train, query, bounding_box_test)")
    parser.add_argument("--output", type=Path, required=True, help="checkpoint to write (.pth); the metrics go beside it (.json)")
    add_dataclass_arguments(parser.add_argument_group("training"), TrainSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = dataclass_from_arguments(TrainSettings, args)
        command = shlex.join(["python", "-m", "engine_builder.train", *argv])
        result = train(args.data, args.output, settings, command=command)
    except (OsnetTritonError, ValueError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    held_out = result.report["held_out"]
    print(
        f"{result.checkpoint} ({result.report['checkpoint_bytes'] / 1e6:.2f} MB) in {result.report['training_seconds']:.0f} s: "
        f"held-out rank-1 {100 * held_out['trained']['rank1']:.1f}%, mAP {100 * held_out['trained']['mAP']:.1f}% "
        f"(chance {100 * held_out['chance']['rank1']:.1f}% / {100 * held_out['chance']['mAP']:.1f}%); metrics in {result.metrics_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
