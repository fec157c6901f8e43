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
    assert "is not a JPEG or PNG file" in capsys.readouterr().err


def test_embed_output_is_checked_before_the_work_and_named_as_written(triton_server, crops, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["embed", str(crops), "-o", str(blocker / "out.npy"), "--url", triton_server.grpc_url]) == 1
    error = capsys.readouterr().err
    assert error.startswith("osnet-client: error: cannot write") and "Traceback" not in error
    # NumPy adds .npy to a name without it: the message names the file really written.
    assert main(["embed", str(crops), "-o", str(tmp_path / "imgs"), "--url", triton_server.grpc_url]) == 0
    assert f"-> {tmp_path / 'imgs.npy'} (6, 512)" in capsys.readouterr().out
    assert np.load(tmp_path / "imgs.npy").shape == (6, 512) and (tmp_path / "imgs.txt").is_file()


def test_unreadable_files_fail_the_job_or_are_skipped_and_listed(triton_server, crops, tmp_path, capsys):
    (crops / "0000_c9_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    output = tmp_path / "e.npy"
    assert main(["embed", str(crops), "-o", str(output), "--url", triton_server.grpc_url, "--batch-size", "4"]) == 1
    assert "--skip-unreadable" in capsys.readouterr().err
    assert main(["embed", str(crops), "-o", str(output), "--url", triton_server.grpc_url, "--batch-size", "4", "--skip-unreadable"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "0000_c9_broken.jpg" in captured.err
    files = output.with_suffix(".txt").read_text().split()
    assert np.load(output).shape == (6, 512) and len(files) == 6 and not any("broken" in name for name in files)


def test_health_says_why_a_model_is_not_ready(triton_server, capsys):
    assert main(["health", "--url", triton_server.grpc_url, "--model", "nosuchmodel"]) == 1
    assert "does not serve model 'nosuchmodel'" in capsys.readouterr().err


def test_a_timeout_and_an_http_url_are_not_called_unreachable(triton_server, crops, capsys):
    from client.embedding_client import EmbeddingClient, ServerTimeoutError

    assert main(["health", "--url", f"http://{triton_server.grpc_url}"]) == 1
    assert "is not a gRPC endpoint" in capsys.readouterr().err
    with EmbeddingClient(triton_server.grpc_url, timeout_s=0.0005) as client:  # no ensemble call answers in 0.5 ms
        with pytest.raises(ServerTimeoutError, match="did not answer within 0.0005 s"):
            client.embed_images([(crops / "0000_c0.jpg").read_bytes()] * 8)
