"""OSNet family: torchreid-compatible names, published sizes, strict and safe checkpoint loading."""
from __future__ import annotations

import pickle

import pytest
import torch

from osnet_base.errors import CheckpointMismatchError, UnknownVariantError
from engine_builder.models import VARIANTS, count_parameters, create_osnet


@pytest.mark.parametrize(("variant", "millions"), [("osnet_x1_0", 2.17), ("osnet_x0_25", 0.20)])
def test_parameter_counts_match_published(variant, millions):
    assert round(count_parameters(create_osnet(variant)) / 1e6, 2) == millions


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_gives_a_512_d_eval_feature(variant):
    model = create_osnet(variant)
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 256, 128)).shape == (2, 512)


def test_torchreid_parameter_names():
    names = set(create_osnet("osnet_x1_0").state_dict())
    assert {"conv2.0.conv2a.conv1.weight", "conv2.0.conv2d.3.bn.running_var", "conv2.2.0.conv.weight", "fc.1.weight"} <= names
    ain = set(create_osnet("osnet_ain_x1_0").state_dict())
    assert {"conv2.0.conv2.3.layers.3.conv2.weight", "pool2.0.conv.weight", "conv2.0.IN.weight", "conv1.bn.weight"} <= ain
    assert "conv2.0.conv3.bn.weight" not in ain  # OSBlockINin: instance norm replaces conv3's BN


def test_seeded_initialisation_is_reproducible_and_warns(caplog):
    first = create_osnet("osnet_x0_25", seed=3).state_dict()
    second = create_osnet("osnet_x0_25", seed=3).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert "NOT meaningful" in caplog.text


def test_unknown_variant_is_named():
    with pytest.raises(UnknownVariantError, match="osnet_x2_0"):
        create_osnet("osnet_x2_0")


def torchreid_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What torchreid saves: DataParallel prefixes and the ID classifier included."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state["module.classifier.weight"] = torch.randn(751, 512)
    state["module.classifier.bias"] = torch.randn(751)
    return state


@pytest.mark.parametrize("layout", ["plain_pth", "pth_tar"])
def test_torchreid_checkpoint_loads_unchanged(tmp_path, layout):
    source = create_osnet("osnet_x0_25", seed=7)
    state = torchreid_checkpoint(source)
    path = tmp_path / "model.pth"
    torch.save(state if layout == "plain_pth" else {"state_dict": state, "epoch": 60, "rank1": 0.9}, path)
    loaded = create_osnet("osnet_x0_25", weights=path, seed=0)
    image = torch.randn(1, 3, 256, 128)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(image), source(image))


def test_mismatched_checkpoint_names_missing_unexpected_and_misshaped_keys(tmp_path):
    state = {k.removeprefix("module."): v for k, v in torchreid_checkpoint(create_osnet("osnet_x0_25")).items()}
    del state["conv5.conv.weight"]
    state["conv9.weight"] = torch.zeros(1)
    state["fc.0.weight"] = torch.zeros(512, 7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as error:
        create_osnet("osnet_x0_25", weights=path)
    message = str(error.value)
    assert "missing keys: conv5.conv.weight" in message
    assert "unexpected keys: conv9.weight" in message
    assert "fc.0.weight: checkpoint (512, 7) != model (512, 128)" in message


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    path = tmp_path / "x0_25.pth"
    torch.save(create_osnet("osnet_x0_25").state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        create_osnet("osnet_x0_5", weights=path)


class ArbitraryCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_refused_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"state_dict": ArbitraryCode()}, handle)
    with pytest.raises(CheckpointMismatchError, match="cannot be read safely"):
        create_osnet("osnet_x0_25", weights=path)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="does not exist"):
        create_osnet("osnet_x0_25", weights=tmp_path / "absent.pth")


def test_empty_or_text_checkpoint_says_why_it_cannot_be_read(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointMismatchError, match=r"is empty \(0 bytes\)"):
        create_osnet("osnet_x0_25", weights=empty)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointMismatchError, match=r"cannot be read safely \(\w+Error: .+\)"):
        create_osnet("osnet_x0_25", weights=text)


def test_nan_weights_are_named_as_such(tmp_path):
    state = create_osnet("osnet_x0_25").state_dict()
    state["conv1.conv.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"NaN or Inf weights[\s\S]*conv1\.conv\.weight"):
        create_osnet("osnet_x0_25", weights=path)
