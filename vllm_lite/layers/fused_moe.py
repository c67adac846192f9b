"""The experts of a mixture-of-experts layer, given the router's choice.

Every token picked ``k`` experts (``topk_ids``, ``[tokens, k]``) with weights (``topk_weights``);
its output is the weighted sum of those experts' SwiGLU MLPs. The weights of all experts of a
layer are stacked: ``w13`` is ``[experts, 2 * intermediate, hidden]`` (gate rows, then up rows)
and ``w2`` is ``[experts, hidden, intermediate]``.

``fused_experts_torch`` is the readable reference (CPU path, and what the GPU kernel is tested
against): each expert runs once over the tokens routed to it.

``fused_experts_triton`` is the fused path (CUDA; and CPU under ``TRITON_INTERPRET=1``, how CI
tests it), the design vLLM and SGLang use:

1. *Alignment* (three small kernels, nothing read on the host): the ``T * k`` (token, slot)
   assignments, numbered ``t * k + slot``, are grouped by expert into ``sorted_ids``; each
   expert's run is padded to a multiple of ``BLOCK_M`` with the sentinel ``T * k``.
   ``bounds[e]`` is where expert e's run starts, ``bounds[E]`` the padded total. The buffer has
   the static length ``T * k + min(E, T * k) * (BLOCK_M - 1)`` (at most that many experts get a
   row), so launch grids depend on shapes only (CUDA graphs); programs past the real total read
   it and exit (at one token of Qwen3-30B-A3B: 8 row blocks, not 121).
2. *Gate/up*: one grouped-GEMM launch; each program takes BLOCK_M rows of one expert's run and
   computes the matching gate and up tiles, and writes ``silu(gate) * up`` ``[T * k, I]``.
3. *Down*: one launch of the same kernel over the activations, the top-k weight multiplied in
   its epilogue, rows written to a ``[T, k, H]`` buffer that torch sums over k: deterministic
   (fp32 atomics would make the low bits depend on timing), and the sum rounds once.

Launch configs come per (experts, hidden, intermediate, token bucket) from ``TUNED_CONFIGS``
(measured on the H200 by ``benchmarks/bench_fused_moe.py --tune``), else ``default_config``.
``warm_up_fused_moe`` compiles every bucket's kernels for the layer shapes seen so far, so a
request never waits for Triton's compiler.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import vllm_lite.triton_compat  # noqa: F401  (runs the kernels under the CPU interpreter)


def fused_experts_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    out = torch.zeros_like(hidden)
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1)
    token_of = torch.arange(hidden.shape[0], device=hidden.device)
    token_of = token_of.repeat_interleave(topk_ids.shape[1])
    for expert in flat_ids.unique().tolist():
        picks = (flat_ids == expert).nonzero().squeeze(1)
        tokens = token_of[picks]
        x = hidden.index_select(0, tokens)
        gate, up = F.linear(x, w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, tokens, y * flat_weights[picks].to(y.dtype).unsqueeze(1))
    return out


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The experts' weighted sum per token: the fused Triton kernel on CUDA, the reference else."""
    if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return fused_experts_triton(hidden, w13, w2, topk_weights, topk_ids)
    return fused_experts_torch(hidden, w13, w2, topk_weights, topk_ids)


# ----------------------------------------------------------------------------- launch configs


class GemmConfig(NamedTuple):
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


class MoEConfig(NamedTuple):
    """BLOCK_M pads the alignment, so both GEMMs share it; each GEMM has its own tiles."""

    block_m: int
    up: GemmConfig
    down: GemmConfig


# a config serves every token count up to its bucket (the last bucket: any count above, too)
M_BUCKETS = (1, 16, 64, 256, 1024, 4096)

