"""`make demo` end to end: build, serve, embed, re-identify, burst, load test; nothing left running."""
from __future__ import annotations

import re

import numpy as np
import pytest

from demo import run_demo
from engine_builder.reference_weights import REFERENCE_VARIANT, reference_weights
from test_triton_server import processes_mentioning  # pytest puts tests/ on sys.path

pytestmark = pytest.mark.server


def test_demo_reidentifies_unseen_people_and_load_tests_the_server(tmp_path, capsys):
    run_demo(REFERENCE_VARIANT, tmp_path / "triton_repo", tmp_path / "demo_output", burst_images=16,
             weights=reference_weights(), load_test_s=3)
    printed = capsys.readouterr().out
    assert re.search(r"`osnet` runs osnet_x0_25_(fp32|bf16|int8): --runtime auto chose \S+: [\d.]+ img/s", printed), printed
    assert "8/8 crops re-identified across cameras" in printed, printed
    assert re.search(r"2 camera frames \(480x288 JPEG, 4, 4 boxes\) -> osnet_frames, one request per frame: 8 embeddings", printed), printed
    assert "8/8 boxes matched to the same person across cameras" in printed, printed
    assert (tmp_path / "demo_output" / "boxes.csv").read_text().count("\n") == 9
    assert re.search(r"result\s+PASSED", printed), printed
    embeddings = np.load(tmp_path / "demo_output" / "embeddings.npy")
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert embeddings.shape == (8, 512)
    assert "server stopped" in printed
    # Other tests' servers may be running in this session; the demo's own must be gone.
    assert not processes_mentioning(f"--model-repository={(tmp_path / 'triton_repo').resolve()}")
