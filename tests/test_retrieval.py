import torch

from clipmodel.retrieval import ranks, summarize


def brute_force(q, g, qk, gk):
    sim = q @ g.T
    out = []
    for i in range(len(q)):
        hits = [j for j in range(len(g)) if set(qk[i].tolist()) - {-1} & set(gk[j].tolist())]
        if not hits:
            out.append(len(g) + 1)
            continue
        best = max(sim[i, j].item() for j in hits)
        out.append(int((sim[i] > best).sum()) + 1)
    return torch.tensor(out)


def test_chunked_ranks_equal_brute_force():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 8), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(53, 8), dim=-1)
    qk = torch.randint(0, 20, (37, 2))
    qk[::5, 1] = -1
    gk = torch.randint(0, 20, (53, 3))
    gk[::3, 0] = -1
    expected = brute_force(q, g, qk, gk)
    for chunk in (1, 7, 16, 1000):
        assert torch.equal(ranks(q, g, qk, gk, chunk=chunk), expected)


def test_own_pair_retrieval_and_summary():
    x = torch.eye(4)
    keys = torch.arange(4).view(-1, 1)
    r = ranks(x, x, keys, keys, chunk=3)
    assert r.tolist() == [1, 1, 1, 1]
    s = summarize(torch.tensor([1, 2, 6, 11]))
    assert s["r1"] == 0.25 and s["r5"] == 0.5 and s["r10"] == 0.75 and s["median_rank"] == 4.0


def test_query_without_hit_ranks_last():
    r = ranks(torch.ones(1, 2), torch.ones(3, 2), torch.tensor([[5]]), torch.tensor([[1], [2], [3]]))
    assert r.tolist() == [4]