# (experts, hidden, intermediate, bucket) -> (BLOCK_M, gate/up (BLOCK_N, BLOCK_K, GROUP_M, warps,
# stages), down (same)), bf16 on the H200. Paste the table ``bench_fused_moe.py --tune`` prints.
# measured on an H200 (bf16) by `python -m benchmarks.bench_fused_moe --tune`, 2026-12-02
TUNED_CONFIGS: dict[tuple[int, int, int, int], tuple] = {
    (128, 2048, 768, 1): (16, (32, 128, 1, 4, 4), (64, 128, 1, 4, 4)),
    (8, 4096, 14336, 1): (16, (32, 256, 1, 4, 2), (64, 128, 1, 4, 4)),
    (60, 2048, 1408, 1): (16, (32, 128, 1, 4, 4), (64, 128, 1, 4, 4)),
    (128, 2048, 768, 16): (16, (32, 256, 1, 4, 2), (64, 256, 1, 4, 2)),
    (8, 4096, 14336, 16): (16, (32, 128, 1, 4, 4), (128, 128, 1, 4, 3)),
    (60, 2048, 1408, 16): (16, (32, 128, 1, 4, 4), (64, 128, 1, 4, 4)),
    (128, 2048, 768, 64): (16, (32, 128, 1, 4, 4), (128, 128, 1, 4, 3)),
    (8, 4096, 14336, 64): (32, (64, 128, 1, 4, 3), (128, 128, 1, 4, 3)),
    (60, 2048, 1408, 64): (16, (32, 128, 1, 4, 4), (64, 128, 1, 4, 4)),
    (128, 2048, 768, 256): (32, (64, 128, 1, 4, 3), (64, 128, 1, 4, 4)),
    (8, 4096, 14336, 256): (64, (64, 64, 8, 4, 3), (128, 64, 8, 4, 3)),
    (60, 2048, 1408, 256): (32, (64, 128, 8, 4, 3), (128, 128, 1, 4, 3)),
    (128, 2048, 768, 4096): (128, (128, 64, 8, 8, 3), (256, 64, 8, 8, 3)),
    (8, 4096, 14336, 4096): (128, (128, 64, 8, 8, 3), (256, 64, 8, 8, 3)),
    (60, 2048, 1408, 4096): (128, (128, 64, 8, 8, 3), (256, 64, 8, 8, 3)),
    (128, 2048, 768, 1024): (64, (64, 64, 8, 4, 3), (128, 64, 8, 4, 3)),
    (8, 4096, 14336, 1024): (64, (64, 64, 8, 4, 3), (128, 64, 8, 4, 3)),
    (60, 2048, 1408, 1024): (128, (64, 64, 8, 4, 3), (128, 64, 8, 4, 3)),
}


def m_bucket(num_tokens: int) -> int:
    return next((b for b in M_BUCKETS if num_tokens <= b), M_BUCKETS[-1])


def default_config(num_experts: int, top_k: int, num_tokens: int) -> MoEConfig:
    """By the rows an expert gets on average: few rows are a weight stream (small tiles, many
    programs, deep K blocks), many rows a compute-bound GEMM (large tiles, grouped ordering)."""
    rows = num_tokens * top_k / num_experts
    if rows <= 16:
        return MoEConfig(16, GemmConfig(32, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))
    if rows <= 32:
        return MoEConfig(32, GemmConfig(64, 128, 8, 4, 3), GemmConfig(128, 128, 8, 4, 3))
    if rows <= 64:
        return MoEConfig(64, GemmConfig(64, 64, 8, 4, 3), GemmConfig(128, 64, 8, 4, 3))
    return MoEConfig(128, GemmConfig(64, 64, 8, 8, 4), GemmConfig(128, 64, 8, 8, 4))


def get_config(
    num_experts: int, hidden: int, inter: int, top_k: int, num_tokens: int, dtype: torch.dtype
) -> MoEConfig:
    tuned = TUNED_CONFIGS.get((num_experts, hidden, inter, m_bucket(num_tokens)))
    if tuned is not None:
        config = MoEConfig(tuned[0], GemmConfig(*tuned[1]), GemmConfig(*tuned[2]))
    else:
        config = default_config(num_experts, top_k, m_bucket(num_tokens))
    if dtype == torch.float32:  # twice the bytes per tile: fewer stages, shorter K blocks

        def shrink(g: GemmConfig) -> GemmConfig:
            return g._replace(block_k=min(g.block_k, 64), num_stages=min(g.num_stages, 2))

        config = MoEConfig(config.block_m, shrink(config.up), shrink(config.down))
    return config


