"""Probe: do TMA loads, warp specialisation or half-height tail tiles speed up the grouped GEMM on Hopper?

``Y[rows of e] = X[rows of e] @ W[e]^T``, rows grouped by expert (contiguous), ``W [E, N, K]``: pointer loads (as
the moefuse kernels load) against device-side tensor descriptors (``tl.make_tensor_descriptor``), same tile
schedule and configs, beside ``torch.nn.functional.grouped_mm``, at Qwen3-30B-A3B's down and gate/up dims.

    python benchmarks/grouped_gemm_tma_probe.py                        # on a GPU (sm90 for TMA)
    TRITON_INTERPRET=1 python benchmarks/grouped_gemm_tma_probe.py     # correctness at toy sizes on the CPU

Each kernel also runs with Triton's automatic warp specialisation (``tl.range(..., warp_specialize=True)``; Triton
3.6 sends it to its Hopper pass on sm90); ``[ws]`` marks a compiled kernel split into warp partitions, ``[asked]``
one where the request reached the compiler but no split came out.

Measured on an H100 (Triton 3.6): TMA gained only at gate/up dims with a 128x256x64 tile at 131072 rows (539 vs
474 TFLOP/s; grouped_mm 567), nothing at down dims or at 32768 rows. Warp specialisation never split these kernels:
with 8 warps the request reached the compiler and came out unsplit (``[asked]``), within the run-to-run spread of
the same kernels without it (131072 rows at gate/up dims, 128x256x64: 552-559 against 541-569 TFLOP/s; grouped_mm
600); with 4 warps the pass failed to compile ("PassManager::run failed").

``ptr+half-tail`` runs an expert's last tile at half height when at most half its rows are real (with 256 rows per
expert on average, about half the experts spill a few rows into a third 128-row tile). On the H100, random top-8
routing, best config per shape (128x256x64, 8 warps, 4 stages): at 4096 tokens 1.4-4.7% faster (gate/up 442 to 448
TFLOP/s, down 381 to 389, the input gradients' shapes 390 to 401 and 403 to 422; grouped_mm 422 / 367 / 389 / 410);
at 16384 tokens (about 6% of rows in part-empty tiles) no gain, and up to 5% slower.
"""

import torch
import triton
import triton.language as tl

from moefuse.kernels.grouped_gemm import _expert_tile  # the moefuse kernels' tile schedule


