"""The gallery index: exact and FAISS search agree, and a saved index answers the same after reloading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.gallery import FAISS_FILE, GalleryEntry, GalleryError, GalleryIndex


def clustered_gallery(identities: int = 80, per_identity: int = 5, dimensions: int = 512, seed: int = 0):
    """Embeddings that cluster by identity, like a trained model's, with Market-named entries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dimensions)).astype(np.float32)
    embeddings = np.repeat(centres, per_identity, axis=0) + 0.6 * rng.standard_normal((identities * per_identity, dimensions)).astype(np.float32)
    entries = [
        GalleryEntry.from_path(Path(f"/data/{pid + 1:04d}_c{shot + 1}s1_{shot:06d}_01.jpg"))
        for pid in range(identities)
        for shot in range(per_identity)
    ]
    queries = centres + 0.6 * rng.standard_normal(centres.shape).astype(np.float32)
    return embeddings, entries, queries


def answers(index: GalleryIndex, queries: np.ndarray, exact: bool = False, top_k: int = 5) -> tuple[list[list[str]], np.ndarray]:
    """The files found for each query, best first, and their scores."""
    results = index.search(queries, top_k=top_k, exact=exact)
    return [[m.entry.path for m in matches] for matches in results], np.array([[m.score for m in matches] for matches in results])


def assert_same_answers(first: tuple[list[list[str]], np.ndarray], second: tuple[list[list[str]], np.ndarray]) -> None:
    assert first[0] == second[0]
    np.testing.assert_allclose(first[1], second[1], atol=1e-5)


def test_exact_search_finds_each_identity_best_first():
    embeddings, entries, queries = clustered_gallery()
    index = GalleryIndex(embeddings, entries, model="osnet")
    assert not index.uses_faiss
    results = index.search(queries, top_k=5)
    assert [m.rank for m in results[0]] == [1, 2, 3, 4, 5]
    for pid, matches in enumerate(results, 1):
        scores = [m.score for m in matches]
        assert scores == sorted(scores, reverse=True)
        assert matches[0].entry.pid == pid
    assert results[0][0].entry.camid in range(1, 6)


def test_numpy_and_faiss_agree():
    pytest.importorskip("faiss")
    embeddings, entries, queries = clustered_gallery()
    exact = GalleryIndex(embeddings, entries, model="osnet")
    graph = GalleryIndex(embeddings, entries, model="osnet", faiss_threshold=len(entries))
    assert graph.uses_faiss
    assert_same_answers(answers(graph, queries), answers(exact, queries))
    assert_same_answers(answers(graph, queries, exact=True), answers(exact, queries))


@pytest.mark.parametrize("faiss_threshold", [100_000, 0])
def test_saved_index_answers_the_same_after_reloading(tmp_path, faiss_threshold):
    if faiss_threshold == 0:
        pytest.importorskip("faiss")
    embeddings, entries, queries = clustered_gallery()
    index = GalleryIndex(embeddings, entries, model="osnet", faiss_threshold=faiss_threshold)
    before = answers(index, queries)
    index.save(tmp_path / "gallery")
    del index
    reloaded = GalleryIndex.load(tmp_path / "gallery")
    assert reloaded.uses_faiss == (faiss_threshold == 0)
    assert (tmp_path / "gallery" / FAISS_FILE).exists() == reloaded.uses_faiss
    assert reloaded.entries == entries and reloaded.model == "osnet"
    assert_same_answers(answers(reloaded, queries), before)


def test_saving_a_small_gallery_over_a_large_one_drops_the_stale_graph(tmp_path):
    pytest.importorskip("faiss")
    embeddings, entries, _ = clustered_gallery()
    GalleryIndex(embeddings, entries, model="osnet", faiss_threshold=0).save(tmp_path)
    GalleryIndex(embeddings[:10], entries[:10], model="osnet").save(tmp_path)
    assert not (tmp_path / FAISS_FILE).exists()
    assert len(GalleryIndex.load(tmp_path)) == 10


def test_top_k_beyond_the_gallery_returns_everything():
    embeddings, entries, queries = clustered_gallery(identities=2, per_identity=2)
    assert len(GalleryIndex(embeddings, entries, model="osnet").search(queries[:1], top_k=50)[0]) == 4


def test_entries_without_market_names_have_no_identity():
    assert GalleryEntry.from_path(Path("shots/person.jpg")) == GalleryEntry(path="shots/person.jpg", pid=None, camid=None)


def test_bad_galleries_and_queries_are_refused(tmp_path):
    embeddings, entries, _ = clustered_gallery(identities=2, per_identity=2)
    with pytest.raises(GalleryError, match="not a saved gallery"):
        GalleryIndex.load(tmp_path / "absent")
    with pytest.raises(GalleryError, match="3 entries for 4 embeddings"):
        GalleryIndex(embeddings, entries[:3], model="osnet")
    with pytest.raises(GalleryError, match="dimensions"):
        GalleryIndex(embeddings, entries, model="osnet").search(np.ones((1, 8), np.float32))
