"""PagedAttention's allocator: one preallocated pool of physical KV blocks, a free list, and a
block table per sequence mapping its logical blocks to physical ones. A block may be held by
several sequences (the n completions of one prompt share its full prompt blocks); a reference
count per block says how many, and a block goes back to the free list when the last one lets go."""
from __future__ import annotations

from collections import deque

from vllm_lite.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks  # block tables holding each block

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` must gain so that its first ``num_tokens`` tokens have a slot."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens: on prefill, and by one block
        whenever decoding crosses a block boundary."""
        needed = self.num_new_blocks(seq, num_tokens)
        if needed == 0:
            return
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, {self.num_free_blocks} free")
        for _ in range(needed):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def share(self, src: Sequence, dst: Sequence, num_blocks: int) -> None:
        """Start ``dst``'s (empty) block table with the first ``num_blocks`` blocks of ``src``'s.
        Only full blocks are shared: no one writes into a full block again, so a shared block
        is never copied (no copy-on-write)."""
        assert not dst.block_table and num_blocks <= len(src.block_table)
        dst.block_table = src.block_table[:num_blocks]
        for block in dst.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        """Let go of every block of ``seq``, the moment it finishes or is preempted; a block no
        other sequence holds returns to the pool."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat slot (physical block * block_size + offset) of token ``position`` of ``seq``."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
