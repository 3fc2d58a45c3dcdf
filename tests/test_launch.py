"""moefuse.ops.launch: an autotuned kernel is asked for its config once per key, then launched directly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import moefuse  # noqa: F401
from moefuse.kernels import grouped_gemm as kernels
from moefuse.ops import launch as launch_module
from moefuse.ops import triton_gemm
from moefuse.ops.backend import use_backend
from moefuse.settings import override_settings
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


def test_fast_launch_off_goes_through_the_autotuner(autotuner_calls):
    for _ in range(2):
        with override_settings(fast_launch=False):
            out, ref = _gemm([2, 4], 24, 16)
        assert_close(out, ref, torch.float32)
    assert len(autotuner_calls) == 2


def _grouped_gemm_arguments(monkeypatch) -> dict:
    """The keyword arguments grouped_gemm launches its kernel with (recorded, then launched as usual)."""
    recorded = {}

    def record(kernel, grid, /, **arguments):
        recorded.update(arguments)
        launch_module.launch(kernel, grid, **arguments)

    monkeypatch.setattr(triton_gemm, "launch", record)
    a, w, m_sizes = randn(4, 16, dtype=torch.float32), randn(2, 24, 16, dtype=torch.float32), _m([1, 3])
    with use_backend("triton"):
        triton_gemm.grouped_gemm(a, w, m_sizes)
    return recorded


def test_unknown_or_missing_keyword_is_refused(autotuner_calls, monkeypatch):
    """A compiled launch refuses a keyword the kernel does not take and Triton's interpreter ignores it: the
    launcher refuses unknown and missing names on every backend, naming the kernel, so the CPU tests catch a
    launcher passing a stale flag or forgetting an argument."""
    arguments = _grouped_gemm_arguments(monkeypatch)  # the known arguments pass
    kernel, grid = kernels.grouped_gemm_kernel, lambda meta: (1,)
    with pytest.raises(TypeError, match="grouped_gemm_kernel has no parameter NOT_A_FLAG"):
        launch_module.launch(kernel, grid, **arguments, NOT_A_FLAG=True)
    with pytest.raises(TypeError, match="grouped_gemm_kernel: BLOCK_M set by its autotuner configs"):
        launch_module.launch(kernel, grid, **arguments, BLOCK_M=16)
    for missing in (["a_ptr"], ["lora_rank", "stride_bk", "LORA_R"]):  # in parameter order
        partial = {name: value for name, value in arguments.items() if name not in missing}
        with pytest.raises(TypeError, match=f"grouped_gemm_kernel: missing argument {', '.join(missing)}$"):
            launch_module.launch(kernel, grid, **partial)


def test_constexprs_must_come_last():
    """The fast path passes the runtime arguments, then the constexprs: a kernel that mixes them is refused."""
    import triton
    import triton.language as tl

    @triton.jit
    def mixed_kernel(x_ptr, BLOCK: tl.constexpr, n):
        pass

    with pytest.raises(
        TypeError, match="mixed_kernel: launch\\(\\) takes kernels whose constexpr parameters"
    ):
        launch_module.launch(mixed_kernel, lambda meta: (1,), x_ptr=None, BLOCK=1, n=1)


class _Compiled:
    """A compiled kernel's stand-in on the CPU: ``run`` takes every parameter in order after the launch's own
    arguments, as the compiled launcher does, and runs them through Triton's interpreter, so a wrong order gives
    wrong results."""

    function = packed_metadata = None

    def __init__(self, interpreted, launches: dict):
        self.interpreted, self.launches = interpreted, launches

    def run(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit, *params):
        self.launches["direct"] += 1
        self.interpreted[(grid_x, grid_y, grid_z)](*params)


class _Binder:
    """The JIT function's binder (``jit[grid](*args, **meta)``), counted; it returns a :class:`_Compiled`."""

    def __init__(self, interpreted, launches: dict):
        self.interpreted, self.launches = interpreted, launches

    def __getitem__(self, grid):
        def bind(*args, **meta):
            self.launches["binder"] += 1
            self.interpreted[grid](*args, **meta)
            return _Compiled(self.interpreted, self.launches)

        return bind


@pytest.fixture
def compiled_launches(monkeypatch):
    """Launches as on a GPU, on the CPU: the fast path is on (it is off under the interpreter, which compiles
    nothing), each launcher's JIT function is a counted :class:`_Binder`, the driver a stand-in."""
    launches = {"binder": 0, "direct": 0}

    class Launcher(launch_module._Launcher):
        def __init__(self, kernel):
            super().__init__(kernel)
            self.jit = _Binder(self.jit, launches)

    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: None)
    monkeypatch.setattr(launch_module, "_COMPILED", True)
    monkeypatch.setattr(launch_module, "driver", SimpleNamespace(active=active))
    monkeypatch.setattr(launch_module, "_Launcher", Launcher)
    return launches


