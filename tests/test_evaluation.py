"""Market-1501 CMC and mAP on cases small enough to compute by hand, and against torchreid's algorithm."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from reid.evaluation import chance_level, evaluate_retrieval, format_metrics_table

# One query: identity 1 seen by camera 1. The gallery, listed by decreasing similarity:
#   A: identity 1, camera 1   same identity and camera as the query: excluded
#   D: junk (-1), camera 2    ignored
#   B: identity 2, camera 2   wrong
#   C: identity 1, camera 2   correct            -> valid rank 2
#   E: distractor (0), cam 3  wrong, kept
#   F: identity 1, camera 3   correct            -> valid rank 4
# rank-1 = 0, rank-5 = 1, AP = (1/2 + 2/4) / 2 = 0.5.
GALLERY_PIDS = [1, -1, 2, 1, 0, 1]
GALLERY_CAMIDS = [1, 2, 2, 2, 3, 3]
SIMILARITY = np.array([[0.99, 0.95, 0.90, 0.80, 0.70, 0.60]])


def test_same_camera_match_is_excluded_and_junk_ignored():
    metrics = evaluate_retrieval(SIMILARITY, [1], [1], GALLERY_PIDS, GALLERY_CAMIDS, ranks=(1, 2, 5))
    assert metrics.cmc == {1: 0.0, 2: 1.0, 5: 1.0}
    assert metrics.mean_average_precision == pytest.approx(0.5)
    assert (metrics.valid_queries, metrics.skipped_queries) == (1, 0)


def test_without_the_protocol_the_same_case_scores_differently():
    # The same ranking with A counted (a different camera) scores rank-1 = 1: exclusion is what made it 0.
    metrics = evaluate_retrieval(SIMILARITY, [1], [1], GALLERY_PIDS, [9, 2, 2, 2, 3, 3], ranks=(1,))
    assert metrics.cmc[1] == 1.0
    # Junk read as an ordinary identity (7) becomes a wrong match ahead of C: C at 3, F at 5,
    # AP = (1/3 + 2/5) / 2 instead of 0.5.
    metrics = evaluate_retrieval(SIMILARITY, [1], [1], [1, 7, 2, 1, 0, 1], GALLERY_CAMIDS, ranks=(1,))
    assert metrics.mean_average_precision == pytest.approx((1 / 3 + 2 / 5) / 2)


def test_query_without_a_match_in_another_camera_is_skipped():
    # Query 2 (identity 5, camera 2) has its only match in its own camera; query 3 (identity 2,
    # camera 1) finds B first: AP 1. Over the two valid queries: rank-1 0.5, mAP (0.5 + 1) / 2.
    similarity = np.vstack([SIMILARITY, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.9, 0.4, 0.5, 0.6]])
    metrics = evaluate_retrieval(similarity, [1, 5, 2], [1, 2, 1], [*GALLERY_PIDS[:4], 5, 1], [*GALLERY_CAMIDS[:4], 2, 3])
    assert (metrics.valid_queries, metrics.skipped_queries) == (2, 1)
    assert metrics.cmc[1] == pytest.approx(0.5)
    assert metrics.mean_average_precision == pytest.approx(0.75)


def test_equal_scores_keep_gallery_order():
    metrics = evaluate_retrieval(np.array([[0.5, 0.5]]), [1], [1], [2, 1], [2, 2], ranks=(1, 2))
    assert metrics.cmc == {1: 0.0, 2: 1.0}
    assert metrics.mean_average_precision == pytest.approx(0.5)


def eval_market1501_torchreid(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """torchreid.metrics.rank.eval_market1501 (Python version), copied as the reference."""
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap = [], []
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw_cmc = matches[q_idx][np.invert(remove)]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        tmp_cmc = np.asarray([x / (i + 1.0) for i, x in enumerate(raw_cmc.cumsum())]) * raw_cmc
        all_ap.append(tmp_cmc.sum() / raw_cmc.sum())
    return np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_cmc), np.mean(all_ap)


def test_agrees_with_torchreid_eval_market1501_on_random_rankings():
    rng = np.random.default_rng(0)
    q_pids, q_camids = rng.integers(1, 30, 200), rng.integers(1, 7, 200)
    g_pids, g_camids = rng.integers(0, 30, 1500), rng.integers(1, 7, 1500)  # pid 0: distractors
    similarity = rng.random((200, 1500))
    expected_cmc, expected_map = eval_market1501_torchreid(-similarity, q_pids, g_pids, q_camids, g_camids, 10)
    metrics = evaluate_retrieval(similarity, q_pids, q_camids, g_pids, g_camids, ranks=(1, 5, 10))
    assert [metrics.cmc[k] for k in (1, 5, 10)] == pytest.approx(expected_cmc[[0, 4, 9]].tolist(), abs=1e-6)
    assert metrics.mean_average_precision == pytest.approx(expected_map)


def test_chance_level_is_the_mean_over_every_possible_ranking():
    # One query (identity 1, camera 1); after exclusions 5 valid entries of which 2 are correct.
    pids, camids = [1, 1, -1, 2, 1, 0, 3], [1, 2, 2, 2, 3, 1, 2]
    rank1, ap, count = 0.0, 0.0, 0
    for ranking in itertools.permutations(range(7)):
        similarity = np.zeros((1, 7))
        similarity[0, list(ranking)] = np.arange(7, 0, -1)
        metrics = evaluate_retrieval(similarity, [1], [1], pids, camids, ranks=(1, 3))
        rank1 += metrics.cmc[1]
        ap += metrics.mean_average_precision
        count += 1
    chance = chance_level([1], [1], pids, camids, ranks=(1, 3))
    assert chance.cmc[1] == pytest.approx(rank1 / count) == pytest.approx(2 / 5)
    assert chance.cmc[3] == pytest.approx(1 - (3 * 2 * 1) / (5 * 4 * 3))  # 1 - P(all 3 wrong)
    assert chance.mean_average_precision == pytest.approx(ap / count)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="similarity must be"):
        evaluate_retrieval(np.zeros((2, 3)), [1], [1], [1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="junk"):
        evaluate_retrieval(np.zeros((1, 1)), [-1], [1], [1], [2])
    with pytest.raises(ValueError, match="ranks"):
        chance_level([1], [1], [1], [2], ranks=(0,))


def test_table_shows_percentages():
    metrics = evaluate_retrieval(SIMILARITY, [1], [1], GALLERY_PIDS, GALLERY_CAMIDS)
    table = format_metrics_table({"model": metrics, "chance": chance_level([1], [1], GALLERY_PIDS, GALLERY_CAMIDS)})
    assert table.splitlines()[0].split() == ["rank-1", "rank-5", "rank-10", "mAP"]
    assert table.splitlines()[1].split() == ["model", "0.0%", "100.0%", "100.0%", "50.0%"]
