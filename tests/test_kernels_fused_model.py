"""The fused-kernel OSNet rewrite on CPU (`fuse_osnet(..., backend="reference")`, the kernels replaced
by their NumPy references) against the unfused model, and what the rewrite refuses."""

from __future__ import annotations

import pytest
import torch

from engine_builder.fused_osnet import FusedOSBlock, FusionError, fuse_osnet
from engine_builder.models import create_osnet
from kernels import reference

@pytest.mark.parametrize("name", ["osnet_x0_25", "osnet_ibn_x1_0", "osnet_ain_x0_25"])
def test_fused_osnet_on_references_matches_unfused(name: str, batchnorm_randomiser) -> None:
    model = create_osnet(name)
    batchnorm_randomiser(model, torch.Generator().manual_seed(0))
    model.eval()
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))

    fused = fuse_osnet(model, backend="reference")

    blocks = [m for m in fused.modules() if isinstance(m, FusedOSBlock)]
    assert len(blocks) == 6
    with torch.no_grad():
        expected = model(images)
        actual = fused(images)
    cosine = torch.nn.functional.cosine_similarity(actual.double(), expected.double(), dim=1)
    assert cosine.min().item() >= 0.99999
    assert reference.max_relative_error(actual.numpy(), expected.numpy()) <= 1e-4
    assert not any(p.requires_grad for p in fused.parameters())
    assert any(p.requires_grad for p in model.parameters()), "the input model is left untouched"


def test_fuse_osnet_needs_eval_mode() -> None:
    with pytest.raises(FusionError, match="eval"):
        fuse_osnet(create_osnet("osnet_x0_25").train(), backend="reference")


def test_fuse_osnet_cuda_backend_needs_a_cuda_model() -> None:
    with pytest.raises(FusionError, match="CUDA"):
        fuse_osnet(create_osnet("osnet_x0_25"), backend="cuda")


def test_fused_model_refuses_weights_converted_after_fusion() -> None:
    fused = fuse_osnet(create_osnet("osnet_x0_25"), backend="reference").half()
    block = next(m for m in fused.modules() if isinstance(m, FusedOSBlock))
    with pytest.raises(FusionError, match="before fuse_osnet"):
        block(torch.randn(1, block.conv1.conv.in_channels, 16, 8).half())
