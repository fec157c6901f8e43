"""Re-identification metrics with the Market-1501 protocol, in NumPy: CMC and mAP, and chance level.

The protocol (Zheng et al., ICCV 2015; torchreid's `eval_market1501`):
- for each query, gallery entries of the same identity seen by the same camera are removed: finding
  the same person in the same tracklet is not re-identification;
- junk entries (pid -1, bad detections) are removed for every query; distractors (pid 0) stay, as
  negatives;
- a query left with no correct match is skipped (it counts in neither CMC nor mAP);
- CMC at rank k: the fraction of queries with a correct match within the top k;
- AP: the mean over the correct matches of the precision at their ranks; mAP: the mean AP.
Ties in similarity keep gallery order (stable sort), so results are reproducible.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from reid.market1501 import JUNK_PID

DEFAULT_RANKS = (1, 5, 10)


@dataclass(frozen=True, kw_only=True)
class RetrievalMetrics:
    """CMC at the requested ranks and mAP, over the queries that have a correct match."""

    cmc: dict[int, float]  # rank k -> fraction of queries with a correct match in the top k
    mean_average_precision: float
    valid_queries: int
    skipped_queries: int

    def as_dict(self) -> dict:
        return {
            **{f"rank{k}": value for k, value in self.cmc.items()},
            "mAP": self.mean_average_precision,
            "valid_queries": self.valid_queries,
            "skipped_queries": self.skipped_queries,
        }


def _valid_gallery(
    query_pid: int, query_camid: int, gallery_pids: np.ndarray, gallery_camids: np.ndarray
) -> np.ndarray:
    """Gallery entries a query may be ranked against: not junk, not its own identity in its own camera."""
    return (gallery_pids != JUNK_PID) & ~((gallery_pids == query_pid) & (gallery_camids == query_camid))


def _check_inputs(
    similarity: np.ndarray,
    query_pids: Sequence[int],
    query_camids: Sequence[int],
    gallery_pids: Sequence[int],
    gallery_camids: Sequence[int],
    ranks: Sequence[int],
) -> tuple[np.ndarray, ...]:
    q_pids, q_camids = np.asarray(query_pids), np.asarray(query_camids)
    g_pids, g_camids = np.asarray(gallery_pids), np.asarray(gallery_camids)
    if len(q_pids) != len(q_camids) or len(g_pids) != len(g_camids):
        raise ValueError("each query and gallery entry needs one pid and one camera id")
    if similarity.shape != (len(q_pids), len(g_pids)):
        raise ValueError(f"similarity must be [queries, gallery] = [{len(q_pids)}, {len(g_pids)}], got {similarity.shape}")
    if np.any(q_pids == JUNK_PID):
        raise ValueError("a query with pid -1 (junk) has no identity to find: remove junk from the queries")
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be >= 1, got {list(ranks)}")
    return q_pids, q_camids, g_pids, g_camids


def evaluate_retrieval(
    similarity: np.ndarray,
    query_pids: Sequence[int],
    query_camids: Sequence[int],
    gallery_pids: Sequence[int],
    gallery_camids: Sequence[int],
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> RetrievalMetrics:
    """CMC and mAP of the ranking given by `similarity` [queries, gallery] (higher is more alike)."""
    q_pids, q_camids, g_pids, g_camids = _check_inputs(similarity, query_pids, query_camids, gallery_pids, gallery_camids, ranks)
    hits_within = {k: 0 for k in ranks}
    average_precisions = []
    for index in range(len(q_pids)):
        order = np.argsort(-similarity[index], kind="stable")
        keep = _valid_gallery(q_pids[index], q_camids[index], g_pids[order], g_camids[order])
        matches = g_pids[order][keep] == q_pids[index]
        if not matches.any():
            continue
        first_hit = int(np.argmax(matches))  # 0-based rank of the first correct match
        for k in ranks:
            hits_within[k] += first_hit < k
        hit_ranks = np.flatnonzero(matches) + 1
        average_precisions.append(float(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks)))
    valid = len(average_precisions)
    return RetrievalMetrics(
        cmc={k: hits_within[k] / valid if valid else 0.0 for k in ranks},
        mean_average_precision=float(np.mean(average_precisions)) if valid else 0.0,
        valid_queries=valid,
        skipped_queries=len(q_pids) - valid,
    )


def _expected_average_precision(relevant: int, total: int) -> float:
    """E[AP] of a uniformly random ranking of `total` items of which `relevant` are correct.

    Summing P(item at rank r is correct) * E[precision at r | correct] over r gives
    ((N - R) * H_N / N + R - 1) / (N - 1), with H_N the N-th harmonic number.
    """
    if total == 1:
        return 1.0
    harmonic = float(np.sum(1.0 / np.arange(1, total + 1)))
    return ((total - relevant) * harmonic / total + relevant - 1) / (total - 1)


def _chance_hit_within(k: int, relevant: int, total: int) -> float:
    """P(at least one of `relevant` correct items among the top k of a random ranking of `total`)."""
    if k >= total:
        return 1.0
    return 1.0 - math.comb(total - relevant, k) / math.comb(total, k)


def chance_level(
    query_pids: Sequence[int],
    query_camids: Sequence[int],
    gallery_pids: Sequence[int],
    gallery_camids: Sequence[int],
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> RetrievalMetrics:
    """The expected metrics of a random ranking under the same protocol (exact expectations, no sampling)."""
    dummy = np.zeros((len(query_pids), len(gallery_pids)), dtype=np.float32)
    q_pids, q_camids, g_pids, g_camids = _check_inputs(dummy, query_pids, query_camids, gallery_pids, gallery_camids, ranks)
    hits_within = {k: 0.0 for k in ranks}
    average_precisions = []
    for pid, camid in zip(q_pids, q_camids):
        keep = _valid_gallery(pid, camid, g_pids, g_camids)
        total, relevant = int(keep.sum()), int((g_pids[keep] == pid).sum())
        if relevant == 0:
            continue
        for k in ranks:
            hits_within[k] += _chance_hit_within(k, relevant, total)
        average_precisions.append(_expected_average_precision(relevant, total))
    valid = len(average_precisions)
    return RetrievalMetrics(
        cmc={k: hits_within[k] / valid if valid else 0.0 for k in ranks},
        mean_average_precision=float(np.mean(average_precisions)) if valid else 0.0,
        valid_queries=valid,
        skipped_queries=len(q_pids) - valid,
    )


def format_metrics_table(rows: dict[str, RetrievalMetrics]) -> str:
    """A plain-text table: one row per named result (e.g. the model, chance), CMC ranks and mAP in percent."""
    ranks = list(next(iter(rows.values())).cmc)
    header = f"{'':<12}" + "".join(f"{'rank-' + str(k):>9}" for k in ranks) + f"{'mAP':>9}"
    lines = [header]
    for label, metrics in rows.items():
        lines.append(f"{label:<12}" + "".join(f"{100 * metrics.cmc[k]:8.1f}%" for k in ranks) + f"{100 * metrics.mean_average_precision:8.1f}%")
    return "\n".join(lines)
