"""moefuse.ops.launch: an autotuned kernel is asked for its config once per key, then launched directly."""

from __future__ import annotations

import pytest
import torch

import moefuse  # noqa: F401
from moefuse.kernels import grouped_gemm as kernels
from moefuse.ops import launch as launch_module
from moefuse.ops import triton_gemm
from moefuse.ops.backend import use_backend
from test_triton_kernels import DEVICE, _m, assert_close, group_ids, randn


@pytest.fixture
def autotuner_calls(monkeypatch):
    """Counts the calls that go through the grouped GEMM's Triton ``Autotuner``; fresh launch caches."""
    monkeypatch.setattr(launch_module, "_launchers", {})
    calls = []
    run = kernels.grouped_gemm_kernel.run

    def counted(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(kernels.grouped_gemm_kernel, "run", counted)
    return calls


def _gemm(m_sizes: list[int], n: int, k: int, dtype=torch.float32):
    a = randn(sum(m_sizes), k, dtype=dtype)
    w = randn(len(m_sizes), n, k, dtype=dtype, scale=0.3)
    ref = torch.einsum("rk,rnk->rn", a.double(), w.double()[group_ids(m_sizes).to(DEVICE)])
    with use_backend("triton"):
        out = triton_gemm.grouped_gemm(a, w, _m(m_sizes))
    return out, ref


def test_autotuner_is_asked_once_per_key(autotuner_calls):
    for _ in range(3):
        out, ref = _gemm([3, 0, 5], 24, 16)
        assert_close(out, ref, torch.float32, "same key")
    assert len(autotuner_calls) == 1
    out, ref = _gemm([3, 0, 5], 40, 16)  # another N: another key, the autotuner decides again
    assert_close(out, ref, torch.float32, "new key")
    assert len(autotuner_calls) == 2
    out, ref = _gemm([3, 0, 5], 24, 16, torch.float16)  # another dtype: another key
    assert_close(out, ref, torch.float16, "new dtype")
    assert len(autotuner_calls) == 3


def test_fast_launch_off_goes_through_the_autotuner(autotuner_calls, monkeypatch):
    monkeypatch.setattr(launch_module, "FAST_LAUNCH", False)
    for _ in range(2):
        out, ref = _gemm([2, 4], 24, 16)
        assert_close(out, ref, torch.float32)
    assert len(autotuner_calls) == 2


def test_unknown_constexpr_is_refused(autotuner_calls):
    """A compiled launch refuses a keyword the kernel does not take and Triton's interpreter ignores it: the
    launcher refuses it on every backend, so the CPU tests catch a launcher passing a stale flag."""
    a, w, m_sizes = randn(4, 16, dtype=torch.float32), randn(2, 24, 16, dtype=torch.float32), _m([1, 3])
    with use_backend("triton"):
        triton_gemm.grouped_gemm(a, w, m_sizes)  # known arguments pass
        with pytest.raises(TypeError, match="grouped_gemm_kernel has no parameter NOT_A_FLAG"):
            launch_module.launch(kernels.grouped_gemm_kernel, lambda meta: (1,), NOT_A_FLAG=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels)")
def test_compiled_kernel_per_specialization(autotuner_calls):
    """Launched directly, a kernel compiled for 16-byte-aligned operands must not serve a misaligned one (nor a
    stride of 1 one compiled for another stride): each gets its own compiled kernel, and every result is right."""
    m_sizes, n, k = [40, 0, 17], 48, 32
    ids = group_ids(m_sizes).to(DEVICE)
    w = randn(len(m_sizes), n, k, dtype=torch.bfloat16, scale=0.3)
    flat = randn(sum(m_sizes) * k + 1, dtype=torch.bfloat16)
    operands = {
        "aligned": flat[: sum(m_sizes) * k].view(-1, k),
        "misaligned": flat[1:].view(-1, k),  # 2 bytes past a 16-byte boundary
        "aligned again": flat[: sum(m_sizes) * k].view(-1, k).clone(),
    }
    for name, a in operands.items():
        for _ in range(2):  # the second call is the direct launch
            out = triton_gemm.grouped_gemm(a, w, _m(m_sizes))
            ref = torch.einsum("rk,rnk->rn", a.double(), w.double()[ids])
            assert_close(out, ref, torch.bfloat16, name)
    compiled = launch_module._launchers[id(kernels.grouped_gemm_kernel)].compiled
    assert len(compiled) == 2, "aligned and misaligned operands share a compiled kernel"
