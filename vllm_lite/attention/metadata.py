"""The attention metadata of one engine step, and the seam every backend implements.

The model keeps HF-like ``forward(input_ids, positions)`` signatures; only the attention layer
reads the step's metadata, through ``get_forward_context()``.

Layout of a step (set by the model runner):
  * query tokens are packed sequence after sequence; sequence ``i`` owns query rows
    ``query_start_loc[i]:query_start_loc[i+1]``;
  * the first ``num_decodes`` sequences have exactly one query token each (decode), the rest
    are prefill chunks of any length;
  * ``seq_lens[i]`` is the sequence's context length *including* this step's tokens, so its
    queries are the last ``query_len`` positions and attend causally to keys ``0..seq_lens[i]-1``;
  * the KV pool of one layer is ``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t``
    of a step is written at flat slot ``slot_mapping[t]`` (block * block_size + offset), ``-1``
    means "padding, do not write";
  * ``block_tables[i, j]`` is the physical block that holds logical block ``j`` of sequence ``i``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class SharedPrefix:
    """Cascade attention's input: decode rows (``rows[i]`` = 1) whose first ``length`` keys are
    the physical blocks ``blocks`` (prefix caching, or the n completions of one prompt), so
    their attention to those keys can be computed once for all of them."""

    length: torch.Tensor  # [1] int32, a multiple of the block size
    blocks: torch.Tensor  # [>= length / block_size] int32
    rows: torch.Tensor  # [num_decodes] int32, 1 or 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    # True when every prefill sequence starts at position 0 (no cached context to read)
    prefill_is_fresh: bool = True
    # keys some decode rows share (None: nothing shared): a hint that a backend with
    # ``supports_shared_prefix`` uses to read them once for all those rows
    shared_prefix: SharedPrefix | None = None
    # a step laid out for a CUDA graph (backends with ``supports_mixed_cuda_graphs``): the
    # decodes' context lengths with 0 for every other row, and the prefill kernel's work list
    # (seq, query tile) padded with -1; host values (num_decodes, max_*) are then not read
    decode_lens: torch.Tensor | None = None  # [num_seqs] int32
    prefill_work: torch.Tensor | None = None  # [W, 2] int32
    # host copies, for backends that loop over sequences
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend:
    """One attention implementation. ``forward`` writes this step's K/V into the paged pool,
    then attends every query to its sequence's cached keys."""

    name = "base"
    # decode steps read no tensor value on the host, so the model runner may capture them
    supports_cuda_graphs = True
    # reads ``meta.shared_prefix`` (cascade attention); others attend over each context in full
    supports_shared_prefix = False
    # reads ``meta.decode_lens``/``prefill_work``, so steps with prefill tokens can be captured too
    supports_mixed_cuda_graphs = False

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        raise NotImplementedError


_CONTEXT: AttentionMetadata | None = None


def get_forward_context() -> AttentionMetadata:
    if _CONTEXT is None:
        raise RuntimeError("attention called outside of a model-runner step")
    return _CONTEXT


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata):
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, meta
    try:
        yield meta
    finally:
        _CONTEXT = previous
