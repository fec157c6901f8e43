"""osnet-client as a user runs it, against a real server."""
from __future__ import annotations

import json

import numpy as np
import pytest

from client.cli import main
from osnet_base.triton_server import find_free_port
from engine_builder.synthetic_people import encode_jpeg, render_person

pytestmark = pytest.mark.server


@pytest.fixture
def crops(tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    for identity in range(3):
        for camera in range(2):
            (folder / f"{identity:04d}_c{camera}.jpg").write_bytes(encode_jpeg(render_person(identity, camera)))
    return folder


def test_health(triton_server, capsys):
    assert main(["health", "--url", triton_server.grpc_url]) == 0
    assert json.loads(capsys.readouterr().out)["models"]["osnet"] == "READY"


def test_embed_folder_then_compare(triton_server, crops, tmp_path, capsys):
    output = tmp_path / "out" / "embeddings.npy"
    assert main(["embed", str(crops), "-o", str(output), "--url", triton_server.grpc_url, "--batch-size", "4", "--concurrency", "2"]) == 0
    embeddings = np.load(output)
    files = output.with_suffix(".txt").read_text().split()
    assert embeddings.shape == (6, 512) and len(files) == 6 and files == sorted(files)
    capsys.readouterr()
    assert main(["compare", files[0], files[0], "--url", triton_server.grpc_url]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(1.0, abs=1e-5)


def test_errors_are_one_clear_line(triton_server, crops, tmp_path, capsys):
    assert main(["compare", str(crops / "0000_c0.jpg"), str(tmp_path / "nope.jpg"), "--url", triton_server.grpc_url]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["health", "--url", f"127.0.0.1:{find_free_port()}", "--timeout-s", "3"]) == 1
    assert "no Triton server reachable" in capsys.readouterr().err
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert main(["embed", str(tmp_path / "broken.jpg"), "-o", str(tmp_path / "x.npy"), "--url", triton_server.grpc_url]) == 1
    assert "not in any image format" in capsys.readouterr().err
