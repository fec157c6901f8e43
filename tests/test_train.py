"""Training pieces, and a tiny end-to-end run whose checkpoint loads the way users load torchreid's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine_builder.models import create_osnet
from engine_builder.synthetic_market import SyntheticMarketSettings, generate_synthetic_market
from engine_builder.train import TrainSettings, augment, batch_hard_triplet_loss, pk_batches, train


def test_pk_batches_hold_p_identities_of_k_images():
    labels = np.repeat(np.arange(10), [2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    batches = pk_batches(labels, identities=4, instances=4, rng=np.random.default_rng(0))
    assert len(batches) >= 3
    for batch in batches:
        batch_labels, counts = np.unique(labels[batch], return_counts=True)
        assert len(batch_labels) == 4 and set(counts.tolist()) == {4}
    # Identities with at least K images never repeat an image within an epoch.
    used = np.concatenate(batches)
    plentiful = used[np.bincount(labels)[labels[used]] >= 4]
    assert len(plentiful) == len(set(plentiful.tolist()))


def test_augment_keeps_shape_and_normalises():
    images = torch.full((6, 3, 256, 128), 255, dtype=torch.uint8)
    settings = TrainSettings(random_erase=0.0)
    batch = augment(images, settings, torch.Generator().manual_seed(0))
    assert batch.shape == (6, 3, 256, 128) and batch.dtype == torch.float32
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    # Away from the borders the shift (<= 10 px) keeps white pixels white; at the borders the
    # zero padding shows up as black in images shifted that way.
    assert torch.allclose(batch[:, :, 100, 60], ((1 - mean) / std).expand(6, 3))
    black = (-mean / std)[:, None]
    assert any(torch.allclose(image[:, 0, :], black) or torch.allclose(image[:, -1, :], black) for image in batch)


def test_triplet_loss_is_zero_for_separated_identities_and_positive_otherwise():
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]])
    assert batch_hard_triplet_loss(separated, labels, margin=0.3) == 0
    mixed = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.1, 0.0], [5.1, 0.0]])
    assert batch_hard_triplet_loss(mixed, labels, margin=0.3) > 4


@pytest.mark.parametrize("changes", [{"label_smoothing": 1.0}, {"batch_size": 30}, {"variant": "resnet50"}, {"warmup_epochs": 2, "epochs": 2}])
def test_settings_are_validated(changes):
    with pytest.raises(ValueError):
        TrainSettings(**changes)


def test_tiny_run_writes_a_torchreid_checkpoint_and_its_metrics(tmp_path):
    data = tmp_path / "market"
    generate_synthetic_market(data, SyntheticMarketSettings(train_identities=8, test_identities=4, cameras=3, max_shots=3, distractors=2, junk=1))
    settings = TrainSettings(epochs=2, warmup_epochs=1, batch_size=16, triplet_weight=1.0)
    result = train(data, tmp_path / "tiny.pth", settings, command="test")
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["num_classes"] == 8
    assert checkpoint["state_dict"]["classifier.weight"].shape == (8, 512)
    create_osnet("osnet_x0_25", weights=result.checkpoint)  # loads strictly, classifier dropped
    report = json.loads(result.metrics_file.read_text())
    assert report["dataset"]["train_identities"] == 8 and report["dataset"]["gallery_junk"] == 1
    assert set(report["held_out"]) == {"trained", "random_init", "chance"}
    assert len(report["history"]) == 2 and report["history"][0]["triplet"] > 0
