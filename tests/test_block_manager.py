import pytest

from vllm_lite.engine.block_manager import BlockManager
from vllm_lite.engine.sequence import Sequence
from vllm_lite.sampling_params import SamplingParams


def seq(n):
    return Sequence(list(range(n)), SamplingParams())


@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_allocate_gives_each_sequence_enough_distinct_blocks(block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    a, b = seq(3 * block_size + 1), seq(block_size)
    bm.allocate(a, len(a))
    bm.allocate(b, len(b))
    assert len(a.block_table) == 4 and len(b.block_table) == 1
    assert len(set(a.block_table) | set(b.block_table)) == 5
    assert bm.num_free_blocks == 59


@pytest.mark.parametrize("block_size", [16, 256])
def test_a_new_block_is_taken_only_when_crossing_a_block_boundary(block_size):
    bm = BlockManager(num_blocks=8, block_size=block_size)
    s = seq(block_size - 1)
    bm.allocate(s, len(s))
    bm.allocate(s, block_size)  # fills the last slot of block 0
    assert len(s.block_table) == 1
    bm.allocate(s, block_size + 1)
    assert len(s.block_table) == 2


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(17)
    bm.allocate(s, 17)
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 10
    assert sorted(bm.free_blocks) == list(range(10))


def test_allocation_beyond_the_pool_is_refused():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(9)
    assert not bm.can_allocate(s, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(s, 9)
    assert bm.num_free_blocks == 2


def test_slot_maps_logical_position_through_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(6)
    bm.free_blocks.rotate(3)  # physical blocks are not in logical order
    bm.allocate(s, 6)
    assert [bm.slot(s, p) for p in range(6)] == [s.block_table[p // 4] * 4 + p % 4 for p in range(6)]


def test_shared_blocks_return_to_the_pool_when_their_last_holder_frees_them():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent, child = seq(10), seq(10)
    bm.allocate(parent, 10)  # 3 blocks, the last one partial
    bm.share(parent, child, 2)  # the two full blocks
    assert child.block_table == parent.block_table[:2] and bm.num_free_blocks == 7
    bm.allocate(child, 11)  # its own third block
    assert child.block_table[2] not in parent.block_table and bm.num_free_blocks == 6
    bm.free(parent)
    assert bm.num_free_blocks == 7  # only the parent's own block came back
    bm.free(child)
    assert bm.num_free_blocks == 10 and sorted(bm.free_blocks) == list(range(10)) and not any(bm.ref_counts)