@triton.jit
def _ptr_tile(
    a_ptr,
    b_ptr,
    c_ptr,
    e,
    row0,
    row_end,
    pid_n,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """One ``BLOCK_M x BLOCK_N`` output tile of expert ``e`` from rows ``row0`` on (those before ``row_end``)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * N * K + offs_n[None, :] * K + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in tl.range(0, K // BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def gemm_ptr(
    a_ptr,
    b_ptr,
    c_ptr,
    m_sizes_ptr,
    S,
    N,
    K,
    E,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    HALF_TAIL: tl.constexpr = False,
):
    """Pointer loads; with ``HALF_TAIL``, programs with at most ``BLOCK_M / 2`` rows left (an expert's last,
    part-empty tile) run a half-height tile: fewer multiplies of padding rows."""
    e, row0, row_end, pid_n = _expert_tile(
        tl.program_id(0), m_sizes_ptr, E, tl.cdiv(N, BLOCK_N), BLOCK_M, E_POW2
    )
    if e >= E:
        return
    if HALF_TAIL:
        if row_end - row0 <= BLOCK_M // 2:
            _ptr_tile(
                a_ptr,
                b_ptr,
                c_ptr,
                e,
                row0,
                row_end,
                pid_n,
                N,
                K,
                BLOCK_M // 2,
                BLOCK_N,
                BLOCK_K,
                WARP_SPECIALIZE,
            )
            return
    _ptr_tile(a_ptr, b_ptr, c_ptr, e, row0, row_end, pid_n, N, K, BLOCK_M, BLOCK_N, BLOCK_K, WARP_SPECIALIZE)


@triton.jit
def gemm_tma(
    a_ptr,
    b_ptr,
    c_ptr,
    m_sizes_ptr,
    S,
    N,
    K,
    E,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    e, row0, row_end, pid_n = _expert_tile(
        tl.program_id(0), m_sizes_ptr, E, tl.cdiv(N, BLOCK_N), BLOCK_M, E_POW2
    )
    if e >= E:
        return
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[S, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(
        b_ptr, shape=[E * N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K]
    )
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in tl.range(0, K // BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([row0, k * BLOCK_K])
        b = b_desc.load([e * N + n0, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc)
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows < row_end)[:, None])


def run(
    kernel,
    x: torch.Tensor,
    w: torch.Tensor,
    m_sizes: torch.Tensor,
    cfg: tuple,
    warp_specialize: bool = False,
    **flags,
) -> tuple[torch.Tensor, object]:
    """Launch ``kernel`` with ``cfg = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` and its constexpr
    ``flags`` (``HALF_TAIL=True``): the output and the compiled kernel."""
    rows, k = x.shape
    experts, n, _ = w.shape
    block_m, block_n, block_k, warps, stages = cfg
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    n_tiles = triton.cdiv(n, block_n)
    grid = (triton.cdiv(rows, block_m) * n_tiles + experts * n_tiles,)  # an upper bound on the tiles
    compiled = kernel[grid](
        x,
        w,
        out,
        m_sizes,
        rows,
        n,
        k,
        experts,
        triton.next_power_of_2(experts),
        block_m,
        block_n,
        block_k,
        warp_specialize,
        num_warps=warps,
        num_stages=stages,
        **flags,
    )
    return out, compiled


def specialized(compiled: object) -> str:
    """How the compiled kernel came out of Triton's warp specialisation: "ws" when its TTGIR holds a
    ``ttg.warp_specialize`` region (warps split into partitions), "asked" when only the loop's request is left,
    "-" when it was not asked."""
    ttgir = (getattr(compiled, "asm", None) or {}).get("ttgir", "")
    if "ttg.warp_specialize" in ttgir:
        return "ws"
    return "asked" if "warp_specialize" in ttgir else "-"


def probe(experts: int, n: int, k: int, rows: int, cfgs: list[tuple], device: str, dtype: torch.dtype) -> str:
    """One shape: TFLOP/s (and max relative error) of each kernel and config, and of grouped_mm."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(experts, n, k, device=device, dtype=dtype, generator=g) * 0.05
    expert_of_row = torch.randint(0, experts, (rows,), device=device, generator=g)
    m_sizes = torch.bincount(expert_of_row, minlength=experts).to(torch.int32)
    ends = torch.cumsum(m_sizes, 0).to(torch.int32)
    starts = [0, *ends[:-1].tolist()]
    ref = torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate(zip(starts, ends.tolist(), strict=True))])
    gpu = device == "cuda"
    flops = 2 * rows * n * k
    line = f"E{experts} N{n} K{k} rows{rows}:"
    if gpu:
        ms = triton.testing.do_bench(lambda: torch.nn.functional.grouped_mm(x, w.transpose(1, 2), offs=ends))
        line += f" grouped_mm {flops / ms / 1e9:.0f} TF/s |"
    variants = [  # name, kernel, warp specialisation, constexpr flags
        ("ptr", gemm_ptr, False, {}),
        ("ptr+half-tail", gemm_ptr, False, {"HALF_TAIL": True}),
        ("tma", gemm_tma, False, {}),
        ("ptr+ws", gemm_ptr, True, {}),
        ("tma+ws", gemm_tma, True, {}),
    ]
    for cfg in cfgs:
        for name, kernel, ws, flags in variants:
            try:
                out, compiled = run(kernel, x, w, m_sizes, cfg, ws, **flags)
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                ms = (
                    triton.testing.do_bench(
                        lambda k=kernel, c=cfg, s=ws, f=flags: run(k, x, w, m_sizes, c, s, **f)
                    )
                    if gpu
                    else None
                )
                speed = f"{flops / ms / 1e9:.0f}" if ms else "-"
                line += f"\n  {name}{cfg[:3]}w{cfg[3]}s{cfg[4]} {speed} TF/s [{specialized(compiled)}] (err {err:.1e})"
            except Exception as error:  # a config a GPU cannot run is reported, not fatal
                line += (
                    f"\n  {name}{cfg[:3]}w{cfg[3]}s{cfg[4]} FAIL {type(error).__name__}: {str(error)[:120]}"
                )
    return line


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # Device-side descriptors need a scratch allocation per launch.
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    if device == "cpu":
        shapes, cfgs = [(4, 32, 64, 40)], [(16, 32, 16, 4, 1)]
    else:
        shapes = [(128, n, k, tokens * 8) for tokens in (16384, 4096) for n, k in ((2048, 768), (1536, 2048))]
        cfgs = [
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (128, 128, 64, 4, 3),
            (64, 128, 64, 4, 4),
        ]
    for shape in shapes:
        print(probe(*shape, cfgs, device, dtype), flush=True)


if __name__ == "__main__":
    main()
