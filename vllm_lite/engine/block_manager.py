"""PagedAttention's allocator: one preallocated pool of physical KV blocks, a free list, and a
block table per sequence mapping its logical blocks to physical ones. A block may be held by
several sequences; a reference count per block says how many, and a block goes back to the free
list when the last one lets go.

The prefix cache: a block full of computed tokens gets a key, (its parent's prefix id, its token
ids), and a prefix id of its own that stands for every token up to its end. A new sequence looks
its prompt up block by block and starts with every leading block already in the pool instead
of computing it (the n completions of one prompt share its blocks the same way). A freed block
keeps its K/V and its key: the free list runs least recently used first, and a cached block is
forgotten only when it is taken for new tokens. The chain is vLLM's hash chain made exact: the
dict of keys compares the token ids on a hit, and a prefix id, unlike a hash, is never shared by
two prefixes (nor reused), so no collision can hand a sequence another prefix's K/V."""

from __future__ import annotations

import itertools
from collections import OrderedDict

from vllm_lite.engine.sequence import PLACEHOLDER, Sequence


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(
            range(num_blocks)
        )  # LRU first
        self.ref_counts = [0] * num_blocks  # block tables holding each block
        # the prefix cache
        self.enable_prefix_caching = enable_prefix_caching
        self.cached_blocks: dict[
            tuple[int, tuple[int, ...]], int
        ] = {}  # key -> the block holding it
        self.block_key: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks
        self.block_prefix: list[int] = [
            0
        ] * num_blocks  # prefix id of the tokens up to the block's end; 0: none
        self._prefix_ids = itertools.count(1)
        self.num_cached_free_blocks = 0  # free blocks that still hold a cached prefix's K/V

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included (they are reused when needed)."""
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` must gain so that its first ``num_tokens`` tokens have a slot."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int, cached: list[int] | tuple = ()) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` tokens, starting (if its table is empty) from
        ``cached``, the blocks ``find_cached_prefix`` found; a free one of them counts as taken."""
        revived = sum(1 for block in cached if self.ref_counts[block] == 0)
        return self.num_new_blocks(seq, num_tokens) - len(cached) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens: on prefill, and by one block
        whenever decoding crosses a block boundary."""
        needed = self.num_new_blocks(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, {self.num_free_blocks} free")
        for _ in range(needed):
            block, _ = self.free_blocks.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Start ``seq``'s (empty) block table with ``blocks``, full blocks that already hold its
        first tokens: a prefix-cache hit, or the prompt of the completion it was forked from.
        No one writes into a full block again, so a shared block is never copied."""
        assert not seq.block_table
        for block in blocks:
            if self.ref_counts[block] == 0:  # a cached free block (only those are found free)
                del self.free_blocks[block]
                self.num_cached_free_blocks -= 1
            self.ref_counts[block] += 1
        seq.block_table = list(blocks)

    def free(self, seq: Sequence) -> None:
        """Let go of every block of ``seq``, the moment it finishes or is preempted. A block no
        other sequence holds goes to the back of the free list with its K/V and key; the tail
        goes first, so it is reused before the prefix it extends."""
        self.cache_full_blocks(seq)
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                self.num_cached_free_blocks += self.block_key[block] is not None
        seq.block_table = []
        seq.num_cached_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat slot (physical block * block_size + offset) of token ``position`` of ``seq``."""
        return (
            seq.block_table[position // self.block_size] * self.block_size
            + position % self.block_size
        )

    # ---- the prefix cache ----------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding ``seq``'s leading full blocks, as far as they match. The
        last token is never among them: its logits give the first output token."""
        blocks: list[int] = []
        bs, parent = self.block_size, 0
        for start in range(0, len(seq.token_ids) - bs, bs):
            block = self.cached_blocks.get((parent, tuple(seq.token_ids[start : start + bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self.block_prefix[block]
        return blocks

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key every block of ``seq`` newly full of computed tokens, so that later sequences can
        reuse it. Incremental: ``seq.num_cached_blocks`` blocks are done already. A block ending
        in a placeholder (a sampled token not read back yet) waits for a later call."""
        if not self.enable_prefix_caching:
            return
        bs, table = self.block_size, seq.block_table
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        for i in range(seq.num_cached_blocks, num_full):
            block, end = table[i], (i + 1) * bs
            if not self.block_prefix[block]:
                if seq.token_ids[end - 1] == PLACEHOLDER:  # only a sequence's last tokens can be
                    return
                key = (
                    self.block_prefix[table[i - 1]] if i else 0,
                    tuple(seq.token_ids[end - bs : end]),
                )
                holder = self.cached_blocks.setdefault(key, block)
                if holder == block:  # a prefix new to the cache
                    self.block_key[block] = key
                    self.block_prefix[block] = next(self._prefix_ids)
                else:  # the same tokens computed twice (say, admitted together): lookups find
                    # the first
                    self.block_prefix[block] = self.block_prefix[holder]
            seq.num_cached_blocks = i + 1

    def _forget(self, block: int) -> None:
        key = self.block_key[block]
        if key is not None:  # a cached free block, taken for new tokens (or a reset)
            del self.cached_blocks[key]
            self.num_cached_free_blocks -= 1
        self.block_key[block], self.block_prefix[block] = None, 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix. As in vLLM, only while no block is in use (a running
        sequence would key its blocks again, so a partial reset is no reset); returns whether
        the cache was reset."""
        if len(self.free_blocks) < self.num_blocks:
            return False
        for block in range(self.num_blocks):
            self._forget(block)
        return True
