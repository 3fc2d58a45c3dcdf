import pytest
import torch

from moefuse.ops.routing import check_top_k_index, route, route_reference


@pytest.mark.parametrize("tokens,top_k,experts", [(1, 1, 1), (7, 2, 4), (33, 8, 128), (5, 3, 64), (0, 2, 4)])
def test_route_matches_reference(tokens, top_k, experts):
    idx = (
        torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
        if tokens
        else torch.empty(0, top_k)
    )
    idx = idx.long()
    got, ref = route(idx, experts), route_reference(idx, experts)
    for name in ("m_sizes", "sorted_slots", "token_index", "inverse"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert int(got.m_sizes.sum()) == tokens * top_k
    # grouped rows are sorted by expert and the inverse undoes the sort
    flat = idx.reshape(-1)
    assert torch.all(flat[got.sorted_slots][1:] >= flat[got.sorted_slots][:-1])
    assert torch.equal(got.sorted_slots[got.inverse], torch.arange(tokens * top_k))


def test_route_counts_experts_without_tokens():
    idx = torch.tensor([[3, 3], [3, 0]])
    r = route(idx, 6)
    assert r.m_sizes.tolist() == [1, 0, 0, 3, 0, 0]


@pytest.mark.parametrize(
    "idx,err,match",
    [
        (torch.tensor([[0, 4]]), IndexError, "expert id 4, outside"),
        (torch.tensor([[-1, 0]]), IndexError, "expert id -1"),
        (torch.tensor([0, 1]), ValueError, "2-D"),
        (torch.tensor([[0.0, 1.0]]), TypeError, "integer"),
    ],
)
def test_bad_top_k_index(idx, err, match):
    with pytest.raises(err, match=match):
        check_top_k_index(idx, 4)
