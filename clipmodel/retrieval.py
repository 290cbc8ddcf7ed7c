"""Retrieval metrics in chunks: memory is O(query_chunk x gallery_chunk), never the full N x N matrix.

A gallery item is a hit for a query when they share any key (its own pair, the same caption text,
the same scene...). Keys are int arrays [N, K] with -1 for "no key", so one function serves every
notion of a correct match.
"""
from __future__ import annotations

import torch


def _matches(qk: torch.Tensor, gk: torch.Tensor) -> torch.Tensor:
    eq = qk[:, None, :, None] == gk[None, :, None, :]
    return (eq & (qk[:, None, :, None] >= 0)).any(-1).any(-1)


def ranks(queries: torch.Tensor, gallery: torch.Tensor, query_keys: torch.Tensor,
          gallery_keys: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """int64 [Nq]: 1-based rank of each query's best-scoring hit (ties count in the query's favour).

    queries [Nq, D] and gallery [Ng, D] are scored by dot product (pass L2-normalised features for
    cosine), in fp32; keys are int [Nq, K] and [Ng, K'] as described above.

    Two passes over the gallery: the first finds each query's best hit score, the second counts
    the gallery items scoring strictly higher. A query without any hit gets rank len(gallery)+1.
    """
    n_q, n_g = len(queries), len(gallery)
    best = torch.full((n_q,), float("-inf"), device=queries.device)
    above = torch.zeros(n_q, dtype=torch.long, device=queries.device)
    for g0 in range(0, n_g, chunk):
        g = gallery[g0:g0 + chunk].float()
        for q0 in range(0, n_q, chunk):
            sim = queries[q0:q0 + chunk].float() @ g.T
            hit = _matches(query_keys[q0:q0 + chunk], gallery_keys[g0:g0 + chunk])
            best[q0:q0 + chunk] = torch.maximum(best[q0:q0 + chunk],
                                                sim.masked_fill(~hit, float("-inf")).amax(1))
    for g0 in range(0, n_g, chunk):
        g = gallery[g0:g0 + chunk].float()
        for q0 in range(0, n_q, chunk):
            sim = queries[q0:q0 + chunk].float() @ g.T
            above[q0:q0 + chunk] += (sim > best[q0:q0 + chunk, None]).sum(1)
    return torch.where(torch.isinf(best), torch.full_like(above, n_g + 1), above + 1)


def summarize(r: torch.Tensor) -> dict[str, float]:
    """Recall@1, @5, @10 (fractions in [0, 1]) and the mean and median rank of ranks [N] from `ranks`."""
    r = r.float()
    return {"r1": (r <= 1).float().mean().item(), "r5": (r <= 5).float().mean().item(),
            "r10": (r <= 10).float().mean().item(), "mean_rank": r.mean().item(),
            "median_rank": r.quantile(0.5).item()}
