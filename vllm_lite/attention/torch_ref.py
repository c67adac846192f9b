"""Plain-PyTorch paged attention: the reference every other backend is tested against, and the
CPU path. Readable over fast: it loops over the sequences of the step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_lite.attention.metadata import AttentionBackend, AttentionMetadata


def store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping):
    """Write each token's K/V at its flat slot (block * block_size + offset); -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence, read through its block table."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, H, D]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
    """Causal attention of packed queries over paged keys; queries sit at the end of each
    sequence. ``query_start_loc`` and ``seq_lens`` may be tensors or lists."""
    qsl = [int(x) for x in query_start_loc]
    lens = [int(x) for x in seq_lens]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for i, seq_len in enumerate(lens):
        start, end = qsl[i], qsl[i + 1]
        if end == start:
            continue
        q_len = end - start
        k = gather_kv(k_cache, block_tables[i], seq_len).to(q.dtype)
        v = gather_kv(v_cache, block_tables[i], seq_len).to(q.dtype)
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        # query j (0-based within the chunk) is at position seq_len - q_len + j. The mask is
        # passed even for one query: on CPU it selects SDPA's math kernel, ~30x faster here.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        )
        out[start:end] = o.transpose(0, 1)
    return out


class TorchRefBackend(AttentionBackend):
    name = "torch"
    supports_cuda_graphs = False  # loops over sequences with host-side lengths

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kvcache_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        qsl = (
            meta.query_start_loc_cpu
            if meta.query_start_loc_cpu is not None
            else meta.query_start_loc
        )
        lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens
        return paged_attention_ref(q, k_cache, v_cache, meta.block_tables, qsl, lens, scale)