def test_keyword_launch_takes_the_fast_path(autotuner_calls, compiled_launches):
    """By keyword, a launch with the same arguments finds its compiled kernel: the autotuner is asked on the first
    call of a key, the binder on the second, and from the third on the kernel is launched directly, with every
    parameter in order (checked by the results). Another N is another key."""
    expected = [(1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 1, 2)]
    for autotuned, binder, direct in expected:
        out, ref = _gemm([3, 0, 5], 24, 16)
        assert_close(out, ref, torch.float32)
        assert (len(autotuner_calls), compiled_launches["binder"], compiled_launches["direct"]) == (
            autotuned,
            binder,
            direct,
        )
    assert len(launch_module._launchers[id(kernels.grouped_gemm_kernel)].compiled) == 1
    out, ref = _gemm([3, 0, 5], 40, 16)
    assert_close(out, ref, torch.float32, "new N")
    assert (len(autotuner_calls), compiled_launches["binder"]) == (2, 1)
    # Only a constexpr differs (SCALE_ROWS; the stand-in for an absent scale has the scale's dtype): the
    # autotuner's choice holds (not in its key), the binder compiles another kernel.
    a, w = randn(8, 16, dtype=torch.float32), randn(3, 24, 16, dtype=torch.float32)
    scale = randn(8, dtype=torch.float32)
    with use_backend("triton"):
        out = triton_gemm.grouped_gemm(a, w, _m([3, 0, 5]), row_scale=scale)
    ref = torch.einsum("rk,rnk->rn", a.double(), w.double()[group_ids([3, 0, 5]).to(DEVICE)])
    assert_close(out, ref * scale.double()[:, None], torch.float32, "scaled rows")
    assert (len(autotuner_calls), compiled_launches["binder"]) == (2, 2)


def test_keyword_order_does_not_split_the_cache(compiled_launches, monkeypatch):
    """The compiled-kernel key is built in parameter order, whatever order the caller names them in: a plain JIT
    kernel is bound on its first call and launched directly after, the arguments reversed included."""
    recorded = {}

    def record(kernel, grid, /, **arguments):
        recorded.update(arguments, grid=grid)
        launch_module.launch(kernel, grid, **arguments)

    monkeypatch.setattr(launch_module, "_launchers", {})
    monkeypatch.setattr(triton_gemm, "launch", record)
    rows, inter = 5, 12
    g, gate_up, scale = (
        randn(rows, inter, dtype=torch.float32),
        randn(rows, 2 * inter, dtype=torch.float32),
        randn(rows, dtype=torch.float32),
    )
    first = triton_gemm.glu_backward_rows(g, gate_up, scale)
    again = triton_gemm.glu_backward_rows(g, gate_up, scale)
    assert (compiled_launches["binder"], compiled_launches["direct"]) == (1, 1)
    for value, ref in zip(again, first, strict=True):
        assert torch.equal(value, ref)
    grid = recorded.pop("grid")
    recorded["d_gate_up_ptr"] = torch.empty_like(gate_up)
    launch_module.launch(kernels.glu_backward_rows_kernel, grid, **dict(reversed(recorded.items())))
    assert (compiled_launches["binder"], compiled_launches["direct"]) == (1, 2)
    assert torch.equal(recorded["d_gate_up_ptr"], first[0])
    compiled = launch_module._launchers[id(kernels.glu_backward_rows_kernel)].compiled
    assert len(compiled) == 1


def test_a_new_batch_size_launches_directly(compiled_launches, monkeypatch):
    """Row counts change from step to step with packed rows. A kernel that declares its row count
    ``do_not_specialize`` is bound once: the next call, with other rows, launches the compiled kernel directly
    and gives the right result; an integer that is specialised on (the columns) still binds anew."""
    monkeypatch.setattr(launch_module, "_launchers", {})
    results = []
    for rows, inter in [(5, 12), (7, 12), (33, 12), (7, 20)]:
        g, gate_up, scale = (
            randn(rows, inter, dtype=torch.float32),
            randn(rows, 2 * inter, dtype=torch.float32),
            randn(rows, dtype=torch.float32),
        )
        with override_settings(fast_launch=False):
            expected = triton_gemm.glu_backward_rows(g, gate_up, scale)
        got = triton_gemm.glu_backward_rows(g, gate_up, scale)
        results.append((compiled_launches["binder"], compiled_launches["direct"]))
        for value, ref in zip(got, expected, strict=True):
            assert torch.equal(value, ref), (rows, inter)
    assert results == [(1, 0), (1, 1), (1, 2), (2, 2)]
    launcher = launch_module._launchers[id(kernels.glu_backward_rows_kernel)]
    assert [launcher.runtime_names[i] for i in launcher.unspecialized] == ["rows"]
    assert len(launcher.compiled) == 2


def test_unspecialised_integer_cannot_be_a_tuning_key():
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["n"])
    @triton.jit(do_not_specialize=["n"])
    def keyed_kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    with pytest.raises(
        TypeError, match="keyed_kernel: a do_not_specialize parameter cannot be an autotuning"
    ):
        launch_module.launch(keyed_kernel, lambda meta: (1,), x_ptr=None, n=1)


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
