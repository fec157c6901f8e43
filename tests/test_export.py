"""ONNX export: one file, dynamic batch, ONNX Runtime equal to PyTorch."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from osnet_base.errors import ExportMismatchError
from engine_builder.export import EmbeddingModel, export_onnx, verify_onnx_against_torch
from engine_builder.models import create_osnet
from engine_builder.preprocessing import normalize_pixels


@pytest.mark.parametrize("variant", ["osnet_x1_0", "osnet_ibn_x1_0", "osnet_ain_x0_25"])
def test_onnx_runtime_equals_pytorch_at_batch_1_7_32(tmp_path, variant):
    model = create_osnet(variant)
    path = export_onnx(model, tmp_path / "model.onnx")
    graph = onnx.load(path)
    assert graph.opset_import[0].version >= 17
    assert [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "", ""]
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert list(tmp_path.iterdir()) == [path]  # weights inside the one file

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 7, 32):
        pixels = rng.integers(0, 256, (batch, 256, 128, 3), dtype=np.uint8)
        with torch.inference_mode():
            # torchreid's own arithmetic on the same pixels: ToTensor (/255), Normalize, then the model.
            features = model(normalize_pixels(pixels)).numpy()
        got_features, got_embedding = session.run(["FEATURES", "EMBEDDING"], {"INPUT": pixels})
        assert np.max(np.abs(got_features - features)) <= 1e-4
        np.testing.assert_allclose(np.linalg.norm(got_embedding, axis=1), 1.0, atol=1e-5)


def test_verification_catches_a_graph_that_drifted(tmp_path):
    model = create_osnet("osnet_x0_25")
    path = export_onnx(model, tmp_path / "model.onnx")
    with torch.no_grad():
        model.fc[0].bias += 0.01  # PyTorch now disagrees with the exported graph
    with pytest.raises(ExportMismatchError, match="differs from PyTorch"):
        verify_onnx_against_torch(EmbeddingModel(model), path, batch_sizes=(1,))
