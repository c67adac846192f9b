"""Fused Triton kernels for the small elementwise ops of a decoder layer and for the sampler's
draw and logprobs (used on CUDA only).

In eager PyTorch an fp32 RMSNorm is about six kernels, RoPE a gather plus casts, chunk, cat,
mul and add, and SwiGLU's gate three more. Each op here is one kernel that reads its inputs
once and writes its outputs once, doing the math in fp32 and rounding where the PyTorch code
rounds (the plain PyTorch code in norm.py, rotary.py and activation.py is the reference).

None of the wrappers modifies its inputs: every result is a new contiguous tensor (writing in
place would move the same bytes, and fresh outputs keep the contract of the PyTorch code).
Nothing reads a tensor value on the host, so they can be captured in a CUDA graph. Under
``TRITON_INTERPRET=1`` (set before triton is imported) they also run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import vllm_lite.triton_compat  # noqa: F401  (runs the kernels under the CPU interpreter)

# ----------------------------------------------------------------------------- RMSNorm


@triton.jit(do_not_specialize=["n_rows"])  # one compiled variant for every batch size
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_rows,
    n_heads,
    n_cols,
    stride_x_t,
    stride_x_h,
    stride_r_t,
    stride_r_h,
    stride_o_t,
    stride_o_h,
    stride_ro_t,
    stride_ro_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """BLOCK_ROWS rows per program; row ``r`` is (token r // n_heads, head r % n_heads)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    tok, head = (rows // n_heads).to(tl.int64), rows % n_heads  # 32-bit division, 64-bit offsets
    cols = tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    dtype = x_ptr.dtype.element_ty

    x = tl.load(
        x_ptr + (tok * stride_x_t + head * stride_x_h)[:, None] + cols[None, :],
        mask=mask,
        other=0.0,
    )
    if HAS_RESIDUAL:
        r = tl.load(
            res_ptr + (tok * stride_r_t + head * stride_r_h)[:, None] + cols[None, :],
            mask=mask,
            other=0.0,
        )
        # as torch adds two 16-bit tensors: in fp32, rounded once to the input dtype
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(
            res_out_ptr + (tok * stride_ro_t + head * stride_ro_h)[:, None] + cols[None, :],
            x,
            mask=mask,
        )

    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    # HF's order: normalize in fp32, round to the input dtype, then multiply by the weight
    normed = (xf * rstd[:, None]).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = (w[None, :] * normed).to(out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + (tok * stride_o_t + head * stride_o_h)[:, None] + cols[None, :], out, mask=mask
    )


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """[H] -> [1, 1, H]; [T, H] -> [T, 1, H]; [T, heads, H] as is; more leading dims flattened
    (a copy if need be)."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
):
    """``RMSNorm.forward``: ``norm(x)``, or ``(norm(x + residual), x + residual)``, normalized
    over the last dim. ``x`` may be a strided view (e.g. q from a split of the qkv output) as
    long as its last dim is contiguous. Outputs are new contiguous tensors; inputs are untouched."""
    n_cols = x.shape[-1]
    assert weight.shape == (n_cols,) and weight.is_contiguous()
    out_dtype = torch.promote_types(
        weight.dtype, x.dtype
    )  # weight * x.to(x.dtype), as torch types it
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out if residual is None else (out, res_out)

    x3 = _as_3d(x)
    r3 = _as_3d(residual) if residual is not None else x3
    ro3 = _as_3d(res_out) if residual is not None else out.view(x3.shape)
    o3 = out.view(x3.shape)
    assert x3.stride(-1) == 1 and r3.stride(-1) == 1, "the normalized dim must be contiguous"
    n_tokens, n_heads = x3.shape[0], x3.shape[1]
    n_rows = n_tokens * n_heads

    block_cols = triton.next_power_of_2(n_cols)
    assert block_cols <= 65536, "rows this long need a looped kernel"
    # short rows (per-head q/k norm) go several to a program; a hidden-size row gets its own
    block_rows = max(1, min(16, 2048 // block_cols))
    num_warps = 4 if block_cols * block_rows <= 2048 else (8 if block_cols <= 8192 else 16)
    grid = (triton.cdiv(n_rows, block_rows),)
    _rms_norm_kernel[grid](
        x3,
        r3,
        weight,
        o3,
        ro3,
        n_rows,
        n_heads,
        n_cols,
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        o3.stride(0),
        o3.stride(1),
        ro3.stride(0),
        ro3.stride(1),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps,
    )
    return out if residual is None else (out, res_out)


# ----------------------------------------------------------------------------- RoPE


@triton.jit
def _rotate_heads(
    x_ptr,
    o_ptr,
    w_ptr,
    stride_x_h,
    stride_o_h,
    n_heads,
    half,
    eps,
    cos1,
    cos2,
    sin1,
    sin2,
    NORM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """All heads of one token: out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
    NORM: x is first RMS-normalized per head with weight ``w`` (Qwen3's q/k norm), rounded as
    ``rms_norm`` rounds it."""
    heads = tl.arange(0, BLOCK_HEADS)
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (d < half)[None, :]
    x_off = heads[:, None] * stride_x_h + d[None, :]
    dtype = o_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + half, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)
        w1 = tl.load(w_ptr + d, mask=d < half, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + d, mask=d < half, other=0.0).to(tl.float32)
        x1 = (w1[None, :] * (x1 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2[None, :] * (x2 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    o1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    o2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    o_off = heads[:, None] * stride_o_h + d[None, :]
    tl.store(o_ptr + o_off, o1.to(dtype), mask=mask)
    tl.store(o_ptr + o_off + half, o2.to(dtype), mask=mask)


# positions may sit at any offset of the step's packed upload: alignment buys a scalar load nothing
@triton.jit(do_not_specialize_on_alignment=["pos_ptr"])
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    q_w_ptr,
    k_w_ptr,
    n_q_heads,
    n_k_heads,
    half,
    eps,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_qo_t,
    stride_qo_h,
    stride_ko_t,
    stride_ko_h,
    stride_table,
    NORM: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """One program per token: its cos/sin row is read once and used for every q and k head."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    row = pos * stride_table + d
    # both halves of the table (they are equal for cat(freqs, freqs), but nothing here relies on it)
    cos1 = tl.load(cos_ptr + row, mask=d_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + row + half, mask=d_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + row, mask=d_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + row + half, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + t * stride_q_t,
        q_out_ptr + t * stride_qo_t,
        q_w_ptr,
        stride_q_h,
        stride_qo_h,
        n_q_heads,
        half,
        eps,
        cos1,
        cos2,
        sin1,
        sin2,
        NORM,
        BLOCK_Q_HEADS,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr + t * stride_k_t,
        k_out_ptr + t * stride_ko_t,
        k_w_ptr,
        stride_k_h,
        stride_ko_h,
        n_k_heads,
        half,
        eps,
        cos1,
        cos2,
        sin1,
        sin2,
        NORM,
        BLOCK_K_HEADS,
        BLOCK_HALF,
    )


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 0.0,
):
    """``RotaryEmbedding.forward``: q ``[T, Hq, D]`` and k ``[T, Hkv, D]`` (strided views are
    fine if D is contiguous) rotated by the ``[max_pos, D]`` cos/sin rows at ``positions``
    (HF's rotate_half convention, fp32 math). Returns new contiguous (q, k); q, k untouched.
    ``norm_weights`` (q's, k's): RMSNorm each head first (Qwen3), as ``rms_norm`` would, in the
    same kernel. Positions are not bounds-checked (that would read them on the host)."""
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    assert head_dim % 2 == 0 and cos.shape[-1] == head_dim and sin.shape == cos.shape
    assert (
        q.stride(-1) == 1
        and k.stride(-1) == 1
        and cos.stride(-1) == 1
        and sin.stride() == cos.stride()
    )
    assert positions.shape == (n_tokens,)
    if norm_weights is not None:
        assert all(
            w.shape == (head_dim,) and w.is_contiguous() and w.dtype == q.dtype == k.dtype
            for w in norm_weights
        ), "norm weights: [head_dim], the dtype of q and k"
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_q, block_k = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    num_warps = 4 if (block_q + block_k) * block_half <= 4096 else 8
    q_w, k_w = norm_weights if norm_weights is not None else (cos, cos)  # (unused)
    _rotary_kernel[(n_tokens,)](
        positions,
        q,
        k,
        q_out,
        k_out,
        cos,
        sin,
        q_w,
        k_w,
        n_q_heads,
        n_k_heads,
        half,
        eps,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos.stride(0),
        NORM=norm_weights is not None,
        BLOCK_Q_HEADS=block_q,
        BLOCK_K_HEADS=block_k,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return q_out, k_out


# ----------------------------------------------------------------------------- SiLU and mul

_SILU_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x_t, stride_o_t, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + t * stride_x_t + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x_t + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # torch rounds silu(gate) to the input dtype before the product; so does this
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_o_t + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``SiluAndMul.forward``: ``silu(x[..., :N]) * x[..., N:]`` for x ``[..., 2N]``, a new
    tensor."""
    assert x.shape[-1] % 2 == 0
    n_cols = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], n_cols), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, x.shape[-1])  # a view unless x's leading dims are oddly strided
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    o2 = out.view(-1, n_cols)
    block = min(_SILU_BLOCK, triton.next_power_of_2(n_cols))
    grid = (x2.shape[0], triton.cdiv(n_cols, block))
    _silu_and_mul_kernel[grid](
        x2, o2, n_cols, x2.stride(0), o2.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 2
    )
    return out


# ----------------------------------------------------------------------------- logprobs

_LOGPROB_CHUNK = 4096


@triton.jit
def _max_first_id(x, ids):
    """The largest value of ``x`` and its id, the lowest id among equals (as torch's argmax)."""
    best = tl.max(x, 0)
    return best, tl.min(tl.where(x == best, ids, 2147483647), 0)


@triton.jit(
    do_not_specialize=["vocab", "k", "stride_row"],
    do_not_specialize_on_alignment=["rows_ptr", "tokens_ptr"],
)
def _logprob_chunk_kernel(
    logits_ptr,
    rows_ptr,
    tokens_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_rank_ptr,
    cand_val_ptr,
    cand_id_ptr,
    vocab,
    k,
    stride_row,
    CHUNK: tl.constexpr,
):
    """Program (row i, chunk c): one read of the chunk of logits row ``rows[i]`` gives its max,
    its sum of exp(x - max), how many of its logits are >= the logit of ``tokens[i]``, and its k
    largest logits (lowest id first among equals), for ``log_softmax`` statistics and top-k."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    out = i * tl.num_programs(1) + c
    row = logits_ptr + tl.load(rows_ptr + i).to(tl.int64) * stride_row
    ids = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(row + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32)
    x_token = tl.load(row + tl.load(tokens_ptr + i)).to(tl.float32)
    x_max = tl.max(x, 0)
    tl.store(part_max_ptr + out, x_max)
    tl.store(part_sum_ptr + out, tl.sum(tl.exp(x - x_max), 0))
    tl.store(part_rank_ptr + out, tl.sum((x >= x_token).to(tl.int32), 0))
    for j in range(k):
        best, best_id = _max_first_id(x, ids)
        tl.store(cand_val_ptr + out * k + j, best)
        tl.store(cand_id_ptr + out * k + j, best_id)
        x = tl.where(ids == best_id, float("-inf"), x)


def token_logprobs(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, k: int):
    """``vllm_lite.worker.logprobs.token_logprobs`` in one read of the logits: per-chunk statistics
    and top-k candidates from one kernel, then a few small ops over [rows, chunks] combine them
    (no [rows, vocab] log-softmax, gather or copy)."""
    num_rows, vocab = len(rows), logits.shape[1]
    assert logits.stride(1) == 1 and 0 <= k <= vocab
    chunks = triton.cdiv(vocab, _LOGPROB_CHUNK)
    k_chunk = min(k, _LOGPROB_CHUNK)
    f32 = dict(dtype=torch.float32, device=logits.device)
    part_max, part_sum = (
        torch.empty((num_rows, chunks), **f32),
        torch.empty((num_rows, chunks), **f32),
    )
    part_rank = torch.empty((num_rows, chunks), dtype=torch.int32, device=logits.device)
    cand_val = torch.empty((num_rows, chunks * k_chunk), **f32)
    cand_id = torch.empty((num_rows, chunks * k_chunk), dtype=torch.int32, device=logits.device)
    if num_rows:
        _logprob_chunk_kernel[(num_rows, chunks)](
            logits,
            rows,
            tokens,
            part_max,
            part_sum,
            part_rank,
            cand_val,
            cand_id,
            vocab,
            k_chunk,
            logits.stride(0),
            CHUNK=_LOGPROB_CHUNK,
            num_warps=8,
        )
    row_max = part_max.max(dim=1, keepdim=True).values
    lse = row_max[:, 0] + (part_sum * torch.exp(part_max - row_max)).sum(dim=1).log()
    token_lp = logits[rows, tokens].float() - lse
    top_val, where = cand_val.topk(k, dim=1)
    return token_lp, part_rank.sum(dim=1), top_val - lse[:, None], cand_id.gather(1, where).long()


# ----------------------------------------------------------------------------- sampling

_SAMPLE_CHUNK = 4096


@triton.jit
def _gumbel_best(row, ids, r, t, vocab):
    """Among logits ``ids`` of ``row``: the largest score and its id (the lowest among equals).
    The score is ``x / t + g`` with g = -log(-log(u)) a Gumbel draw from 32 random bits ``r``
    (u: 23 of them, centred, so 0 < u < 1 exactly), or ``x`` where t is 0 (greedy)."""
    x = tl.load(row + ids, mask=ids < vocab, other=float("-inf")).to(tl.float32)
    u = ((r >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    score = tl.where(t > 0, x / tl.where(t > 0, t, 1.0) - tl.log(-tl.log(u)), x)
    return _max_first_id(score, ids)


@triton.jit
def _keep_best(best, best_id, score, score_id):
    """The later (higher) ids win only a strictly larger score."""
    better = score > best
    return tl.where(better, score, best), tl.where(better, score_id, best_id)


@triton.jit(
    do_not_specialize=["vocab", "stride_row"],
    do_not_specialize_on_alignment=["temperature_ptr", "seeds_ptr"],
)
def _gumbel_argmax_kernel(
    logits_ptr,
    temperature_ptr,
    seeds_ptr,
    part_val_ptr,
    part_id_ptr,
    vocab,
    stride_row,
    CHUNK: tl.constexpr,
):
    """Program (row i, chunk c): the chunk's best ``_gumbel_best`` score and id. Token v's noise
    is Philox(row seed, v): a row's draw depends on its seed and logits only, not on the batch."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    row = logits_ptr + i.to(tl.int64) * stride_row
    t = tl.load(temperature_ptr + i)
    seed = tl.load(seeds_ptr + i)
    quarter: tl.constexpr = CHUNK // 4
    ids = c * CHUNK + tl.arange(0, quarter)
    r0, r1, r2, r3 = tl.randint4x(seed, ids)  # four 32-bit draws per Philox evaluation
    best, best_id = _gumbel_best(row, ids, r0, t, vocab)
    score, score_id = _gumbel_best(row, ids + quarter, r1, t, vocab)
    best, best_id = _keep_best(best, best_id, score, score_id)
    score, score_id = _gumbel_best(row, ids + 2 * quarter, r2, t, vocab)
    best, best_id = _keep_best(best, best_id, score, score_id)
    score, score_id = _gumbel_best(row, ids + 3 * quarter, r3, t, vocab)
    best, best_id = _keep_best(best, best_id, score, score_id)
    out = i * tl.num_programs(1) + c
    tl.store(part_val_ptr + out, best)
    tl.store(part_id_ptr + out, best_id)


def gumbel_sample(
    logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (any float dtype): drawn from softmax(x / T) by
    the Gumbel-max trick, in one read of the logits (no softmax, no [B, V] noise or copies);
    the argmax where T is 0. ``seeds`` [B] int64 keys each row's Philox stream."""
    num_rows, vocab = logits.shape
    assert logits.stride(1) == 1
    chunks = triton.cdiv(vocab, _SAMPLE_CHUNK)
    part_val = torch.empty((num_rows, chunks), dtype=torch.float32, device=logits.device)
    part_id = torch.empty((num_rows, chunks), dtype=torch.int32, device=logits.device)
    if num_rows:
        _gumbel_argmax_kernel[(num_rows, chunks)](
            logits,
            temperature,
            seeds,
            part_val,
            part_id,
            vocab,
            logits.stride(0),
            CHUNK=_SAMPLE_CHUNK,
            num_warps=8,
        )
    return part_id.gather(1, part_val.argmax(dim=1, keepdim=True))[:, 0].long()
