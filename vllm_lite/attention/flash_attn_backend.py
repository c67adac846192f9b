"""Attention through the flash-attn package (FlashAttention-2, ``pip install flash-attn``).

The package is optional: importing this module never imports it; ``FlashAttnBackend()`` does,
and raises a clear ``ImportError`` when it is missing, broken, or too old.

A step is split as in ``TritonBackend``: the first ``num_decodes`` rows are decodes (one query
each) and go to ``flash_attn_with_kvcache`` over the paged pool; the prefill chunks after them go
to ``flash_attn_varlen_func``, over the step's own K/V when no prefill has cached context, else
over the paged pool through ``block_table``. K/V are written with the Triton ``store_kvcache``.

API used (flash-attn 2.x, ``flash_attn/flash_attn_interface.py`` and
``csrc/flash_attn/flash_api.cpp`` of Dao-AILab/flash-attention):
  * ``flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=, block_table=, softmax_scale=,
    causal=)``: q ``[batch, seqlen_q, nheads, headdim]``; with a block_table the caches are
    ``[num_blocks, page_block_size, nheads_k, headdim]`` (our pool layout), cache_seqlens and
    block_table int32; returns ``[batch, seqlen_q, nheads, headdim]``.
  * ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    softmax_scale=, causal=, block_table=)``: packed q ``[total_q, nheads, headdim]``; with a
    block_table, k/v are the paged pool and ``cu_seqlens_k`` is the cumulative *context* length
    of each sequence (the kernel reads sequence b's ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` keys
    through its block_table row; ``BlockInfo`` in ``csrc/flash_attn/src/block_info.h``).
    ``block_table`` came to ``flash_attn_varlen_func`` with Dao-AILab/flash-attention PR #831
    (March 2024, a 2.5.x release); versions without it are refused at construction.
  * ``causal=True`` aligns the mask to the bottom-right corner (query j of a chunk of q_len sees
    keys ``<= seqlen_k - q_len + j``), which is our "queries sit at the end" layout.
  * both need fp16/bf16 q, k, v of one dtype, a CUDA device, and a contiguous last dimension.

Block size: both paged entry points check ``page_block_size % 256 == 0`` ("Paged KV cache block
size must be divisible by 256", ``mha_fwd_kvcache`` and ``mha_varlen_fwd`` in ``flash_api.cpp``;
the ``flash_attn_with_kvcache`` docstring: "page_block_size must be a multiple of 256"); read
in the upstream 2.x sources (2.8.3 the latest seen). With this engine's block_size limit of 256,
that means block_size == 256.

The decode path reads no tensor value on the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from vllm_lite.attention.metadata import AttentionBackend, AttentionMetadata

PAGE_BLOCK_MULTIPLE = 256  # flash-attn 2.x: paged KV cache block size must be divisible by 256


def _load_flash_attn():
    """(flash_attn_varlen_func, flash_attn_with_kvcache), or a clear ImportError."""
    try:
        # flash_attn/__init__.py swallows a missing CUDA extension, so import the functions
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    except ImportError as e:
        raise ImportError(
            "attention backend 'flash_attn' needs the flash-attn package (pip install flash-attn, "
            f"built for this torch and CUDA); importing it failed: {e}. "
            "Use attention_backend 'triton' or 'auto' instead."
        ) from e
    for fn in (flash_attn_varlen_func, flash_attn_with_kvcache):
        if "block_table" not in inspect.signature(fn).parameters:
            raise ImportError(
                f"attention backend 'flash_attn': this flash-attn version's {fn.__name__} has no "
                "block_table argument (paged KV cache); upgrade flash-attn or use 'triton'"
            )
    return flash_attn_varlen_func, flash_attn_with_kvcache


class FlashAttnBackend(AttentionBackend):
    """Triton store + flash-attn decode (paged) + flash-attn varlen prefill (fresh or paged)."""

    name = "flash_attn"

    def __init__(self, block_size: int | None = None) -> None:
        """``block_size`` None: not known yet, checked on the pool at every step instead."""
        if block_size is not None:
            self.check_block_size(block_size)
        self._varlen, self._with_kvcache = _load_flash_attn()
        from vllm_lite.attention.triton_ops import store_kvcache  # needs triton: import late

        self._store_kvcache = store_kvcache

    @classmethod
    def supports_block_size(cls, block_size: int) -> bool:
        return block_size > 0 and block_size % PAGE_BLOCK_MULTIPLE == 0

    @classmethod
    def check_block_size(cls, block_size: int) -> None:
        if not cls.supports_block_size(block_size):
            raise ValueError(
                f"attention backend 'flash_attn' needs a KV block_size divisible by "
                f"{PAGE_BLOCK_MULTIPLE} "
                f"(flash-attn's paged KV cache rule), got {block_size}: set block_size 256, or use "
                "attention_backend 'triton' (any block size)"
            )

    @staticmethod
    def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor) -> None:
        """Host-side checks on shapes and dtypes only (no tensor values read: graph-safe)."""
        FlashAttnBackend.check_block_size(k_cache.shape[1])
        if not q.is_cuda:
            raise ValueError("attention backend 'flash_attn' runs on CUDA only")
        if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
            raise ValueError(
                "attention backend 'flash_attn' needs fp16/bf16 activations and KV cache of the "
                f"same dtype, got q {q.dtype}, cache {k_cache.dtype}: "
                "use dtype bfloat16 or backend 'triton'"
            )

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self._check_inputs(q, k_cache)
        self._store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        # a step whose chunks are all one token long is all decodes to flash-attn. It also keeps
        # varlen off max_seqlen_q == 1, the one case where it splits KV over a paged cache
        # (mha_varlen_fwd), a combination reported wrong in Dao-AILab/flash-attention#1217
        nd = meta.num_seqs if meta.max_query_len == 1 else meta.num_decodes
        decode_out = None
        if nd > 0:
            # seq_lens include this step's token, already stored: it is the cache length to read
            decode_out = self._with_kvcache(
                q[:nd].unsqueeze(1),
                k_cache,
                v_cache,
                cache_seqlens=meta.seq_lens[:nd],
                block_table=meta.block_tables[:nd],
                softmax_scale=scale,
                causal=True,
            ).squeeze(1)  # [nd, 1, H, D] -> [nd, H, D]
        if meta.num_seqs == nd:
            return decode_out  # pure decode step (the CUDA-graph case): no copy
        out = torch.empty_like(q)
        if decode_out is not None:
            out[:nd] = decode_out
        # decodes own rows 0..nd-1 (one each), so the prefill chunks start at row nd
        cu_seqlens_q = meta.query_start_loc[nd:] - nd
        if meta.prefill_is_fresh:
            # no cached context: the chunks' keys are exactly this step's k, v
            out[nd:] = self._varlen(
                q[nd:],
                k[nd:],
                v[nd:],
                cu_seqlens_q,
                cu_seqlens_q,
                meta.max_query_len,
                meta.max_query_len,
                softmax_scale=scale,
                causal=True,
            )
        else:
            # keys come from the paged pool: cumulative context lengths, built on the device
            cu_seqlens_k = F.pad(torch.cumsum(meta.seq_lens[nd:], 0, dtype=torch.int32), (1, 0))
            out[nd:] = self._varlen(
                q[nd:],
                k_cache,
                v_cache,
                cu_seqlens_q,
                cu_seqlens_k,
                meta.max_query_len,
                meta.max_seq_len,
                softmax_scale=scale,
                causal=True,
                block_table=meta.block_tables[nd:],
            )
        return out
