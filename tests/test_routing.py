"""Routing (the PyTorch path and the Triton counting sort) against the plain-Python reference."""

import pytest
import torch

from moefuse.ops import routing
from moefuse.ops.backend import use_backend
from moefuse.ops.routing import check_top_k_index, route, route_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def backend(request, monkeypatch):
    """Each test on both paths; the Triton kernels in blocks of 16 assignments (several blocks, a partial last)."""
    monkeypatch.setattr(routing, "ROUTING_BLOCK", 16)
    with use_backend(request.param):
        yield request.param


@pytest.mark.parametrize(
    "tokens,top_k,experts",
    [(1, 1, 1), (7, 2, 4), (33, 8, 128), (5, 3, 64), (0, 2, 4), (40, 1, 1), (21, 4, 5)],
)
def test_route_matches_reference(tokens, top_k, experts, backend):
    idx = (
        torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
        if tokens
        else torch.empty(0, top_k)
    )
    idx = idx.long()
    got, ref = route(idx, experts), route_reference(idx, experts)
    for name in ("m_sizes", "sorted_slots", "token_index", "inverse", "offsets"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert int(got.m_sizes.sum()) == tokens * top_k
    assert got.offsets.dtype == torch.int32  # grouped_mm's offs
    # grouped rows are sorted by expert and the inverse undoes the sort
    flat = idx.reshape(-1)
    assert torch.all(flat[got.sorted_slots][1:] >= flat[got.sorted_slots][:-1])
    assert torch.equal(got.sorted_slots[got.inverse], torch.arange(tokens * top_k))


def test_route_counts_experts_without_tokens(backend):
    idx = torch.tensor([[3, 3], [3, 0]])
    r = route(idx, 6)
    assert r.m_sizes.tolist() == [1, 0, 0, 3, 0, 0]
    assert r.sorted_slots.tolist() == [3, 0, 1, 2] and r.token_index.tolist() == [1, 0, 0, 1]


def test_route_int32_and_strided_ids(backend):
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 9, (6, 50), generator=g, dtype=torch.int32)
    idx = wide.t()[:, ::2]  # [50, 3] with neither stride 1: the assignments are read in [T, K] order
    got, ref = route(idx, 9), route_reference(idx, 9)
    for name in ("m_sizes", "sorted_slots", "token_index"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
        assert getattr(got, name).dtype == torch.long


@pytest.mark.interpreter
def test_route_triton_leaves_out_ids_out_of_range(monkeypatch):
    """The kernels cannot raise: an id outside [0, E) joins no expert (check_top_k_index is the caller's check),
    and the valid ones are grouped as if it were not there."""
    monkeypatch.setattr(routing, "ROUTING_BLOCK", 16)
    idx = torch.tensor([[2, 5], [-1, 0], [2, 3], [7, 2]])
    with use_backend("triton"):
        got = route(idx, 4)
    assert got.m_sizes.tolist() == [1, 0, 3, 1]
    assert got.offsets.tolist() == [1, 1, 4, 5]
    rows = int(got.m_sizes.sum())
    assert got.sorted_slots[:rows].tolist() == [3, 0, 4, 7, 5]
    assert got.token_index[:rows].tolist() == [1, 0, 2, 3, 2]
    assert got.inverse.tolist() == [1, -1, -1, 0, 2, 4, -1, 3]  # the ids left out have no grouped row
    x = torch.arange(12.0).view(4, 3)
    y = torch.arange(24.0).view(8, 3)  # the grouped rows past the valid ones are never read
    with use_backend("triton"):
        assert torch.equal(got.grouped(x)[:rows], x[got.token_index[:rows]])
        assert torch.equal(got.token_sums(y), torch.stack([y[1], y[0], y[2] + y[4], y[3]]))


@pytest.mark.parametrize(
    "tokens,top_k,experts,width", [(1, 1, 1, 5), (37, 4, 6, 300), (20, 8, 128, 64), (0, 2, 4, 8)]
)
def test_grouped_rows_equal_gather(tokens, top_k, experts, width, backend):
    """routing.grouped(x) is x[token_index], also for widths that are not a multiple of the copy's column block
    and for a row-strided x (its rows at a stride, columns unit-strided)."""
    idx = (
        torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).long()
        if tokens
        else torch.empty(0, top_k).long()
    )
    got = route(idx, experts)
    wide = torch.randn(tokens, width + 3)
    for x in (wide[:, :width].contiguous(), wide[:, 1 : width + 1], wide.to(torch.float16)[:, :width]):
        out = got.grouped(x)
        assert out.dtype == x.dtype and out.shape == (tokens * top_k, width)
        assert torch.equal(out, x[got.token_index])
        # and back: each token's K grouped rows summed (fp32 sums, rounded once, as torch sums fp16)
        y = torch.randn(tokens * top_k, width + 3).to(x.dtype)[:, 1 : width + 1]
        sums = got.token_sums(y)
        assert sums.dtype == y.dtype and sums.shape == (tokens, width)
        torch.testing.assert_close(sums, y[got.inverse].view(tokens, top_k, width).sum(1), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,experts", [(4096, 128), (16384, 128), (3000, 60), (1, 128)])
def test_route_triton_gpu_equals_torch(tokens, experts):
    g = torch.Generator(DEVICE).manual_seed(tokens)
    logits = torch.randn(tokens, experts, generator=g, device=DEVICE)
    logits[:, :3] += 2.0  # popular experts, and some that get no token
    idx = logits.topk(min(8, experts), dim=-1).indices
    with use_backend("triton"):
        got = route(idx, experts)
    with use_backend("torch"):
        ref = route(idx, experts)
    for name in ("m_sizes", "sorted_slots", "token_index", "inverse", "offsets"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    x = torch.randn(tokens, 2048, generator=g, device=DEVICE, dtype=torch.bfloat16)
    with use_backend("triton"):
        assert torch.equal(got.grouped(x), x[ref.token_index])


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