# ----------------------------------------------------------------------------- alignment

# assignments per program of the counting and scattering kernels
_ALIGN_CHUNK = 64
# rows of per-chunk counts the offsets kernel reads at once
_ALIGN_TILE = 64


@triton.jit(do_not_specialize=["num_assign"], do_not_specialize_on_alignment=["ids_ptr"])
def _count_kernel(
    ids_ptr, counts_ptr, num_assign, num_experts, E_POW2: tl.constexpr, CHUNK: tl.constexpr
):
    """Program c: how many of assignments [c * CHUNK, (c + 1) * CHUNK) went to each expert."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_assign, other=-1).to(tl.int32)
    ids = tl.where((ids >= 0) & (ids < num_experts), ids, E_POW2)  # out of range: counted nowhere
    experts = tl.arange(0, E_POW2)
    counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + c * E_POW2 + experts, counts)


@triton.jit(do_not_specialize=["num_chunks", "num_assign"])
def _offsets_kernel(
    counts_ptr,
    chunk_base_ptr,
    bounds_ptr,
    sorted_ptr,
    num_chunks,
    num_experts,
    num_assign,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE: tl.constexpr,
):
    """One program: where each chunk's assignments to each expert start within the expert's
    run (``chunk_base``), the padded runs' starts and total (``bounds``), and the sentinel
    ``num_assign`` in every padding slot."""
    experts = tl.arange(0, E_POW2)
    running = tl.zeros([E_POW2], dtype=tl.int32)
    for c0 in range(0, num_chunks, TILE):
        chunks = c0 + tl.arange(0, TILE)
        offs = chunks[:, None] * E_POW2 + experts[None, :]
        mask = chunks[:, None] < num_chunks
        counts = tl.load(counts_ptr + offs, mask=mask, other=0)
        before = running[None, :] + tl.cumsum(counts, axis=0) - counts
        tl.store(chunk_base_ptr + offs, before, mask=mask)
        running += tl.sum(counts, axis=0)
    padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    starts = tl.cumsum(padded, axis=0) - padded
    tl.store(bounds_ptr + experts, starts, mask=experts < num_experts)
    tl.store(bounds_ptr + num_experts, tl.sum(padded, axis=0))
    slots = (starts + running)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    sentinel = tl.zeros([E_POW2, BLOCK_M], dtype=tl.int32) + num_assign
    tl.store(sorted_ptr + slots, sentinel, mask=slots < (starts + padded)[:, None])


@triton.jit(do_not_specialize=["num_assign"], do_not_specialize_on_alignment=["ids_ptr"])
def _scatter_kernel(
    ids_ptr,
    chunk_base_ptr,
    bounds_ptr,
    sorted_ptr,
    num_assign,
    num_experts,
    E_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program c: each of its assignments goes to its expert's start + the chunk's base + the
    number of earlier assignments of the chunk to the same expert (a stable order)."""
    c = tl.program_id(0)
    idx = tl.arange(0, CHUNK)
    offs = c * CHUNK + idx
    ids = tl.load(ids_ptr + offs, mask=offs < num_assign, other=-1).to(tl.int32)
    valid = (ids >= 0) & (ids < num_experts)
    ids = tl.where(valid, ids, -1)
    earlier = (ids[:, None] == ids[None, :]) & (idx[None, :] < idx[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    base = tl.load(chunk_base_ptr + c * E_POW2 + ids, mask=valid, other=0)
    start = tl.load(bounds_ptr + ids, mask=valid, other=0)
    tl.store(sorted_ptr + start + base + rank, offs, mask=valid)


def align_assignments(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_ids, bounds): the assignments grouped by expert and padded (see the module's
    docstring). Ids outside [0, num_experts) are dropped (their output rows stay unwritten)."""
    num_assign = topk_ids.numel()
    ids = topk_ids.reshape(-1)
    e_pow2 = triton.next_power_of_2(num_experts)
    num_chunks = triton.cdiv(num_assign, _ALIGN_CHUNK)
    dev = topk_ids.device
    max_padded = num_assign + min(num_experts, num_assign) * (block_m - 1)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    bounds = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    counts = torch.empty((num_chunks, e_pow2), dtype=torch.int32, device=dev)
    chunk_base = torch.empty_like(counts)
    _count_kernel[(num_chunks,)](
        ids, counts, num_assign, num_experts, E_POW2=e_pow2, CHUNK=_ALIGN_CHUNK
    )
    _offsets_kernel[(1,)](
        counts,
        chunk_base,
        bounds,
        sorted_ids,
        num_chunks,
        num_experts,
        num_assign,
        E_POW2=e_pow2,
        BLOCK_M=block_m,
        TILE=_ALIGN_TILE,
        num_warps=8,
    )
    _scatter_kernel[(num_chunks,)](
        ids,
        chunk_base,
        bounds,
        sorted_ids,
        num_assign,
        num_experts,
        E_POW2=e_pow2,
        CHUNK=_ALIGN_CHUNK,
    )
    return sorted_ids, bounds


# ----------------------------------------------------------------------------- grouped GEMM


# the router's outputs are read a row at a time: their alignment buys nothing
@triton.jit(do_not_specialize=["num_assign"], do_not_specialize_on_alignment=["weights_ptr"])
def _expert_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    sorted_ptr,
    bounds_ptr,
    weights_ptr,
    num_assign,
    N,
    K,
    num_experts,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_ROWS_PER: tl.constexpr,
    GATED: tl.constexpr,
    WEIGHTED: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (m, n): rows ``sorted[m * BLOCK_M:][:BLOCK_M]`` (one expert's) times that
    expert's ``b`` rows [n * BLOCK_N, +BLOCK_N) (``[N, K]`` per expert), row r of the result
    written to row ``sorted[r]`` of ``c``. A row of ``a`` is assignment // A_ROWS_PER (the
    token, for the hidden states). GATED: b holds N gate rows then N up rows; the result is
    ``silu(gate) * up``. WEIGHTED: each row times its assignment's top-k weight."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    group = GROUP_M * num_pid_n  # GROUP_M row blocks sweep the columns together: b tiles reuse L2
    first_m = pid // group * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    row0 = pid_m * BLOCK_M
    if row0 >= tl.load(bounds_ptr + num_experts):
        return  # past the padded total: the grid is sized for the worst case
    experts = tl.arange(0, E_POW2)
    ends = tl.load(bounds_ptr + 1 + experts, mask=experts < num_experts, other=2147483647)
    expert = tl.sum((ends <= row0).to(tl.int32), axis=0)
    rows = tl.load(sorted_ptr + row0 + tl.arange(0, BLOCK_M))
    row_mask = rows < num_assign  # padding holds the sentinel num_assign

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // A_ROWS_PER).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    # columns past N wrap onto valid rows (no mask on the weight stream); stores drop them
    b_ptrs = (
        b_ptr
        + expert.to(tl.int64) * stride_be
        + ((offs_n % N) * stride_bn)[None, :]
        + offs_k[:, None]
    )
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            if EVEN_K:
                b_up = tl.load(b_ptrs + N * stride_bn)
            else:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # round where the reference rounds: each matmul's output, silu, and each product
    dtype = c_ptr.dtype.element_ty
    out = acc.to(dtype).to(tl.float32)
    if GATED:
        out = (out / (1.0 + tl.exp(-out))).to(dtype).to(tl.float32)
        out = out * acc_up.to(dtype).to(tl.float32)
    if WEIGHTED:
        w = tl.load(weights_ptr + rows, mask=row_mask, other=0.0)
        out = out * w.to(dtype).to(tl.float32)[:, None]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(dtype), mask=row_mask[:, None] & (offs_n < N)[None, :])


def _expert_gemm(
    a,
    b,
    c,
    sorted_ids,
    bounds,
    weights,
    num_assign: int,
    rows_per: int,
    gated: bool,
    block_m: int,
    cfg: GemmConfig,
) -> None:
    """``c[sorted rows] = f(a[rows // rows_per] @ b[expert].T)``; see ``_expert_gemm_kernel``."""
    num_experts, n_rows, k = b.shape
    n = n_rows // 2 if gated else n_rows
    assert a.stride(-1) == 1 and b.stride(-1) == 1 and c.stride(-1) == 1
    grid = (triton.cdiv(sorted_ids.numel(), block_m) * triton.cdiv(n, cfg.block_n),)
    _expert_gemm_kernel[grid](
        a,
        b,
        c,
        sorted_ids,
        bounds,
        weights if weights is not None else bounds,
        num_assign,
        n,
        k,
        num_experts,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        A_ROWS_PER=rows_per,
        GATED=gated,
        WEIGHTED=weights is not None,
        E_POW2=triton.next_power_of_2(num_experts),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


# layer shapes met so far: (experts, hidden, intermediate, top_k, dtype, device) -> weak refs to
# one layer's (w13, w2), which ``warm_up_fused_moe`` runs each token bucket with
_seen_shapes: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}


def fused_experts_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """``fused_experts_torch``'s result from five Triton launches and one torch sum, with no
    host synchronisation (CUDA-graph safe). ``topk_ids`` must lie in [0, experts)."""
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter, top_k = two_inter // 2, topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * inter, hidden_size), "w13: [experts, 2 x inter, hidden]"
    assert w2.shape == (num_experts, hidden_size, inter), "w2: [experts, hidden, inter]"
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k)
    assert w13.dtype == w2.dtype == hidden.dtype, "hidden states and experts in one dtype"
    key = (num_experts, hidden_size, inter, top_k, hidden.dtype, hidden.device)
    if key not in _seen_shapes:
        _seen_shapes[key] = (weakref.ref(w13), weakref.ref(w2))
    out = torch.empty((num_tokens, top_k, hidden_size), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return out.sum(dim=1)
    cfg = config or get_config(num_experts, hidden_size, inter, top_k, num_tokens, hidden.dtype)
    num_assign = num_tokens * top_k
    hidden = hidden.contiguous()
    sorted_ids, bounds = align_assignments(topk_ids, num_experts, cfg.block_m)
    act = torch.empty((num_assign, inter), dtype=hidden.dtype, device=hidden.device)
    _expert_gemm(
        hidden, w13, act, sorted_ids, bounds, None, num_assign, top_k, True, cfg.block_m, cfg.up
    )
    weights = topk_weights.reshape(-1).contiguous()
    _expert_gemm(
        act,
        w2,
        out.view(num_assign, hidden_size),
        sorted_ids,
        bounds,
        weights,
        num_assign,
        1,
        False,
        cfg.block_m,
        cfg.down,
    )
    return out.view(num_tokens, hidden_size) if top_k == 1 else out.sum(dim=1)


@torch.inference_mode()
def warm_up_fused_moe(max_tokens: int) -> None:
    """Compile the kernels of every token bucket up to ``max_tokens`` for each layer shape met
    so far (the model runner's warm-up step meets them all), with random routing."""
    for (num_experts, hidden_size, _, top_k, dtype, device), refs in list(_seen_shapes.items()):
        w13, w2 = refs[0](), refs[1]()
        if w13 is None or w2 is None:
            continue
        lower = 0
        for bucket in M_BUCKETS:
            if lower >= max_tokens:
                break
            num_tokens = min(bucket, max_tokens)
            hidden = torch.zeros((num_tokens, hidden_size), dtype=dtype, device=device)
            ids = torch.rand((num_tokens, num_experts), device=device).topk(top_k, dim=1).indices
            weights = torch.ones((num_tokens, top_k), dtype=torch.float32, device=device)
            fused_experts_triton(hidden, w13, w2, weights, ids)
            lower = bucket
